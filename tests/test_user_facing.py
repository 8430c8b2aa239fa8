"""What users see: their photos as they took them, help and messages that read right, figures that stay legible."""

from __future__ import annotations

import argparse
import csv
import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.ExifTags import Base

import checkpoint as ckpt
import compare
import evaluate
import inference
from models import build_model
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD, DatasetError, prepare_dataset, read_image
from plots import Case, learning_curves_figure, plot_cases, prediction_overlay

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    REPO_ROOT / "src" / "evaluate.py",
    REPO_ROOT / "src" / "inference.py",
    REPO_ROOT / "src" / "compare.py",
    REPO_ROOT / "src" / "export.py",
    REPO_ROOT / "tools" / "make_synthetic_pets.py",
    *sorted((REPO_ROOT / "benchmarks").glob("*.py")),
]


def write_run(folder: Path, epochs: int = 1) -> Path:
    """A finished run folder as train.py leaves it, with an untrained tiny UNet: enough for inference and compare."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    kwargs = {"base_channels": 4}
    weights = build_model("unet", **kwargs).state_dict()
    ckpt.save_checkpoint(
        folder / ckpt.BEST_NAME, network="unet", model_kwargs=kwargs, model_state=weights, image_size=32,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), epoch=1, valid_dice=0.5,
    )
    fields = ["epoch", "train_loss", "train_dice", "valid_loss", "valid_dice", "seconds"]
    with open(folder / "history.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for epoch in range(1, epochs + 1):
            writer.writerow({"epoch": epoch, "train_loss": 1 / epoch, "train_dice": 0.5, "valid_loss": 1 / epoch,
                             "valid_dice": 0.5, "seconds": 1.0})
    (folder / "results.json").write_text(json.dumps({"test": {"dice": 0.5, "dice_original": 0.5}, "best_epoch": 1}))
    return folder


def predict_own(run_dir: Path, source: Path, output: Path, *extra: str) -> None:
    inference.main(["-m", str(run_dir), "--input", str(source), "--output", str(output), "--num-workers", "0", *extra])


def noise(height: int, width: int) -> np.ndarray:
    """A seeded random RGB photo (H, W, 3): no symmetry can hide a wrong orientation."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- users' photos


