"""Trust the number, in train.py (issue 20): a run's Test Dice comes from its own model, data and flags, or the
run stops at once saying why; a signal anywhere ends it with one message and the conventional status."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest

import batches
import checkpoint as ckpt
import locks
import losses
import oxford_pet
import train
from conftest import TOY_RUN, train_with_ctrl_c_in_epoch_2
from errors import PetsegError, run_script
from evaluate import default_num_workers
from oxford_pet import DatasetError


@pytest.fixture(scope="module")
def stopped_run(synthetic_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs stopped by Ctrl-C as epoch 2 began: best.pt and last.pt of epoch 1."""
    save_dir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        argv = ["--data_path", str(synthetic_pets), "-e", "2", *TOY_RUN, "--save-dir", str(save_dir), "--run-name", "r"]
        assert train_with_ctrl_c_in_epoch_2(monkeypatch, argv) == 130
    return save_dir / "r"


@pytest.fixture
def run_copy(stopped_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stopped_run, tmp_path / "r"))


@pytest.fixture
def data_copy(synthetic_pets: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic_pets, tmp_path / "oxford-iiit-pet"))


def last_epoch(run: Path) -> int:
    return ckpt.load_checkpoint(run / ckpt.LAST_NAME)["epoch"]


# ----------------------------------------------------------------------------- provenance


def test_a_resumed_run_records_its_dataset_run_id_and_typed_flags_and_ctrl_c_at_its_results_says_how_to_finish(
    run_copy: Path, synthetic_pets: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_format, calls = train.format_result, []

    def ctrl_c_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_format(*args, **kwargs)

    monkeypatch.setattr(train, "format_result", ctrl_c_once)
    default = default_num_workers()  # the run was trained with --num-workers 0: typed at its default, it counts
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run_copy), "--num-workers", str(default)])
    assert exit_info.value.code == 130 and "--resume" in capsys.readouterr().err
    assert not (run_copy / "results.json").exists()
    train.main(["--resume", str(run_copy), "--num-workers", str(default)])  # nothing left to train: test, results

    results = json.loads((run_copy / "results.json").read_text())
    best, last = ckpt.load_checkpoint(run_copy / ckpt.BEST_NAME), ckpt.load_checkpoint(run_copy / ckpt.LAST_NAME)
    assert results["epochs_run"] == 2 and last["epoch"] == 2 and results["args"]["num_workers"] == default
    assert results["dataset"] == oxford_pet.dataset_record(synthetic_pets) == best["dataset"]
    assert Path(results["dataset"]["path"]).is_absolute() and results["dataset"]["splits"]["train"]["images"] == 54
    assert results["args"]["run_id"] == best["args"]["run_id"] == last["args"]["run_id"]
    assert (results["best_epoch"], results["valid_dice"]) == (best["epoch"], best["valid_dice"])


def test_resume_refuses_a_split_with_the_same_count_but_other_names(run_copy: Path, data_copy: Path) -> None:
    trainval = data_copy / "annotations" / "trainval.txt"
    first, second, *rest = trainval.read_text().splitlines(keepends=True)
    trainval.write_text("".join([second, first, *rest]))  # line 0 goes to valid: the two swap splits
    with pytest.raises(PetsegError) as error:
        train.main(["--resume", str(run_copy), "--data_path", str(data_copy)])
    message = str(error.value)
    assert "the train split has the same number of images (54) but other names" in message
    assert "new run" in message and "--data_path" in message
    assert last_epoch(run_copy) == 1 and not (run_copy / "results.json").exists()


def test_resume_refuses_another_runs_best_pt_before_training(
    run_copy: Path, trained: tuple[Path, str]
) -> None:
    shutil.copy(trained[0] / ckpt.BEST_NAME, run_copy / ckpt.BEST_NAME)
    with pytest.raises(PetsegError, match="another run's"):
        train.main(["--resume", str(run_copy)])
    assert last_epoch(run_copy) == 1, "refused before training"


