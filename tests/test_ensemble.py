"""Several checkpoints vote: the mean of their probabilities is what is thresholded."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoint as ckpt
from conftest import run_script
from evaluate import Ensemble, eval_loader, evaluate, predict_logits
from models import build_model
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")


def save_untrained(path: Path, seed: int, image_size: int = 32, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """A checkpoint of a randomly initialised ResNet34-UNet (BatchNorm statistics moved off their
    defaults, so that models of different seeds disagree in eval mode)."""
    torch.manual_seed(seed)
    model = build_model("resnet34_unet")
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, image_size, image_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(
        path, network="resnet34_unet", model_kwargs={}, model_state=model.state_dict(), image_size=image_size,
        mean=list(mean), std=list(std), epoch=1, valid_dice=0.5,
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return [save_untrained(folder / f"seed{seed}" / "best.pt", seed) for seed in (0, 1)]


def test_an_ensemble_of_a_model_with_itself_is_the_model(checkpoints: list[Path], synthetic_pets: Path) -> None:
    checkpoint = ckpt.load_checkpoint(checkpoints[0])
    model = ckpt.model_from_checkpoint(checkpoint)
    twice = Ensemble([checkpoint, checkpoint]).eval()
    loader = eval_loader(
        synthetic_pets, "test", checkpoint["image_size"], checkpoint["mean"], checkpoint["std"], 8, 0, CPU,
        original_masks=True,
    )
    alone, voted = evaluate(model, loader, CPU), evaluate(twice, loader, CPU)
    assert voted.per_image_dice == alone.per_image_dice
    assert [score.dice for score in voted.per_image_original] == [score.dice for score in alone.per_image_original]
    images = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.allclose(twice(images), model(images), atol=1e-4)


def test_two_models_vote_with_the_mean_of_their_probabilities(checkpoints: list[Path]) -> None:
    first, second = (ckpt.load_checkpoint(path) for path in checkpoints)
    models = [ckpt.model_from_checkpoint(checkpoint) for checkpoint in (first, second)]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = (model(images) for model in models)
        voted = predict_logits(Ensemble([first, second]).eval(), images)
    mean_probability = (torch.sigmoid(a) + torch.sigmoid(b)) / 2
    assert torch.allclose(torch.sigmoid(voted), mean_probability, atol=1e-6)
    disagree = (a > 0) != (b > 0)
    assert disagree.any(), "the two models must disagree somewhere for the test to mean anything"
    assert torch.equal((voted > 0)[disagree], (mean_probability > 0.5)[disagree])


def test_each_model_gets_its_own_image_size_and_normalisation(tmp_path: Path) -> None:
    first = ckpt.load_checkpoint(save_untrained(tmp_path / "a.pt", 0, image_size=32))
    other_mean, other_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    second = ckpt.load_checkpoint(save_untrained(tmp_path / "b.pt", 1, 48, other_mean, other_std))
    ensemble = Ensemble([first, second]).eval()
    seen = []
    ensemble.members[1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    images = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = ensemble(images)
    assert logits.shape == (2, 1, 32, 32), "votes are combined at the first checkpoint's size"
    assert seen[0].shape == (2, 3, 48, 48)
    expected = torch.nn.functional.interpolate(pixels, size=(48, 48), mode="bilinear", antialias=True)
    assert torch.allclose(seen[0], (expected - 0.5) / 0.25, atol=1e-4)


def test_inference_scores_an_ensemble_and_names_who_voted(
    checkpoints: list[Path], synthetic_pets: Path, tmp_path: Path
) -> None:
    result = run_script(
        "inference.py", "-m", *checkpoints, "--data_path", synthetic_pets, "--device", "cpu", "--num-workers", "0",
        "-k", "1", "--worst", "1", "--tta", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ensemble of 2 checkpoints" in result.stdout
    assert all(str(path.parent.name) in result.stdout for path in checkpoints)
    table = checkpoints[0].parent / "test_dice_ensemble_tta.csv"
    with open(table) as file:
        assert len(list(csv.DictReader(file))) == 20
    assert (checkpoints[0].parent / "test_predictions_ensemble_tta.png").exists()


def test_own_photos_get_one_mask_from_several_models(checkpoints: list[Path], tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (50, 30), (90, 140, 200)).save(photos / "cat.png")
    result = run_script(
        "inference.py", "-m", checkpoints[0], "-m", checkpoints[1], "--input", photos, "--output", tmp_path / "masks",
        "--device", "cpu", "--num-workers", "0", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ensemble of 2 checkpoints" in result.stdout
    with Image.open(tmp_path / "masks" / "cat_mask.png") as mask:
        assert mask.size == (50, 30)
