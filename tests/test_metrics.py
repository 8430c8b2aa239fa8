"""Dice, IoU and the loss, on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from evaluate import evaluate
from utils import BCEDiceLoss, dice_score, logits_to_mask, per_image_dice


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
    result = evaluate(FixedLogits(), loader, torch.device("cpu"), loss_fn=BCEDiceLoss())
    # image 1: |P|=2 |G|=1 ∩=1 -> 2/3; image 2: |P|=1 |G|=2 ∩=1 -> 2/3; image 3: both empty -> 1
    assert result.per_image_dice == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert result.dice == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert result.dataset_dice == pytest.approx(2 * 2 / (3 + 3))
    assert result.dataset_iou == pytest.approx(2 / 4)
    assert math.isfinite(result.loss)


def test_loss_is_small_for_confident_right_answers_and_large_for_wrong_ones() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    loss = BCEDiceLoss()
    right = loss(torch.where(target > 0, 10.0, -10.0), target)
    wrong = loss(torch.where(target > 0, -10.0, 10.0), target)
    assert right.item() < 1e-3 < 1.0 < wrong.item()