def test_last_pt_without_best_pt_is_refused_at_start(run_copy: Path) -> None:
    (run_copy / ckpt.BEST_NAME).unlink()
    with pytest.raises(PetsegError, match="there is no best.pt"):
        train.main(["--resume", str(run_copy)])
    assert last_epoch(run_copy) == 1, "refused before training"


def test_test_images_listed_for_training_stop_the_run_with_their_names(data_copy: Path, tmp_path: Path) -> None:
    test_name = (data_copy / "annotations" / "test.txt").read_text().split()[0]
    with open(data_copy / "annotations" / "trainval.txt", "a") as trainval:
        trainval.write(f"{test_name} 1 1 1\n")
    with pytest.raises(DatasetError, match=test_name):
        train.main(["--data_path", str(data_copy), "-e", "1", *TOY_RUN, "--save-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- flags on --resume


def test_a_typed_recipe_flag_is_refused_on_resume_even_at_its_default(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(run_copy), "-e", "200"])  # the run was -e 2; 200 is the default
    assert exit_info.value.code == 2
    assert "--epochs 200 differs from the resumed run's 2" in capsys.readouterr().err


def test_a_resumed_run_never_downloads(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "moved"
    empty.mkdir()
    monkeypatch.setattr(oxford_pet.datasets, "OxfordIIITPet", lambda *args, **kwargs: pytest.fail("downloaded"))
    with pytest.raises(DatasetError, match="no dataset"):
        train.main(["--resume", str(run_copy), "--data_path", str(empty)])


def test_a_second_process_on_a_run_folder_is_refused_with_its_process_id(run_copy: Path) -> None:
    with locks.run_lock(run_copy), pytest.raises(PetsegError, match=str(os.getpid())):
        train.main(["--resume", str(run_copy)])
    assert last_epoch(run_copy) == 1


# ----------------------------------------------------------------------------- stops


def test_a_diverged_first_epoch_does_not_claim_a_checkpoint(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_bce = losses.bce
    monkeypatch.setattr(losses, "bce", lambda logits, target: real_bce(logits, target) * float("nan"))
    with pytest.raises(PetsegError) as error:
        train.main(
            ["--data_path", str(synthetic_pets), "-e", "1", *TOY_RUN, "--save-dir", str(tmp_path), "--run-name", "r"]
        )
    assert "No epoch had finished, so no checkpoint was written" in str(error.value)
    assert "epoch 0" not in str(error.value) and not (tmp_path / "r" / ckpt.BEST_NAME).exists()


def test_sighup_mid_run_saves_the_epoch_and_prints_a_command_that_pastes_back(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    save_dir, name = tmp_path / "my runs", "r $HOME 'x' é"
    real_epoch, calls = train.train_one_epoch, []

    def hang_up_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal closed: delivered before the next bytecode
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", hang_up_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            ["--data_path", str(synthetic_pets), "-e", "2", *TOY_RUN, "--save-dir", str(save_dir), "--run-name", name]
        )
    assert exit_info.value.code == 129
    err = capsys.readouterr().err
    assert "Interrupted by SIGHUP" in err and "Traceback" not in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert Path(command[command.index("--resume") + 1]).resolve() == (save_dir / name).resolve()
    assert last_epoch(save_dir / name) == 1 and (save_dir / name / "curves.png").is_file()
    assert not [path.name for path in (save_dir / name).iterdir() if path.name.endswith(".tmp")]


def test_sigterm_while_the_cache_is_built_is_one_line_and_143(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(batches, "load_or_build", terminated)
    argv = ["--data_path", str(synthetic_pets), "-e", "1", *TOY_RUN, "--save-dir", str(tmp_path), "--cache-dir",
            str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: train.main(argv))
    assert exit_info.value.code == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "Traceback" not in err
    assert not [path for path in tmp_path.iterdir() if path.name != "cache"], "no run folder was made"