def test_a_phone_photo_is_predicted_upright_as_its_exif_orientation_says(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run")
    photos, output = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    exif = Image.Exif()
    exif[Base.Orientation] = 6  # stored sideways: turn 90° clockwise to view
    Image.fromarray(noise(40, 60)).save(photos / "portrait.jpg", exif=exif)
    with Image.open(photos / "portrait.jpg") as stored:
        upright = np.ascontiguousarray(np.rot90(np.asarray(stored.convert("RGB")), k=-1))
    predict_own(run_dir, photos, output, "--device", "cpu")

    with Image.open(output / "portrait_mask.png") as mask_file:
        assert mask_file.size == (40, 60), "the mask must have the upright photo's width and height"
        mask = torch.from_numpy(np.array(mask_file) == 255)
    with Image.open(output / "portrait_overlay.png") as overlay:
        drawn = torch.from_numpy(np.array(overlay)).permute(2, 0, 1)
    assert torch.equal(drawn, prediction_overlay(torch.from_numpy(upright).permute(2, 0, 1), mask))
    # Dataset images are read as stored: their trimaps match the stored pixels, whatever the EXIF tag says.
    assert read_image(photos / "portrait.jpg").shape == (3, 40, 60)


@pytest.mark.parametrize(("dtype", "file_format"), [(np.uint16, "PNG"), (np.int32, "TIFF")])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(dtype: type, file_format: str, tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(dtype), (8, 1))
    path = tmp_path / f"gray.{file_format.lower()}"
    Image.fromarray(gradient).save(path, format=file_format)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I"), "the test needs Pillow to read the file back as 16- or 32-bit"
    decoded = read_image(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 8, 256)
    expected = torch.from_numpy(gradient.astype(np.float64) * 255 / 65535)
    for channel in decoded:
        assert (channel.double() - expected).abs().max() <= 0.5 + 1e-6


# ----------------------------------------------------------------------------- wrong files and folders


@pytest.mark.parametrize(
    ("write", "kind"),
    [
        (lambda path: Image.fromarray(noise(20, 30)).save(path, format="PNG"), "a PNG image"),
        (lambda path: Image.fromarray(noise(20, 30)).save(path, format="JPEG"), "a JPEG image"),
        (lambda path: path.write_text("epochs: 40\n"), "a text file"),
    ],
)
def test_a_file_that_is_no_torch_file_is_called_so_not_code(write, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    write(path)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path)
    message = str(error.value)
    assert f"it is {kind}, not a torch .pt file" in message and "train.py" in message
    assert "run code" not in message and "refused" not in message


def test_the_folder_above_the_dataset_gets_the_data_path_to_pass(synthetic_pets: Path) -> None:
    with pytest.raises(DatasetError) as error:
        prepare_dataset(synthetic_pets.parent)
    message = str(error.value)
    suggested = re.search(r"pass --data_path (\S+)", message)
    assert suggested, message
    assert Path(suggested.group(1)).resolve() == synthetic_pets.resolve()
    assert "--skip-bad" not in message and "move that folder away" not in message


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("script", ["evaluate", "inference"])
def test_predicting_on_the_cpu_is_not_called_slow_for_training(
    script: str, synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    run_dir = write_run(tmp_path / "run")
    if script == "evaluate":
        evaluate.main(["-m", str(run_dir), "--data_path", str(synthetic_pets), "--num-workers", "0"])
    else:
        Image.fromarray(noise(30, 40)).save(tmp_path / "cat.png")
        predict_own(run_dir, tmp_path / "cat.png", tmp_path / "masks")
    err = capsys.readouterr().err
    assert "CPU" in err and "prediction" in err
    assert "training" not in err


def test_inference_names_its_output_folder_as_the_user_would_type_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_dir = write_run(tmp_path / "run")
    Image.fromarray(noise(30, 40)).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    predict_own(run_dir, tmp_path / "cat.png", tmp_path / "masks", "--device", "cpu")
    out = capsys.readouterr().out
    assert re.search(r"^Wrote .* to masks$", out, flags=re.MULTILINE), out
    assert str(tmp_path) not in out


def test_compare_names_its_figure_as_the_user_would_type_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    first, second = write_run(tmp_path / "unet_a"), write_run(tmp_path / "unet_b", epochs=3)
    monkeypatch.chdir(tmp_path)
    compare.main([str(first), str(second)])
    assert "Wrote comparison.png" in capsys.readouterr().out
    assert (tmp_path / "comparison.png").is_file()


# ----------------------------------------------------------------------------- --help


class ParserBuilt(Exception):
    """Raised instead of parsing, to hand over the parser a script built."""


def script_parser(script: Path, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser `script` builds when run, taken before it parses anything, so nothing else runs."""

    def hand_over(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise ParserBuilt(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_over)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts add their imports' folders
    with pytest.raises(ParserBuilt) as built:
        runpy.run_path(str(script), run_name="__main__")
    return built.value.args[0]


def help_entries(help_text: str) -> dict[str, str]:
    """{invocation: help} of each argument in an argparse help text (entries indented 2, their help further)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):
            current, _, text = line.strip().partition("  ")
            entries[current] = text.strip()
        elif current is not None and line.startswith("   "):
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_help_explains_every_flag_and_shows_each_default_once(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    parser = script_parser(script, monkeypatch)
    assert parser.allow_abbrev is False, "prefix matching would take e.g. --epoch for --epochs"
    help_text = parser.format_help()
    assert "(default: None)" not in help_text
    entries = help_entries(help_text)
    assert "-h, --help" in entries and len(entries) >= 2
    for invocation, text in entries.items():
        assert text, f"{invocation} has no help text"
        assert text.lower().count("default") <= 1, f"{invocation}: {text}"
    by_flag = {invocation.split()[0].rstrip(","): text for invocation, text in entries.items()}
    for action in parser._actions:
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        if takes_value and action.default not in (None, argparse.SUPPRESS):
            flag = action.option_strings[0]
            assert "default" in by_flag[flag].lower(), f"{flag} hides its default"


# ----------------------------------------------------------------------------- figures


@pytest.mark.parametrize("fur", [(214, 120, 50), (245, 245, 245), (10, 10, 10)], ids=["orange", "white", "black"])
def test_the_overlay_stands_out_on_any_fur(fur: tuple[int, int, int]) -> None:
    photo = torch.tensor(fur, dtype=torch.uint8)[:, None, None].expand(3, 120, 160).clone()
    rows, columns = torch.meshgrid(torch.arange(120), torch.arange(160), indexing="ij")
    mask = (rows - 60) ** 2 + (columns - 80) ** 2 < 45**2
    overlay = prediction_overlay(photo, mask)
    distance = (overlay.double() - photo.double()).norm(dim=0)
    assert torch.equal(overlay[:, ~mask], photo[:, ~mask]), "only the predicted pet is drawn on"
    assert distance[60, 80] > 60, "the tint must show inside the pet"
    for row in range(20, 100):
        first = int(mask[row].nonzero()[0])
        assert distance[row, first : first + 4].max() > 150, f"the outline vanishes into the fur on row {row}"


def test_many_cases_wrap_into_rows_of_readable_width(tmp_path: Path) -> None:
    image = torch.from_numpy(noise(30, 40)).permute(2, 0, 1)
    truth = torch.zeros(30, 40, dtype=torch.bool)
    truth[5:25, 10:30] = True
    cases = [Case(image, truth, truth.roll(3, 1), f"case {i}") for i in range(50)]
    plot_cases([("50 random test images", cases), ("the 4 worst", cases[:4])], tmp_path / "cases.png")
    with Image.open(tmp_path / "cases.png") as figure:
        width, height = figure.size
    assert width < 2000, f"{width} pixels wide"
    assert height > width, "50 cases need several rows"


def test_a_one_epoch_run_plots_on_whole_epochs_with_train_and_valid_told_apart(tmp_path: Path) -> None:
    row = {"epoch": 1, "train_loss": 0.7, "train_dice": 0.6, "valid_loss": 0.7, "valid_dice": 0.6}
    figure = learning_curves_figure([("run", [row])])
    figure.canvas.draw()
    for ax in figure.axes:
        low, high = ax.get_xlim()
        assert low <= 0.5 and high >= 1.5, (low, high)
        labels = [label.get_text() for label in ax.get_xticklabels() if low <= label.get_position()[0] <= high]
        assert labels and all(re.fullmatch(r"\d+", label) for label in labels), labels
        markers = {line.get_linestyle(): line.get_marker() for line in ax.get_lines() if line.get_linestyle() != "None"}
        assert markers["-"] not in ("None", "", None) and markers["-"] != markers["--"], markers
