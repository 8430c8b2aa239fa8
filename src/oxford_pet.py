"""Oxford-IIIT Pet as a binary segmentation dataset: download, the lab's splits, masks and transforms."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from augment import crop_source_size
from devices import device_constant
from errors import PetsegError, display_path
from files import REPO_ROOT

DEFAULT_DATA_PATH = REPO_ROOT / "dataset" / "oxford-iiit-pet"
SPLITS = ("train", "valid", "test")
# The encoders are trained from scratch, but ImageNet statistics still centre natural photos well.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
ARCHIVE_URLS = (
    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
)

TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3


class DatasetError(PetsegError):
    """The dataset folder is missing, incomplete or holds a file that cannot be used."""


# ----------------------------------------------------------------------------- files and splits


def image_path(data_path: Path, name: str) -> Path:
    return Path(data_path) / "images" / f"{name}.jpg"


def trimap_path(data_path: Path, name: str) -> Path:
    return Path(data_path) / "annotations" / "trimaps" / f"{name}.png"


def split_file(data_path: Path, split: str) -> Path:
    return Path(data_path) / "annotations" / ("test.txt" if split == "test" else "trainval.txt")


def read_names(split_path: Path) -> list[str]:
    """Image names of an official split file, in order (each line is `NAME CLASS_ID SPECIES BREED_ID`).
    UTF-8, with or without the byte-order mark some editors add; any other encoding is a DatasetError."""
    data = Path(split_path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # without this a BOM sticks to the first name, whose files are then "missing"
    except UnicodeDecodeError as error:
        raise _not_utf8(split_path, f"byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8") from error
    if "\0" in text:  # UTF-16 without a BOM decodes as UTF-8: every other byte of ASCII text is a zero
        raise _not_utf8(split_path, "it holds zero bytes, as UTF-16 text does")
    # Universal newlines, as open() reads them: a split file saved on Windows has \r\n.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    names = [line.split(" ")[0] for line in lines if line.strip()]
    if not names:
        raise DatasetError(f"the split file {split_path} is empty; it should list one image name per line.")
    return names


def _not_utf8(split_path: Path, why: str) -> DatasetError:
    return DatasetError(
        f"the split file {display_path(split_path)} is not UTF-8 text ({why}): open it in a text editor and save "
        "it as UTF-8 (the official file is plain ASCII), or download the dataset afresh."
    )


def split_names(data_path: Path, split: str) -> list[str]:
    """The lab's split: trainval line i goes to valid when i % 10 == 0, else to train; test is test.txt."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = read_names(split_file(data_path, split))
    if split == "test":
        return names
    return [name for i, name in enumerate(names) if (i % 10 == 0) == (split == "valid")]


def check_split_overlap(data_path: Path) -> None:
    """Refuse splits that share images, listing the names. A name in both trainval.txt and test.txt is trained on
    and then scored as unseen (leakage); a name twice in one file lands in both train and valid, or weighs twice
    in a mean: so a repeat is refused too, rather than warned of, since either way the number is not what it says."""
    trainval_path, test_path = split_file(data_path, "train"), split_file(data_path, "test")
    trainval, test = read_names(trainval_path), read_names(test_path)
    problems = [
        f"{display_path(path)} lists {_listed(repeated)} more than once"
        for path, names in ((trainval_path, trainval), (test_path, test))
        if (repeated := [name for name, count in Counter(names).items() if count > 1])
    ]
    in_test = set(test)
    leaked = [name for name in dict.fromkeys(trainval) if name in in_test]
    if leaked:
        problems.append(
            f"{_listed(leaked)} {'is' if len(leaked) == 1 else 'are'} in both {display_path(trainval_path)} "
            f"(training and validation) and {display_path(test_path)} (test): the test score would count images "
            "the model was trained on"
        )
    if problems:
        raise DatasetError(
            "the split files do not keep the splits apart:\n" + "\n".join(f"  {problem}" for problem in problems)
            + "\nEach image belongs in one split file, once: remove the extra lines, or download the dataset afresh."
        )


