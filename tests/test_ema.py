"""--ema: an exponential moving average of the weights is validated, kept in best.pt and tested; resume stays exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import train
from conftest import train_with_ctrl_c_in_epoch_2
from test_resume import assert_same_weights, history_without_timing

FAST = ["-e", "2", "-b", "8", "--image-size", "32", "--num-workers", "0", "--device", "cpu", "--ema", "0.9"]


def test_the_average_warms_up_then_decays_at_the_given_rate() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    average = train.moving_average(model, decay=0.9)
    expected = model.weight.item()
    for step in range(1, 40):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update_parameters(model)
        decay = min(0.9, step / (9 + step))  # (1 + n) / (10 + n) with n = step - 1 averages so far
        expected = decay * expected + (1 - decay) * step if step > 1 else step
        assert average.module.weight.item() == pytest.approx(expected, rel=1e-6)


def test_best_pt_holds_the_average_and_a_resumed_run_ends_identical(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = [
        "--data_path", str(synthetic_pets), *FAST, "--save-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")
    ]
    train.main([*common, "--run-name", "straight"])
    assert train_with_ctrl_c_in_epoch_2(monkeypatch, [*common, "--run-name", "resumed"]) == 130
    last = ckpt.load_checkpoint(tmp_path / "resumed" / ckpt.LAST_NAME)
    raw, average = last["training"]["raw_model"], last["model_state"]
    assert any(not torch.equal(raw[key], average[key]) for key in raw), "the average is not the raw weights"
    train.main(["--resume", str(tmp_path / "resumed")])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_same_weights(straight / "best.pt", resumed / "best.pt")
    assert_same_weights(straight / "last.pt", resumed / "last.pt")
    assert history_without_timing(straight) == history_without_timing(resumed)
    results = json.loads((straight / "results.json").read_text())
    assert results["args"]["ema"] == 0.9
    assert results["test"] == json.loads((resumed / "results.json").read_text())["test"]
