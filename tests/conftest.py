"""Shared fixtures: a synthetic dataset in the official layout, and the real sample when present."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

    from augment import Augmentation

# Before any project module is imported (the cache reads it then), and inherited by the scripts
# the tests start: decoded-image caches go to a throwaway folder, never into the repository.
CACHE_DIR = Path(tempfile.mkdtemp(prefix="petseg-test-cache-"))
os.environ["PETSEG_CACHE_DIR"] = str(CACHE_DIR)

from make_synthetic_pets import make_synthetic_pets  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"
REAL_SAMPLE = REPO_ROOT.parent / "shared" / "oxford-iiit-pet-sample"
E2E_EPOCHS = 6
# Tests of the loop, the files and the signals rather than of a network train ResNet-18's encoder: 14 M
# parameters against the default ResNet-34's 24 M, through the same code (docs/testing.md has the timing).
TOY_RUN = ["-n", "resnet18_unet", "-b", "8", "--image-size", "32", "--num-workers", "0", "--device", "cpu"]
E2E_FLAGS = ["-e", str(E2E_EPOCHS), "-b", "8", "--image-size", "64", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def synthetic_pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 trainval (54 train / 6 valid) and 20 test pairs, with gray, RGBA-as-.jpg, CMYK and palette images."""
    return make_synthetic_pets(tmp_path_factory.mktemp("data") / "oxford-iiit-pet", n_trainval=60, n_test=20, seed=0)


def run_script(script: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run src/SCRIPT from another folder, as a user would, and capture its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SRC / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=600,
    )


@pytest.fixture(scope="session")
def trained(synthetic_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ResNet34-UNet run of train.py on the synthetic set: (run folder, what it printed)."""
    save_dir = tmp_path_factory.mktemp("saved_models")
    result = run_script(
        "train.py", "--data_path", synthetic_pets, *E2E_FLAGS, "--save-dir", save_dir, "--run-name", "e2e",
        cwd=tmp_path_factory.mktemp("cwd"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return save_dir / "e2e", result.stdout


def train_with_ctrl_c_in_epoch_2(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    """train.main(argv) with Ctrl-C pressed as epoch 2 begins; returns its exit code."""
    import train

    real_epoch, calls = train.train_one_epoch, []

    def ctrl_c_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_one_epoch", ctrl_c_in_epoch_2)
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
    return exit_info.value.code


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
    generator: torch.Generator, augmentation: Augmentation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole batch as batches.TrainBatches makes it: its choices drawn, applied, the images normalised."""
    from augment import DEFAULT_AUGMENTATION
    from oxford_pet import normalize

    augmentation = DEFAULT_AUGMENTATION if augmentation is None else augmentation
    images, masks = augmentation.apply(images, masks, augmentation.sample(len(images), generator), size)
    return normalize(images, mean, std), masks


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not (REAL_SAMPLE / "annotations" / "trainval.txt").is_file():
        pytest.skip(f"the real-data sample is not at {REAL_SAMPLE}")
    return REAL_SAMPLE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