def _listed(names: list[str], shown: int = 10) -> str:
    """`3 names: a, b, c`, with at most `shown` of them spelled out."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} name{'s' if len(names) > 1 else ''} ({', '.join(names[:shown])}{more})"


def split_fingerprint(data_path: Path) -> dict[str, dict[str, int | str]]:
    """Per split (train, valid, test): {"images": its count, "sha256": the hash of its names in order, one a
    line, in UTF-8}. An inserted, removed, renamed or reordered line changes the lab's split even when the
    count stays, and changes the hash with it."""
    return {split: _names_fingerprint(split_names(data_path, split)) for split in SPLITS}


def _names_fingerprint(names: list[str]) -> dict[str, int | str]:
    return {"images": len(names), "sha256": hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()}


def dataset_record(data_path: Path) -> dict[str, object]:
    """What a run's numbers depend on in the data, for results.json and checkpoints: {"path": the resolved
    absolute folder, "splits": split_fingerprint}. compare.py reads it back to tell datasets apart."""
    return {"path": str(Path(data_path).resolve()), "splits": split_fingerprint(data_path)}


def split_differences(recorded: dict, current: dict) -> list[str]:
    """How the splits of split_fingerprint `current` differ from `recorded` ones, a sentence each; [] when the same."""
    differences = []
    for split in SPLITS:
        before, now = recorded.get(split), current.get(split)
        if before == now:
            continue
        if before is None or now is None:
            differences.append(f"the {split} split is {'not recorded' if before is None else 'missing now'}")
        elif before["images"] != now["images"]:
            differences.append(f"the {split} split had {before['images']} images and now has {now['images']}")
        else:
            differences.append(
                f"the {split} split has the same number of images ({now['images']}) but other names or another order"
            )
    return differences


def missing_files(data_path: Path) -> list[Path]:
    """Files the dataset needs that are not there: both split files and every pair they name."""
    split_paths = [split_file(data_path, "train"), split_file(data_path, "test")]
    missing = [path for path in split_paths if not path.is_file()]
    if missing:
        return missing
    for path in split_paths:
        for name in read_names(path):
            missing += [p for p in (image_path(data_path, name), trimap_path(data_path, name)) if not p.is_file()]
    return missing


def describe_missing(data_path: Path, missing: list[Path]) -> str:
    if not (data_path / "annotations").is_dir():
        return (
            f"{display_path(data_path)} has no annotations/ folder "
            "(it should hold trainval.txt, test.txt and trimaps/)."
        )
    listed = "\n".join(f"  {path}" for path in missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (
        f"the dataset folder {display_path(data_path)} is incomplete: the split files name files that are not "
        f"there:\n{listed}{more}"
    )


def manual_download_help(data_path: Path) -> str:
    urls = "\n".join(f"  {url}" for url in ARCHIVE_URLS)
    folder = display_path(data_path)
    return (
        f"Download the two archives of the Oxford-IIIT Pet dataset ({HOMEPAGE}):\n{urls}\n"
        f"and unpack both into {folder}, so that it holds images/ and annotations/:\n"
        f"  mkdir -p {folder} && tar -xzf images.tar.gz -C {folder} && tar -xzf annotations.tar.gz -C {folder}"
    )


def prepare_dataset(data_path: Path = DEFAULT_DATA_PATH, download: bool = True, skip_bad: bool = False) -> Path:
    """Make sure a complete dataset is at `data_path`, downloading it (MD5-checked) into an empty
    or missing folder. With skip_bad, pairs the split files name but that are missing are left to
    the dataset to skip; a folder without split files is refused all the same."""
    data_path = Path(data_path).resolve()
    if data_path.is_dir() and any(data_path.iterdir()):
        missing = missing_files(data_path)
        if missing and not (skip_bad and all(path.suffix != ".txt" for path in missing)):
            # The folder above the dataset (e.g. dataset/ rather than dataset/oxford-iiit-pet/) is no cut-off download.
            nested = [] if (data_path / "annotations").is_dir() else [
                folder for folder in sorted(data_path.iterdir())
                if (folder / "images").is_dir() and (folder / "annotations").is_dir()
            ]
            if nested:
                choices = " or ".join(f"--data_path {display_path(folder)}" for folder in nested)
                raise DatasetError(
                    f"{display_path(data_path)} is not the dataset folder but holds one: pass {choices} "
                    "(the folder with images/ and annotations/ in it)."
                )
            raise DatasetError(
                f"{describe_missing(data_path, missing)}\n"
                "A download or unpacking may have been cut off: move that folder away and run again to download "
                f"it afresh, or pass --skip-bad to train without the missing pairs.\n{manual_download_help(data_path)}"
            )
        return data_path
    if not download:
        why = "the folder is empty" if data_path.is_dir() else "no such folder"
        raise DatasetError(
            f"--data_path {display_path(data_path)}: no dataset there ({why}). Check the path: it is the folder "
            "holding images/ and annotations/. Only train.py downloads the dataset (on its first run, without "
            f"--no-download, into {display_path(DEFAULT_DATA_PATH)}); to set it up elsewhere:\n"
            f"{manual_download_help(data_path)}"
        )
    _download(data_path)
    return data_path


def _download(data_path: Path) -> None:
    """Download into a staging folder and move it into place only once complete, so a cut-off
    download never looks like a dataset."""
    staging = data_path.parent / f".{data_path.name}.download"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"Downloading the Oxford-IIIT Pet dataset (about 800 MB) to {display_path(data_path)} ...")
    try:
        datasets.OxfordIIITPet(root=staging, target_types="segmentation", download=True)
    except Exception as error:  # noqa: BLE001 - network, disk and checksum failures all get the same advice
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(
            f"could not download the dataset ({type(error).__name__}: {error}).\n{manual_download_help(data_path)}"
        ) from error
    downloaded = staging / "oxford-iiit-pet"
    missing = missing_files(downloaded)
    if missing:
        raise DatasetError(f"the downloaded dataset in {downloaded} lacks {missing[0]} (and maybe more).")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    if data_path.exists():
        data_path.rmdir()  # only ever an empty folder here: prepare_dataset returned early otherwise
    downloaded.rename(data_path)
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- decoding

# Pillow refuses images of more than twice Image.MAX_IMAGE_PIXELS (about 179 megapixels) as possible
# decompression bombs; this environment variable sets that limit for a user who trusts their files.
PIXEL_LIMIT_VARIABLE = "PETSEG_MAX_IMAGE_PIXELS"


def open_image(path: Path) -> Image.Image:
    """Image.open with the pixel limit of PETSEG_MAX_IMAGE_PIXELS; an image over Pillow's guard against
    decompression bombs raises DatasetError naming the file and how to lift the limit."""
    text = os.environ.get(PIXEL_LIMIT_VARIABLE)
    if text is not None:
        if not text.strip().isdigit():
            raise DatasetError(
                f"{PIXEL_LIMIT_VARIABLE}={text!r} is not a number of pixels: set it to a whole number such as "
                "300000000, or to 0 for no limit."
            )
        Image.MAX_IMAGE_PIXELS = int(text) or None  # Pillow refuses twice this; None turns the guard off
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise too_big(path, error) from error


def too_big(path: Path, error: Image.DecompressionBombError) -> DatasetError:
    """The error for an image over Pillow's guard against decompression bombs (at open, or at decoding a frame)."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(error))
    pixels, limit = (int(number) for number in found.groups()) if found else (300_000_000, None)
    why = f"it has {pixels:,} pixels, more than the {limit:,} Pillow opens" if found else str(error)
    return DatasetError(
        f"{path}: the image is too big to open safely ({why}: a guard against decompression bombs). If you "
        f"trust the file, lift the limit: set the environment variable {PIXEL_LIMIT_VARIABLE}={pixels} (a "
        "number of pixels; 0 for no limit) and run again."
    )


