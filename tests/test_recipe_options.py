"""The options of the recipe study (architecture, loss, --ema): wired into training, kept in the checkpoint for
inference, exact on resume, refused where they do not apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import inference
import train
from conftest import TOY_RUN, train_with_ctrl_c_in_epoch_2
from losses import bce_dice
from models import UNet
from test_end_to_end import printed_test_dice
from test_resume import assert_same_weights, history_without_timing

OPTIONS = ["--deep-supervision", "--full-res-skip", "--decoder-channels", "64", "32", "16", "16", "8", "--loss", "dice"]
FAST = ["-e", "2", *TOY_RUN]


def test_options_and_ema_train_resume_exactly_and_the_checkpoint_predicts_without_the_heads(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    common = [
        "--data_path", str(synthetic_pets), *FAST, *OPTIONS, "--ema", "0.9",
        "--save-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
    ]
    train.main([*common, "--run-name", "straight"])
    assert train_with_ctrl_c_in_epoch_2(monkeypatch, [*common, "--run-name", "resumed"]) == 130
    last = ckpt.load_checkpoint(tmp_path / "resumed" / ckpt.LAST_NAME)
    raw, average = last["training"]["raw_model"], last["model_state"]
    assert any(not torch.equal(raw[key], average[key]) for key in raw), "model_state must hold the EMA, not the raw"
    train.main(["--resume", str(tmp_path / "resumed")])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert_same_weights(straight / "best.pt", resumed / "best.pt")
    assert_same_weights(straight / "last.pt", resumed / "last.pt")
    assert history_without_timing(straight) == history_without_timing(resumed)

    best = ckpt.load_checkpoint(straight / "best.pt")
    assert best["model_kwargs"] == {
        "deep_supervision": True, "decoder_channels": [64, 32, 16, 16, 8], "full_resolution_skip": True,
    }
    assert any(key.startswith("aux_heads.") for key in best["model_state"])
    assert any(key.startswith("input_skip.") for key in best["model_state"])
    results = json.loads((straight / "results.json").read_text())
    assert results["args"]["ema"] == 0.9 and results["args"]["loss"] == "dice"
    assert results["test"] == json.loads((resumed / "results.json").read_text())["test"]
    capsys.readouterr()
    inference.main(["-m", str(straight), "--data_path", str(synthetic_pets), "--device", "cpu", "--num-workers", "0",
                    "-k", "0", "--worst", "0"])
    assert printed_test_dice(capsys.readouterr().out) == pytest.approx(results["test"]["dice"], abs=5e-5)


def test_one_training_step_trains_the_auxiliary_heads_too() -> None:
    torch.manual_seed(0)
    model = UNet(base_channels=4, deep_supervision=True)
    before = [head.weight.clone() for head in model.aux_heads]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    batch = (torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_one_epoch(
        model, [batch], optimizer, scheduler, scaler, bce_dice, torch.device("cpu"), False, "step"
    )
    for index, (head, weight) in enumerate(zip(model.aux_heads, before, strict=True)):
        assert not torch.equal(head.weight, weight), f"auxiliary head {index} got no gradient"


@pytest.mark.parametrize("flag", [["--full-res-skip"], ["--decoder-channels", "8", "8", "8", "8", "8"]])
def test_resnet_decoder_flags_are_refused_for_the_unet(
    flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["-n", "unet", *flag, "--save-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{flag[0]} shapes the resnet34_unet decoder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
