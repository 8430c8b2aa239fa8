"""Checkpoints written before a refactor keep working: they load, predict, resume and export.

The files are a real run's of commit f067e25, their tensors zeroed so that they compress (tests/data/README.md).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import train

DATA = Path(__file__).parent / "data"
OLD_RUN = {"last.pt": "f067e25_resnet34_unet_ema_last.pt.xz", "best.pt": "f067e25_resnet34_unet_ema_best.pt.xz"}


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """The old run's folder as train.py left it after Ctrl-C in epoch 2 of 2: best.pt and last.pt of epoch 1."""
    run = tmp_path / "old"
    run.mkdir()
    for name, packed in OLD_RUN.items():
        (run / name).write_bytes(lzma.decompress((DATA / packed).read_bytes()))
    return run


@pytest.mark.parametrize("name", OLD_RUN)
def test_an_old_checkpoint_loads_and_predicts(old_run: Path, name: str) -> None:
    checkpoint = ckpt.load_checkpoint(old_run / name)
    model = ckpt.model_from_checkpoint(checkpoint)
    assert (checkpoint["network"], checkpoint["epoch"]) == ("resnet34_unet", 1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_an_old_run_resumes_to_its_end(old_run: Path, synthetic_pets: Path) -> None:
    train.main(["--resume", str(old_run), "--data_path", str(synthetic_pets), "--num-workers", "0", "--device", "cpu"])
    results = json.loads((old_run / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["args"]["ema"] == 0.9
    assert ckpt.load_checkpoint(old_run / "last.pt")["epoch"] == 2


def test_an_old_checkpoint_exports(old_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the export packages are not installed (requirements-export.txt)")
    import export

    export.main(["-m", str(old_run / "best.pt"), "--output", str(tmp_path / "old.onnx")])
    assert (tmp_path / "old.onnx").stat().st_size > 1_000_000
