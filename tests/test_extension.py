"""What the registries promise: a loss, an augmentation or a network registered at run time, through the public
extension point alone and with nothing else edited, is trained, saved and tested like what ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import augment
import checkpoint as ckpt
import losses
import models
import train
from conftest import TOY_RUN

FAST = ["-e", "1", *TOY_RUN]


def train_one_epoch(data: Path, save_dir: Path, *flags: str) -> Path:
    train.main(["--data_path", str(data), *FAST, "--save-dir", str(save_dir), "--run-name", "r", *flags])
    return save_dir / "r"


def test_a_loss_registered_at_run_time_trains_one_epoch(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def focal_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Focal loss (gamma 2) plus soft Dice: a student's new loss, one function."""
        calls.append(logits.shape)
        bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        focal = ((1 - torch.exp(-bce)) ** 2 * bce).mean()
        return focal + losses.soft_dice(logits, target)

    monkeypatch.setitem(losses.LOSSES, "focal+dice", focal_dice)
    run = train_one_epoch(synthetic_pets, tmp_path, "--loss", "focal+dice")
    assert len(calls) >= 54 // 8, "it trained every batch (and scored validation and test)"
    results = json.loads((run / "results.json").read_text())
    assert results["args"]["loss"] == "focal+dice" and 0 <= results["test"]["dice"] <= 1


class QuarterTurn(augment.Transform):
    """A toy operation: half the images, with their masks, turned by 90 degrees; it notes what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sample(self, n: int, generator: torch.Generator) -> augment.Params:
        return {"turn": torch.rand(n, generator=generator) < 0.5}

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, params: augment.Params
    ) -> tuple[torch.Tensor, torch.Tensor]:
        turn = params["turn"].view(-1, 1, 1, 1)
        images = torch.where(turn, images.rot90(1, dims=(2, 3)), images)
        masks = torch.where(turn, masks.rot90(1, dims=(2, 3)), masks)
        self.seen.append((params["turn"], masks))
        return images, masks

    def describe(self) -> str:
        return "a quarter turn for half the images"


def test_an_augmentation_registered_at_run_time_trains_one_epoch(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn = QuarterTurn()
    monkeypatch.setitem(augment.AUGMENTATIONS, "toy", augment.Augmentation([*augment.DEFAULT_AUGMENTATION.ops, turn]))
    run = train_one_epoch(synthetic_pets, tmp_path, "--augment", "toy")
    assert (run / "best.pt").is_file()
    assert len(turn.seen) == 54 // 8, "applied to every training batch"
    turns = torch.cat([choice for choice, _ in turn.seen])
    assert turns.dtype == torch.bool and 0 < turns.sum() < len(turns), "its own choices, as it drew them"
    for _, masks in turn.seen:
        assert masks.shape == (8, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}


class ToyNet(nn.Sequential):
    """Two convolutions: logits at the input's size, and no options or memory figure of its own."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def test_a_network_registered_at_run_time_trains_one_epoch(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(models.NETWORKS, "toy", models.Network(ToyNet))
    run = train_one_epoch(synthetic_pets, tmp_path, "-n", "toy")
    best = ckpt.load_checkpoint(run / ckpt.BEST_NAME)
    assert best["network"] == "toy" and best["model_kwargs"] == {}
    assert json.loads((run / "results.json").read_text())["args"]["network"] == "toy"
