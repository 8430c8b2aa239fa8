"""The scripts as a user runs them: train on the synthetic set, then score the checkpoint with inference.py."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compare
import evaluate
import inference
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import E2E_EPOCHS, E2E_FLAGS, run_script
from errors import PetsegError
from evaluate import SplitWithOriginalMasks, predict_logits, resize_logits
from oxford_pet import build_transform, image_path, load_dataset
from utils import logits_to_mask


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


def test_inference_reproduces_the_test_dice_of_training(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path
) -> None:
    run_dir, train_stdout = trained
    result = run_script(
        "inference.py", "-m", run_dir / "best.pt", "--data_path", synthetic_pets, "--device", "cpu",
        "--num-workers", "0", "-b", "5", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_test_dice(result.stdout) == printed_test_dice(train_stdout)
    figure = run_dir / "test_predictions.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert f"Test Dice at original size: {results['test']['dice_original']:.4f}" in result.stdout
    assert f"Test Dice at original size: {results['test']['dice_original']:.4f}" in train_stdout
    with open(run_dir / "test_dice.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 20
    assert np.mean([float(row["dice"]) for row in rows]) == pytest.approx(results["test"]["dice"], abs=1e-5)
    assert np.mean([float(row["dice_original"]) for row in rows]) == pytest.approx(
        results["test"]["dice_original"], abs=1e-5
    )
    first = rows[0]
    with Image.open(image_path(synthetic_pets, first["name"])) as photo:
        assert (int(first["width"]), int(first["height"])) == photo.size

    again = run_script("inference.py", "-m", run_dir, "--data_path", synthetic_pets, "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "test_predictions-2.png").is_file(), "a second figure must not overwrite the first"
    assert (run_dir / "test_dice-2.csv").is_file(), "a second table must not overwrite the first"


def test_inference_refuses_a_network_that_disagrees_with_the_checkpoint(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained
    result = run_script("inference.py", "-m", run_dir, "-n", "unet", "--data_path", synthetic_pets, cwd=tmp_path)
    assert result.returncode == 1
    assert "unet" in result.stderr and "resnet34_unet" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_script_scores_the_checkpoint_like_training(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path
) -> None:
    run_dir, train_stdout = trained
    result = run_script(
        "evaluate.py", "-m", run_dir, "--data_path", synthetic_pets, "--split", "test", "--device", "cpu", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed_test_dice(result.stdout) == printed_test_dice(train_stdout)


@pytest.fixture(scope="module")
def second_run(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bytes]:
    """A one-epoch run given the first run's name; returns its folder and the first run's best.pt from before it."""
    run_dir, _ = trained
    before = (run_dir / "best.pt").read_bytes()
    flags = [*E2E_FLAGS, "-e", "1"]
    result = run_script(
        "train.py", "--data_path", synthetic_pets, *flags, "--save-dir", run_dir.parent, "--run-name", "e2e",
        cwd=tmp_path_factory.mktemp("cwd"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir.parent / "e2e-2", before


def test_a_second_run_with_the_same_name_gets_its_own_folder(
    trained: tuple[Path, str], second_run: tuple[Path, bytes]
) -> None:
    run_dir, _ = trained
    second_dir, before = second_run
    assert second_dir.name == "e2e-2" and (second_dir / "best.pt").is_file()
    assert (run_dir / "best.pt").read_bytes() == before


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


# ----------------------------------------------------------------------------- users' own images


def write_odd_images(folder: Path, synthetic_pets: Path) -> dict[str, tuple[int, int]]:
    """Photos of sizes and modes no training image had, a real test photo, and a file that is no image."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (97, 173, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (211, 131), dtype=np.uint8)).convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(rng.integers(0, 65535, (45, 38), dtype=np.uint16)).save(folder / "sixteen_bit.png")
    Image.fromarray(rng.integers(0, 256, (64, 300, 3), dtype=np.uint8)).quantize().save(folder / "palette.gif")
    name = load_dataset(synthetic_pets, "test").names[5]
    with Image.open(image_path(synthetic_pets, name)) as photo:
        photo.save(folder / "test_photo.PNG")  # lossless, so its prediction can be checked against the test split's
    (folder / "notes.txt").write_text("not an image")
    sizes = {}
    for path in folder.iterdir():
        if path.suffix != ".txt":
            with Image.open(path) as image:
                sizes[path.stem] = image.size
    return sizes


def predict_own(run_dir: Path, source: Path, output: Path, *extra: str) -> None:
    inference.main(["-m", str(run_dir), "--input", str(source), "--output", str(output), "--device", "cpu",
                    "--num-workers", "0", "-b", "3", *extra])


