"""Nothing lost: resume is exact, files survive SIGKILL, Ctrl-C prints the resume command."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bookkeeping
import checkpoint as ckpt
import train
from conftest import TOY_RUN
from files import atomic_write

SRC = Path(__file__).resolve().parents[1] / "src"


def history_without_timing(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def assert_same_weights(a: Path, b: Path) -> None:
    state_a = torch.load(a, weights_only=True)["model_state"]
    state_b = torch.load(b, weights_only=True)["model_state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"{key} differs"


def test_last_pt_is_written_by_time_at_the_end_and_on_ctrl_c_and_a_resume_from_it_is_exact(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the default --save-every (60 s), with epochs of 20 s on a fake clock: last.pt after epoch 1, then once
    60 s have passed since (epoch 4), and at the end; on Ctrl-C, the latest finished epoch. The resumed run
    ends bit-identical to one that was never stopped."""
    now, written = [0.0], []
    real_epoch, real_save = train.train_one_epoch, ckpt.save_checkpoint

    def twenty_seconds(*args, **kwargs):
        now[0] += 20
        return real_epoch(*args, **kwargs)

    def ctrl_c_in_epoch_4(*args, **kwargs):
        if now[0] == 60:
            raise KeyboardInterrupt
        return twenty_seconds(*args, **kwargs)

    def save(path: Path, **contents) -> None:
        if "training" in contents:
            written.append((path.parent.name, contents["epoch"]))
        real_save(path, **contents)

    monkeypatch.setattr(bookkeeping, "clock", lambda: now[0])
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    monkeypatch.setattr(train, "train_one_epoch", twenty_seconds)
    # A cache of its own: the first run builds it, the others load it, and that must not matter.
    common = [
        "--data_path", str(synthetic_pets), "-e", "5", *TOY_RUN,
        "--save-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
    ]
    train.main([*common, "--run-name", "straight"])
    assert written == [("straight", 1), ("straight", 4), ("straight", 5)]

    now[0] = 0.0
    monkeypatch.setattr(train, "train_one_epoch", ctrl_c_in_epoch_4)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*common, "--run-name", "interrupted"])
    assert exit_info.value.code == 130 and written[3:] == [("interrupted", 1), ("interrupted", 3)]
    assert not (tmp_path / "interrupted" / "results.json").exists()

    monkeypatch.setattr(train, "train_one_epoch", twenty_seconds)
    train.main(["--resume", str(tmp_path / "interrupted")])
    assert written[5:] == [("interrupted", 5)]
    straight, resumed = tmp_path / "straight", tmp_path / "interrupted"
    assert_same_weights(straight / "last.pt", resumed / "last.pt")
    assert_same_weights(straight / "best.pt", resumed / "best.pt")
    assert history_without_timing(straight) == history_without_timing(resumed)
    assert (
        json.loads((straight / "results.json").read_text())["test"]
        == json.loads((resumed / "results.json").read_text())["test"]
    )


def test_a_slow_disk_neither_adds_writes_nor_leaves_last_pt_behind_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that outlast the epochs after them (a slow or network disk, a fast GPU): last.pt is still written
    after epoch 1 and at the end only, and holds the last epoch, not the one whose write was under way."""
    written = []

    def slow_save(path: Path, **contents) -> None:
        time.sleep(0.3)
        written.append((path.name, contents["epoch"]))

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    monkeypatch.setattr(bookkeeping, "clock", lambda: 0.0)  # no interval ever passes
    history = []
    with bookkeeping.Bookkeeper(tmp_path, torch.device("cpu"), 60.0, True, "python train.py --resume r", "t") as keeper:
        for epoch, improved in enumerate([True, False, True, False], start=1):
            history.append({"epoch": epoch})
            contents = {"epoch": epoch, "model_state": {"w": torch.full((3,), float(epoch))}, "training": {}}
            keeper.after_epoch(epoch, history, improved, lambda contents=contents: contents)
        assert keeper.save_latest([]) == 4
    assert written == [("best.pt", 1), ("last.pt", 1), ("best.pt", 3), ("last.pt", 4)]


def test_resume_refuses_to_change_the_recipe(trained: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    run_dir, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run_dir), "-lr", "0.5"])
    assert exit_info.value.code == 2
    assert "--learning-rate" in capsys.readouterr().err
    with pytest.raises(train.PetsegError, match="finished"):
        train.main(["--resume", str(run_dir)])
    with pytest.raises(ckpt.CheckpointError, match="last.pt"):
        train.main(["--resume", str(run_dir / "best.pt")])


def start_training(synthetic_pets: Path, save_dir: Path, epochs: int) -> subprocess.Popen:
    command = [
        sys.executable, str(SRC / "train.py"), "--data_path", str(synthetic_pets), "-e", str(epochs),
        *TOY_RUN, "--save-dir", str(save_dir), "--run-name", "run",
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=save_dir)


def wait_for_epochs(run_dir: Path, process: subprocess.Popen, epochs: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "last.pt").exists() and len(history_without_timing(run_dir)) >= epochs:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no epoch {epochs} within {timeout}s")


def test_sigkill_mid_run_leaves_loadable_checkpoints_and_the_run_resumes(synthetic_pets: Path, tmp_path: Path) -> None:
    process = start_training(synthetic_pets, tmp_path, 2)
    run_dir = tmp_path / "run"
    wait_for_epochs(run_dir, process, 1)
    time.sleep(0.5)  # into epoch 2: mid-step, or mid-write of the epoch's files
    process.send_signal(signal.SIGKILL)
    process.communicate()
    for name in (ckpt.BEST_NAME, ckpt.LAST_NAME):
        assert ckpt.load_checkpoint(run_dir / name)["epoch"] >= 1

    resumed = subprocess.run(
        [sys.executable, str(SRC / "train.py"), "--resume", str(run_dir)], capture_output=True, text=True, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(row["epoch"]) for row in history_without_timing(run_dir)] == [1, 2]
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 2


def test_ctrl_c_saves_and_prints_the_exact_resume_command(synthetic_pets: Path, tmp_path: Path) -> None:
    # Epochs to spare: on a loaded machine the run must still be training when the signal comes.
    process = start_training(synthetic_pets, tmp_path, 4)
    run_dir = tmp_path / "run"
    wait_for_epochs(run_dir, process, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    command = re.search(r"^\s+(python .*--resume .*)$", stderr, flags=re.MULTILINE)
    assert command, stderr[-2000:]
    ckpt.load_checkpoint(run_dir / ckpt.LAST_NAME)

    argv = shlex.split(command.group(1))
    resumed = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "results.json").exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as file:
        file.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["history.csv"], "no temporary file may be left behind"
