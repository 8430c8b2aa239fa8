"""What the registries promise: something registered at run time, through the public extension point alone, is
trained, saved and tested like what ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

import checkpoint as ckpt
import models
import train

FAST = ["-e", "1", "-b", "8", "--image-size", "32", "--num-workers", "0", "--device", "cpu"]


class ToyNet(nn.Sequential):
    """Two convolutions: logits at the input's size, and no options or memory figure of its own."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def test_a_network_registered_at_run_time_trains_one_epoch(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(models.NETWORKS, "toy", models.Network(ToyNet))
    train.main(["--data_path", str(synthetic_pets), *FAST, "-n", "toy", "--save-dir", str(tmp_path), "--run-name", "r"])
    best = ckpt.load_checkpoint(tmp_path / "r" / ckpt.BEST_NAME)
    assert best["network"] == "toy" and best["model_kwargs"] == {}
    assert json.loads((tmp_path / "r" / "results.json").read_text())["args"]["network"] == "toy"
