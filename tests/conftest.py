"""Shared fixtures: a synthetic dataset in the official layout, and the real sample when present."""

from __future__ import annotations

from pathlib import Path

import pytest
from make_synthetic_pets import make_synthetic_pets

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO_ROOT.parent / "shared" / "oxford-iiit-pet-sample"


@pytest.fixture(scope="session")
def synthetic_pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 trainval (54 train / 6 valid) and 20 test pairs, with gray, RGBA-as-.jpg, CMYK and palette images."""
    return make_synthetic_pets(tmp_path_factory.mktemp("data") / "oxford-iiit-pet", n_trainval=60, n_test=20, seed=0)


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not (REAL_SAMPLE / "annotations" / "trainval.txt").is_file():
        pytest.skip(f"the real-data sample is not at {REAL_SAMPLE}")
    return REAL_SAMPLE
