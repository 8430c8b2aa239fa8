"""Dice, IoU and the loss, on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from evaluate import collate_with_original_masks, evaluate, format_result, predict_logits, resize_logits
from losses import LOSSES, auxiliary_loss, bce_dice
from utils import dice_score, logits_to_mask, per_image_dice


def masks(*rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)


def test_dice_by_hand() -> None:
    pred = masks([[1, 1, 1, 0]])  # |P| = 3
    gt = masks([[0, 1, 0, 1]])  # |G| = 2, |P ∩ G| = 1
    assert dice_score(pred, gt) == pytest.approx(2 * 1 / (3 + 2))


def test_dice_identical_disjoint_and_empty_cases() -> None:
    pred = masks([[1, 0]], [[1, 0]], [[0, 0]], [[0, 0]], [[1, 1]])
    gt = masks([[1, 0]], [[0, 1]], [[0, 0]], [[1, 0]], [[0, 0]])
    assert per_image_dice(pred, gt).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert dice_score(pred, gt) == pytest.approx(2 / 5)


def test_dice_is_a_mean_over_images_not_over_pixels() -> None:
    pred = masks([[1, 1, 1, 1]], [[0, 0, 0, 0]])
    gt = masks([[1, 1, 1, 1]], [[0, 0, 0, 1]])
    assert dice_score(pred, gt) == pytest.approx(0.5)  # pooled pixels would give 8/9


def test_dice_accepts_bool_and_float_masks() -> None:
    pred = torch.tensor([[[True, False]]])
    gt = torch.tensor([[[1.0, 1.0]]])
    assert dice_score(pred, gt) == pytest.approx(2 / 3)


def test_dice_refuses_logits_instead_of_masks() -> None:
    with pytest.raises(ValueError, match="binary mask"):
        dice_score(torch.tensor([[[0.3, -2.0]]]), masks([[1, 0]]))


def test_dice_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice_score(masks([[1, 0]]), masks([[1, 0, 0]]))


def test_threshold_is_sigmoid_above_one_half() -> None:
    logits = torch.tensor([-1.0, -1e-6, 0.0, 1e-6, 3.0])
    assert logits_to_mask(logits).tolist() == (torch.sigmoid(logits.double()) > 0.5).tolist()


class FixedLogits(nn.Module):
    """Returns the logits stored as the image, so the evaluation loop can be checked by hand."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_evaluate_reports_per_image_and_pooled_scores() -> None:
    logits = torch.tensor([[[[5.0, 5.0, -5.0, -5.0]]], [[[-5.0, -5.0, -5.0, 5.0]]], [[[-5.0, -5.0, -5.0, -5.0]]]])
    truth = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, 1.0, 1.0]]], [[[0.0, 0.0, 0.0, 0.0]]]])
    loader = DataLoader(TensorDataset(logits, truth), batch_size=2)
    result = evaluate(FixedLogits(), loader, torch.device("cpu"), loss_fn=bce_dice)
    # image 1: |P|=2 |G|=1 ∩=1 -> 2/3; image 2: |P|=1 |G|=2 ∩=1 -> 2/3; image 3: both empty -> 1
    assert result.per_image_dice == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert result.dice == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert result.dataset_dice == pytest.approx(2 * 2 / (3 + 3))
    assert result.dataset_iou == pytest.approx(2 / 4)
    assert math.isfinite(result.loss)


def test_loss_is_small_for_confident_right_answers_and_large_for_wrong_ones() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    loss = bce_dice
    right = loss(torch.where(target > 0, 10.0, -10.0), target)
    wrong = loss(torch.where(target > 0, -10.0, 10.0), target)
    assert right.item() < 1e-3 < 1.0 < wrong.item()