def read_image(path: Path, exif_orientation: bool = False) -> torch.Tensor:
    """RGB uint8 (3, H, W) from any file Pillow reads, whatever its mode (gray, RGBA, palette, CMYK, 16-bit) or suffix.
    exif_orientation turns it upright as its EXIF tag says, as photo viewers do, for users' photos (phones store
    portrait ones sideways); the dataset's images are read as stored, since their trimaps are."""
    try:
        with open_image(path) as image:
            if exif_orientation:  # in place: a 48-megapixel photo is 144 MB, and no copy waits beside it
                ImageOps.exif_transpose(image, in_place=True)
            if image.mode.startswith("I"):  # 16- or 32-bit integers, which convert("RGB") would clip, mostly to white
                image = image.convert("I")
                # Pillow opens 16-bit PNGs and TIFFs as "I;16" or "I"; only a genuinely 32-bit image goes past 65535.
                full_scale = 65535 if image.getextrema()[1] <= 65535 else 2**31 - 1
                image = image.point(lambda value: value * 255 / full_scale).convert("L")
            return v2.functional.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: image file is missing.") from error
    except Image.DecompressionBombError as error:  # a frame decoded past the limit (GIF, TIFF)
        raise too_big(path, error) from error
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for corrupt or truncated files
        raise DatasetError(
            f"{path}: cannot decode the image ({error}); the file is corrupt, truncated or not an image."
        ) from error