def test_own_images_of_any_size_and_mode_get_masks_and_overlays_of_their_own_size(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = trained
    sizes = write_odd_images(tmp_path / "photos", synthetic_pets)
    predict_own(run_dir, tmp_path / "photos", tmp_path / "out" / "new")
    assert "notes.txt" in capsys.readouterr().err, "a skipped file must be named"
    assert sorted(p.name for p in (tmp_path / "out" / "new").iterdir()) == sorted(
        f"{stem}{suffix}" for stem in sizes for suffix in ("_mask.png", "_overlay.png")
    )
    for stem, size in sizes.items():
        with Image.open(tmp_path / "out" / "new" / f"{stem}_mask.png") as mask:
            assert mask.mode == "L" and mask.size == size, stem
            assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        with Image.open(tmp_path / "out" / "new" / f"{stem}_overlay.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == size, stem

    # The test photo's mask is the prediction that original-size scoring makes for it.
    checkpoint = load_checkpoint(run_dir)
    transform = build_transform(False, checkpoint["image_size"], tuple(checkpoint["mean"]), tuple(checkpoint["std"]))
    dataset = SplitWithOriginalMasks(synthetic_pets, "test", transform)
    image, _, original_mask = dataset[5]
    with torch.no_grad():
        logits = predict_logits(model_from_checkpoint(checkpoint), image[None])
    expected = logits_to_mask(resize_logits(logits, original_mask.shape[-2:]))[0, 0].numpy()
    written = np.asarray(Image.open(tmp_path / "out" / "new" / "test_photo_mask.png")) == 255
    assert (written == expected).mean() > 0.999
    assert expected.any() and not expected.all()


def test_existing_outputs_are_refused_before_anything_is_written(
    trained: tuple[Path, str], synthetic_pets: Path, tmp_path: Path
) -> None:
    run_dir, _ = trained
    photos, output = tmp_path / "photos", tmp_path / "out"
    sizes = write_odd_images(photos, synthetic_pets)
    output.mkdir()
    (output / "test_photo_overlay.png").write_bytes(b"the user's own file")
    with pytest.raises(PetsegError, match="test_photo_overlay.png already exists.*--overwrite"):
        predict_own(run_dir, photos, output)
    assert [p.name for p in output.iterdir()] == ["test_photo_overlay.png"], "nothing may be written"
    assert (output / "test_photo_overlay.png").read_bytes() == b"the user's own file"

    predict_own(run_dir, photos, output, "--overwrite")
    assert len(list(output.iterdir())) == 2 * len(sizes)
    assert (output / "test_photo_overlay.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("case", ["not_an_image", "missing", "same_stem", "output_is_input", "truncated"])
def test_unusable_inputs_are_clear_errors(case: str, trained: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = trained
    source, output = tmp_path / "photos", tmp_path / "out"
    source.mkdir()
    Image.new("RGB", (40, 30)).save(source / "cat.jpg")
    expected = {
        "not_an_image": "not an image",
        "missing": "does not exist",
        "same_stem": "cat.jpg and cat.png",
        "output_is_input": "--output is the --input folder",
        "truncated": "cat.jpg: cannot decode the image",
    }[case]
    if case == "not_an_image":
        (source / "notes.txt").write_text("hello")
        source = source / "notes.txt"
    elif case == "missing":
        source = source / "nowhere.jpg"
    elif case == "same_stem":
        Image.new("RGB", (40, 30)).save(source / "cat.png")
    elif case == "output_is_input":
        output = source
    elif case == "truncated":  # a header Pillow recognises, with its image data cut off
        noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(noise).save(source / "cat.jpg")
        data = (source / "cat.jpg").read_bytes()
        (source / "cat.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(PetsegError, match=expected):
        predict_own(run_dir, source, output)
    if case == "truncated":
        assert not any((tmp_path / "out").glob("*.png")), "nothing is written for a photo that cannot be read"
    else:
        assert not (tmp_path / "out").exists()


def test_tta_on_the_test_split_is_labelled_and_saved_apart(
    trained: tuple[Path, str], synthetic_pets: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir, _ = trained
    inference.main(["-m", str(run_dir), "--data_path", str(synthetic_pets), "--device", "cpu", "--num-workers", "0",
                    "--tta", "-k", "1", "--worst", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^Test Dice: \d\.\d{4} .*horizontal-flip TTA", out, flags=re.MULTILINE)
    assert (run_dir / "test_dice_tta.csv").is_file() and (run_dir / "test_predictions_tta.png").is_file()


# ----------------------------------------------------------------------------- comparing runs


def figures(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("comparison*.png")}


def test_compare_draws_two_runs_and_prints_the_table(
    trained: tuple[Path, str], second_run: tuple[Path, bytes], capsys: pytest.CaptureFixture
) -> None:
    first, (second, _) = trained[0], second_run
    before = figures(first.parent)
    compare.main([str(first), str(second)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert "test Dice at original size" in table[0] and "GFLOPs" in table[0] and "best epoch" in table[0]
    for run, line in zip((first, second), table[2:], strict=True):
        results = json.loads((run / "results.json").read_text())
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == [run.name, "resnet34_unet", "64×64"]
        assert cells[3:6] == [f"{results['test']['dice']:.4f}", f"{results['test']['dice_original']:.4f}", "24.44"]
        assert float(cells[6]) == pytest.approx(15.61 / 16, abs=0.01), "forward GFLOPs scale with the pixels"
        assert cells[7] == str(results["epochs_run"]) and cells[9] == str(results["best_epoch"])
    (drawn,) = figures(first.parent) - before
    assert (first.parent / drawn).read_bytes().startswith(b"\x89PNG")
    assert f"Wrote {first.parent / drawn}" in out

    compare.main([str(second), str(first)])
    assert len(figures(first.parent) - before) == 2, "an earlier figure must not be overwritten"


def test_compare_refuses_a_folder_that_is_not_a_finished_run(trained: tuple[Path, str], tmp_path: Path) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "history.csv").write_text((trained[0] / "history.csv").read_text())
    before = figures(trained[0].parent)
    with pytest.raises(PetsegError, match="unfinished has no results.json"):
        compare.main([str(trained[0]), str(unfinished)])
    assert figures(trained[0].parent) == before


def test_compare_explains_itself_and_needs_two_runs(trained: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--help"])
    assert exit_info.value.code == 0 and "RUN_DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(trained[0])])
    assert exit_info.value.code == 2 and "two or more" in capsys.readouterr().err
