"""New parts join through the public extension points alone, at run time, with nothing else edited."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import augment
import train


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
    train.main([
        "--data_path", str(synthetic_pets), "-e", "1", "-b", "8", "--image-size", "32", "--num-workers", "0",
        "--device", "cpu", "--save-dir", str(tmp_path), "--run-name", "r", "--augment", "toy",
    ])
    assert (tmp_path / "r" / "best.pt").is_file()
    assert len(turn.seen) == 54 // 8, "applied to every training batch"
    turns = torch.cat([choice for choice, _ in turn.seen])
    assert turns.dtype == torch.bool and 0 < turns.sum() < len(turns), "its own choices, as it drew them"
    for _, masks in turn.seen:
        assert masks.shape == (8, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
