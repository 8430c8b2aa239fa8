"""The scripts as a user runs them: train on the synthetic set, then score the checkpoint with inference.py."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import E2E_EPOCHS, E2E_FLAGS, run_script

import evaluate
import inference
import train
from oxford_pet import load_dataset


def printed_test_dice(output: str) -> float:
    match = re.search(r"^Test Dice: (\d\.\d{4})", output, flags=re.MULTILINE)
    assert match, f"no 'Test Dice:' line in:\n{output}"
    return float(match.group(1))


def all_pet_valid_dice(data_path: Path) -> float:
    """What predicting 'pet' everywhere scores: the floor a model must clearly beat."""
    dataset = load_dataset(data_path, "valid", image_size=64)
    scores = [2 * mask.sum().item() / (mask.sum().item() + mask.numel()) for _, mask in dataset]
    return sum(scores) / len(scores)


def test_training_learns_well_above_the_all_pet_baseline(trained: tuple[Path, str], synthetic_pets: Path) -> None:
    run_dir, _ = trained
    results = json.loads((run_dir / "results.json").read_text())
    baseline = all_pet_valid_dice(synthetic_pets)
    assert results["valid_dice"] > baseline + 0.2, f"valid Dice {results['valid_dice']:.3f}, all-pet {baseline:.3f}"
    assert results["test"]["dice"] > baseline + 0.2


def test_run_folder_holds_checkpoint_history_curves_and_results(trained: tuple[Path, str]) -> None:
    run_dir, stdout = trained
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["network"] == "resnet34_unet" and checkpoint["image_size"] == 64
    assert checkpoint["args"]["epochs"] == E2E_EPOCHS
    with open(run_dir / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == list(range(1, E2E_EPOCHS + 1))
    best = max(rows, key=lambda row: float(row["valid_dice"]))
    assert checkpoint["epoch"] == int(best["epoch"]), "best.pt must be the epoch with the best valid Dice"
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["dice"] == pytest.approx(printed_test_dice(stdout), abs=5e-5)
    assert results["best_epoch"] == checkpoint["epoch"]


def test_inference_reproduces_the_test_dice_of_training(trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path) -> None:
    run_dir, train_stdout = trained
    result = run_script(
        "inference.py", "-m", run_dir / "best.pt", "--data_path", synthetic_pets, "--device", "cpu",
        "--num-workers", "0", "-b", "5", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_test_dice(result.stdout) == printed_test_dice(train_stdout)
    figure = run_dir / "test_predictions.png"
    assert figure.read_bytes().startswith(b"\x89PNG")

    again = run_script("inference.py", "-m", run_dir, "--data_path", synthetic_pets, "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "test_predictions-2.png").is_file(), "a second figure must not overwrite the first"


def test_inference_refuses_a_network_that_disagrees_with_the_checkpoint(trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path) -> None:
    run_dir, _ = trained
    result = run_script("inference.py", "-m", run_dir, "-n", "unet", "--data_path", synthetic_pets, cwd=tmp_path)
    assert result.returncode == 1
    assert "unet" in result.stderr and "resnet34_unet" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_script_scores_the_checkpoint_like_training(trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path) -> None:
    run_dir, train_stdout = trained
    result = run_script(
        "evaluate.py", "-m", run_dir, "--data_path", synthetic_pets, "--split", "test", "--device", "cpu", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_test_dice(result.stdout) == printed_test_dice(train_stdout)


def test_a_second_run_with_the_same_name_gets_its_own_folder(trained: tuple[Path, str]) -> None:
    run_dir, _ = trained
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    second = train.make_run_dir(run_dir.parent, run_dir.name)
    third = train.make_run_dir(run_dir.parent, run_dir.name)
    assert (second.name, third.name) == (f"{run_dir.name}-2", f"{run_dir.name}-3")
    assert not any(second.iterdir())
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def test_missing_dataset_without_download_is_a_clear_message(tmp_path: Path) -> None:
    save_dir = tmp_path / "saved_models"
    empty = tmp_path / "oxford-iiit-pet"
    empty.mkdir()
    result = run_script(
        "train.py", "--data_path", empty, "--no-download", "--device", "cpu", "--save-dir", save_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "images.tar.gz" in result.stderr and "annotations.tar.gz" in result.stderr
    assert "Traceback" not in result.stderr
    assert not save_dir.exists() or not any(save_dir.iterdir())


@pytest.mark.parametrize("script", [train, evaluate, inference])
def test_every_script_explains_itself(script, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--data_path" in help_text and "--device" in help_text