def test_tta_is_the_mean_of_the_plain_and_the_mirrored_pass() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, kernel_size=3, padding=1).eval()  # not mirror-symmetric, so the passes differ
    images = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        plain = torch.sigmoid(model(images))
        mirrored = torch.sigmoid(model(images.flip(-1))).flip(-1)
        tta = predict_logits(model, images, tta=True)
        assert not torch.allclose(plain, mirrored, atol=1e-3)
        assert torch.allclose(torch.sigmoid(tta), (plain + mirrored) / 2, atol=1e-6)
        assert torch.equal(predict_logits(model, images), model(images)), "without TTA the logits are the model's"
        assert torch.allclose(predict_logits(model, images.flip(-1), tta=True), tta.flip(-1), atol=1e-5)


def test_tta_of_confident_logits_stays_finite_and_thresholds_like_the_mean_probability() -> None:
    logits = torch.tensor([[[[60.0, -60.0, 40.0, -30.0, 2.0]]]])  # mirrored: [2, -30, 40, -60, 60]
    tta = predict_logits(FixedLogits(), logits, tta=True)
    assert torch.isfinite(tta).all()
    mean_probability = (torch.sigmoid(logits.double()) + torch.sigmoid(logits.double().flip(-1))) / 2
    assert logits_to_mask(tta).tolist() == (mean_probability > 0.5).tolist()
    assert tta[0, 0, 0, 2].item() == pytest.approx(40.0, abs=1e-4), "both passes at 40 give back 40"


def test_original_size_scores_resize_the_logits_to_each_masks_own_size() -> None:
    # 2x2 logits, pet on the left column; bilinear upsampling to 4 wide puts the edge between columns 1 and 2.
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])
    model_size_mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    original = torch.zeros(1, 4, 4, dtype=torch.uint8)
    original[:, :, 0] = 1  # only the first column is pet: |P| = 8, |G| = 4, overlap 4
    small = torch.zeros(1, 1, 1, dtype=torch.uint8)  # a 1x1 photo of background; the prediction averages to 0
    loader = DataLoader(
        [(logits[0], model_size_mask[0], original), (logits[0], model_size_mask[0], small)],
        batch_size=2,
        collate_fn=collate_with_original_masks,
    )
    result = evaluate(FixedLogits(), loader, torch.device("cpu"))
    assert result.dice == 1.0 and result.image_size == (2, 2)
    assert [score.dice for score in result.per_image_original] == pytest.approx([2 * 4 / (8 + 4), 1.0])
    assert result.dice_original == pytest.approx((2 / 3 + 1) / 2)
    assert result.dataset_dice_original == pytest.approx(2 * 4 / (8 + 4))
    assert (result.per_image_original[0].height, result.per_image_original[0].width) == (4, 4)
    assert result.per_image_original[0].pet_pixels == 4 and result.per_image_original[0].predicted_pixels == 8
    assert "Test Dice at original size: 0.8333" in format_result("test", result)


def test_resize_logits_keeps_a_same_size_input_untouched() -> None:
    logits = torch.randn(1, 1, 5, 7)
    assert resize_logits(logits, (5, 7)) is logits
    assert resize_logits(logits, (13, 3)).shape == (1, 1, 13, 3)


def test_the_registered_losses_are_bce_soft_dice_and_their_sum() -> None:
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    soft_dice = (2 * (prob * target.flatten(1)).sum(1) + 1) / (prob.sum(1) + target.flatten(1).sum(1) + 1)
    assert LOSSES["bce"](logits, target) == pytest.approx(bce.item(), rel=1e-6)
    assert LOSSES["dice"](logits, target) == pytest.approx(1 - soft_dice.mean().item(), rel=1e-6)
    both = LOSSES["bce+dice"](logits, target)
    assert both == pytest.approx(bce.item() + 1 - soft_dice.mean().item(), rel=1e-6)


def test_auxiliary_losses_are_upsampled_and_halve_per_stage_down() -> None:
    loss = bce_dice
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    coarse, fine = torch.full((2, 1, 4, 4), -1.0), torch.full((2, 1, 8, 8), 2.0)  # constant maps upsample exactly
    expected = 0.25 * loss(torch.full_like(target, -1.0), target) + 0.5 * loss(torch.full_like(target, 2.0), target)
    assert auxiliary_loss(loss, [coarse, fine], target) == pytest.approx(expected.item(), rel=1e-6)
    assert auxiliary_loss(loss, [], target) == 0
