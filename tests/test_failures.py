"""Nothing trusted blindly: bad data, bad checkpoints, diverging runs and bad flags get clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as ckpt
import losses
import train
from conftest import TOY_RUN
from errors import PetsegError
from oxford_pet import DatasetError, OxfordPetSegmentation, load_sample, prepare_dataset, split_names

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["-e", "2", *TOY_RUN]


@pytest.fixture
def pets(synthetic_pets: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic dataset, free to break."""
    return shutil.copytree(synthetic_pets, tmp_path / "oxford-iiit-pet")


def first_train_name(data_path: Path) -> str:
    return split_names(data_path, "train")[-1]  # the quirk images sit at the start; take a plain one


def image_file(data_path: Path, name: str) -> Path:
    return data_path / "images" / f"{name}.jpg"


def trimap_file(data_path: Path, name: str) -> Path:
    return data_path / "annotations" / "trimaps" / f"{name}.png"


# ----------------------------------------------------------------------------- bad data


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def write_text_instead(path: Path) -> None:
    path.write_text("this is not an image\n")


def resize_trimap(path: Path) -> None:
    trimap = Image.open(path)
    trimap.resize((trimap.width + 7, trimap.height)).save(path)


def add_value_9(path: Path) -> None:
    trimap = np.array(Image.open(path))
    trimap[0, 0] = 9
    Image.fromarray(trimap).save(path)


@pytest.mark.parametrize(
    ("which", "damage", "expected"),
    [
        ("image", truncate, "cannot decode the image"),
        ("image", write_text_instead, "cannot decode the image"),
        ("image", Path.unlink, "image file is missing"),
        ("trimap", Path.unlink, "trimap file is missing"),
        ("trimap", truncate, "cannot decode the trimap"),
        ("trimap", resize_trimap, "must match its image"),
        ("trimap", add_value_9, r"found \[9\]"),
    ],
)
def test_a_bad_pair_is_an_error_naming_the_file_and_the_problem(pets: Path, which: str, damage, expected: str) -> None:
    name = first_train_name(pets)
    path = image_file(pets, name) if which == "image" else trimap_file(pets, name)
    damage(path)
    with pytest.raises(DatasetError, match=expected) as error:
        load_sample(pets, name)
    assert str(path) in str(error.value)
    dataset = OxfordPetSegmentation(pets, "train")
    with pytest.raises(DatasetError, match=expected):
        dataset[dataset.names.index(name)]


def test_split_file_naming_a_missing_image_is_refused(pets: Path) -> None:
    with open(pets / "annotations" / "test.txt", "a") as file:
        file.write("Ghost_cat_1 1 1 1\n")
    with pytest.raises(DatasetError, match="Ghost_cat_1.jpg"):
        prepare_dataset(pets)


def test_empty_split_file_is_refused(pets: Path) -> None:
    (pets / "annotations" / "trainval.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"trainval.txt is empty"):
        prepare_dataset(pets)


def test_dataset_folder_without_annotations_is_refused(pets: Path) -> None:
    shutil.rmtree(pets / "annotations")
    with pytest.raises(DatasetError, match="no annotations/ folder"):
        prepare_dataset(pets)


def test_skip_bad_leaves_out_bad_pairs_with_one_warning(pets: Path, capsys: pytest.CaptureFixture) -> None:
    names = split_names(pets, "train")
    truncate(image_file(pets, names[-1]))
    add_value_9(trimap_file(pets, names[-2]))
    dataset = OxfordPetSegmentation(pets, "train", skip_bad=True)
    assert len(dataset) == len(names) - 2
    assert names[-1] not in dataset.names and names[-2] not in dataset.names
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and names[-1] in err and names[-2] in err
    for index in range(len(dataset)):
        dataset[index]


def test_train_stops_on_a_bad_file_with_a_clear_message_even_from_a_loader_worker(pets: Path, tmp_path: Path) -> None:
    name = first_train_name(pets)
    truncate(image_file(pets, name))
    flags = [*FAST, "--num-workers", "1", "--save-dir", str(tmp_path / "runs")]
    result = subprocess.run(
        [sys.executable, str(SRC / "train.py"), "--data_path", str(pets), *flags],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{name}.jpg: cannot decode the image" in result.stderr


def test_train_with_skip_bad_trains_on_the_rest(pets: Path, tmp_path: Path) -> None:
    truncate(image_file(pets, first_train_name(pets)))
    (trimap_file(pets, split_names(pets, "test")[-1])).unlink()
    train.main(
        ["--data_path", str(pets), *FAST, "-e", "1", "--skip-bad", "--save-dir", str(tmp_path), "--run-name", "r"]
    )
    assert (tmp_path / "r" / "results.json").exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def good_checkpoint(trained: tuple[Path, str]) -> Path:
    return trained[0] / ckpt.BEST_NAME


def test_truncated_checkpoint_is_a_clear_error(good_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "best.pt"
    broken.write_bytes(good_checkpoint.read_bytes()[:100_000])
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(broken)


def test_a_file_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ckpt.CheckpointError, match="not a petseg checkpoint"):
        ckpt.load_checkpoint(other)


def test_checkpoint_of_another_format_version_is_a_clear_error(good_checkpoint: Path, tmp_path: Path) -> None:
    old = torch.load(good_checkpoint, weights_only=True)
    old["format_version"] = 0
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ckpt.CheckpointError, match="format version 0"):
        ckpt.load_checkpoint(tmp_path / "old.pt")


class WritesAFile:
    """Unpickling this runs open(): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [WritesAFile, RunsACommand])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(
    payload: type, good_checkpoint: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = torch.load(good_checkpoint, weights_only=True)
    evil["args"] = payload(marker)
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_checkpoint(tmp_path / "evil.pt")
    result = subprocess.run(
        [sys.executable, str(SRC / "inference.py"), "-m", str(tmp_path / "evil.pt"), "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 1 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists(), "the payload ran"


# ----------------------------------------------------------------------------- numbers and resources


def test_nan_loss_stops_with_epoch_step_and_advice_and_keeps_the_best(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_bce = losses.bce
    calls = []

    def nan_in_epoch_2(logits, target):
        calls.append(1)
        loss = real_bce(logits, target)
        return loss * float("nan") if len(calls) == 9 else loss  # 6 train + 1 valid batch in epoch 1

    monkeypatch.setattr(losses, "bce", nan_in_epoch_2)
    with pytest.raises(PetsegError) as error:
        train.main(["--data_path", str(synthetic_pets), *FAST, "--save-dir", str(tmp_path), "--run-name", "r"])
    message = str(error.value)
    assert "epoch 2, step 2" in message and "-lr" in message and "--no-amp" in message
    assert ckpt.load_checkpoint(tmp_path / "r")["epoch"] == 1


def test_out_of_memory_is_one_line_of_advice(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_one_epoch", out_of_memory)
    with pytest.raises(PetsegError, match=r"ran out of memory with -b 8 at --image-size 32.*smaller -b \(e.g. 4\)"):
        train.main(["--data_path", str(synthetic_pets), *FAST, "--save-dir", str(tmp_path)])


@pytest.mark.parametrize(
    "flags",
    [["-lr", "0"], ["-lr", "-1e-3"], ["-e", "0"], ["-b", "0"], ["--image-size", "16"], ["-n", "vgg"],
     ["--data_path", "/nowhere/oxford-iiit-pet"], ["--patience", "-1"], ["--num-workers", "-1"],
     ["--epoch", "2"]],
)
def test_bad_flags_exit_2_and_write_nothing(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_dir = tmp_path / "saved_models"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--save-dir", str(save_dir)])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert not save_dir.exists()
