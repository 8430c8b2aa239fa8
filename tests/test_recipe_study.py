"""benchmarks/recipe_study.py: variants x seeds trained through train.py, one table of mean ± spread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STUDY = REPO_ROOT / "benchmarks" / "recipe_study.py"


def run_study(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(STUDY), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def test_two_variants_make_one_table_and_a_rerun_reuses_the_runs(synthetic_pets: Path, tmp_path: Path) -> None:
    record = tmp_path / "BENCHMARKS.md"
    record.write_text("# Benchmarks\n")
    args = [
        "--data_path", synthetic_pets, "-e", "1", "--image-size", "32", "--seeds", "0",
        "--train-flags", "--device cpu --num-workers 0 -b 8 -n resnet18_unet",
        "--variant", "default=", "--variant", "batch4=-b 4",
        "--save-dir", tmp_path / "runs", "--record-to", record,
    ]
    first = run_study(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| default") or line.startswith("| batch4")]
    assert len(rows) == 2
    results = {
        name: json.loads((tmp_path / "runs" / f"{name}-seed0" / "results.json").read_text())
        for name in ("default", "batch4")
    }
    assert results["batch4"]["args"]["batch_size"] == 4 and results["default"]["args"]["batch_size"] == 8
    assert f"| {results['default']['test']['dice']:.4f} |" in rows[0]
    written = record.read_text()
    assert "recipe study" in written and "--variant 'batch4=-b 4'" in written and rows[1] in written

    again = run_study(*args, "--no-record", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout, "finished runs are read, not trained again"
    assert [line for line in again.stdout.splitlines() if line.startswith("| batch4")] == rows[1:]
    assert record.read_text() == written


def test_a_variant_without_flags_separator_is_a_flag_error(tmp_path: Path) -> None:
    result = run_study("--variant", "batch16", "--no-record", cwd=tmp_path)
    assert result.returncode == 2
    assert "NAME=FLAGS" in result.stderr


def test_a_run_stopped_after_an_epoch_is_resumed_not_started_again_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(STUDY.parent))
    import recipe_study

    commands = []

    def fake_train(command, stdout=None):
        commands.append(command)
        (Path(command[command.index("--resume") + 1]) / "results.json").write_text('{"test": {"dice": 0.5}}')
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(recipe_study.subprocess, "run", fake_train)
    stopped = tmp_path / "default-seed0"
    stopped.mkdir()
    (stopped / "last.pt").write_bytes(b"")
    assert recipe_study.train_once(stopped, ["python", "train.py", "--run-name", "default-seed0"]) == {
        "test": {"dice": 0.5}
    }
    assert commands == [["python", "train.py", "--run-name", "default-seed0", "--resume", str(stopped)]]