def read_trimap(path: Path) -> torch.Tensor:
    """The trimap's values as uint8 (1, H, W); anything but 1, 2 and 3 is an error."""
    try:
        with open_image(path) as image:
            trimap = v2.functional.pil_to_tensor(image)
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: trimap file is missing.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(
            f"{path}: cannot decode the trimap ({error}); the file is corrupt, truncated or not a PNG."
        ) from error
    if trimap.shape[0] != 1 or trimap.dtype != torch.uint8:
        raise DatasetError(
            f"{path}: a trimap must be single-channel 8-bit; got {trimap.shape[0]} channel(s) of {trimap.dtype}."
        )
    bad = (trimap < TRIMAP_PET) | (trimap > TRIMAP_BORDER)
    if bad.any():
        values = trimap[bad].unique().tolist()[:5]  # unique() sorts them
        raise DatasetError(f"{path}: trimap values must be 1 (pet), 2 (background) or 3 (border); found {values}.")
    return trimap


def load_sample(data_path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The named pair at its own size: RGB uint8 (3, H, W) and binary mask uint8 (1, H, W)."""
    image = read_image(image_path(data_path, name))
    trimap_file = trimap_path(data_path, name)
    trimap = read_trimap(trimap_file)
    if image.shape[1:] != trimap.shape[1:]:
        raise DatasetError(
            f"{trimap_file}: trimap is {trimap.shape[2]}x{trimap.shape[1]} but its image is "
            f"{image.shape[2]}x{image.shape[1]}; a trimap must match its image pixel for pixel."
        )
    return image, trimap_to_mask(trimap)


def trimap_to_mask(trimap: torch.Tensor) -> torch.Tensor:
    """Binary mask, uint8: pet (1) and border (3) are pet; background (2) is not."""
    return ((trimap == TRIMAP_PET) | (trimap == TRIMAP_BORDER)).to(torch.uint8)


# ----------------------------------------------------------------------------- transforms


def build_transform(
    train: bool, image_size: int = 256, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
    crop_source: int | None = None,
) -> v2.Transform:
    """The transform of (Image, Mask) pairs. Eval squashes to image_size and gives a normalised float image and a
    float {0, 1} mask. Train squashes to crop_source (augment.crop_source_size when None) and keeps uint8, as the
    decode-once cache stores it: batches.TrainBatches augments both sources alike on the training device."""
    if train:
        source = crop_source_size(image_size) if crop_source is None else crop_source
        return v2.Resize((source, source), antialias=True)
    return v2.Compose([
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32, "others": None}, scale=True),
        v2.Lambda(partial(normalize, mean=tuple(mean), std=tuple(std)), tv_tensors.Image),
    ])


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Images in [0, 1] as model input, (images - mean) / std per channel, for one image (C, H, W) or a batch:
    the one normaliser of every path (per image, cached, augmented, ensembles)."""
    return (images - device_constant(tuple(mean), images.device)[0]) / device_constant(tuple(std), images.device)[0]


def denormalize(
    images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """normalize undone: model input back to images in [0, 1]."""
    return images * device_constant(tuple(std), images.device)[0] + device_constant(tuple(mean), images.device)[0]


# ----------------------------------------------------------------------------- dataset


class OxfordPetSegmentation(Dataset):
    """(image, mask) pairs of one split, as its transform makes them. A pair that cannot be used raises
    DatasetError naming the file; with skip_bad every pair is decoded up front and the bad ones left out."""

    def __init__(
        self, data_path: Path, split: str, transform: v2.Transform | None = None, skip_bad: bool = False
    ) -> None:
        self.data_path = Path(data_path)
        self.split = split
        self.transform = transform
        self.names = split_names(self.data_path, split)
        if skip_bad:
            bad = {}  # name: its problem
            for name in tqdm(self.names, desc="checking files", leave=False, dynamic_ncols=True):
                try:
                    load_sample(self.data_path, name)
                except DatasetError as error:
                    bad[name] = str(error)
            if bad:
                problems = "".join(f"\n  {problem}" for problem in bad.values())
                print(f"warning: skipping {len(bad)} bad pair(s) of the {split} split:{problems}", file=sys.stderr)
                self.names = [name for name in self.names if name not in bad]
            if not self.names:
                raise DatasetError(f"no usable pair is left in the {split} split of {self.data_path}.")

    def __len__(self) -> int:
        return len(self.names)

    def load_pair(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed image and binary mask, at the image's own size."""
        image, mask = load_sample(self.data_path, self.names[index])
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load_pair(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def load_dataset(
    data_path: Path, mode: str, image_size: int = 256, skip_bad: bool = False, crop_source: int | None = None
) -> OxfordPetSegmentation:
    """The lab template's entry point: the `mode` split with the recipe's transform (build_transform)."""
    transform = build_transform(train=mode == "train", image_size=image_size, crop_source=crop_source)
    return OxfordPetSegmentation(data_path, mode, transform, skip_bad=skip_bad)
