"""Run a checkpoint on your own photos, or score it on the test split and show its best and worst work.

    python src/inference.py -m saved_models/RUN --input photos/ --output masks/   # your images
    python src/inference.py -m saved_models/RUN                                   # the test split

Photos are turned upright as their EXIF says and masked at their own size (NAME_mask.png, NAME_overlay.png);
the test split is scored as train.py scores it, with test_dice.csv and test_predictions.png beside the checkpoint.
See docs/predicting.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from cli import argument_parser, non_negative
from errors import PetsegError, display_path, run_script
from evaluate import (
    EvalResult,
    Predictor,
    add_eval_args,
    load_for_eval,
    mask_at_size,
    out_of_memory_advice,
    predict_logits,
    score_split,
)
from files import atomic_write, unused_path
from oxford_pet import OxfordPetSegmentation, build_transform, open_image, read_image
from plots import Case, plot_cases, prediction_overlay

MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(
        "Predict pet masks on your own images (--input), or score a petseg checkpoint on the test split and draw "
        "its predictions."
    )
    add_eval_args(parser)
    own = parser.add_argument_group("your own images")
    own.add_argument(
        "--input", type=Path, default=None,
        help="an image file, or a folder of them (not searched recursively); no dataset needed",
    )
    own.add_argument(
        "--output", type=Path, default=None, help="folder for NAME_mask.png and NAME_overlay.png (created if missing)"
    )
    own.add_argument("--overwrite", action="store_true", help="replace outputs already in --output instead of refusing")
    test = parser.add_argument_group("test split")
    test.add_argument("-k", "--num-images", type=non_negative, default=4, help="random test images shown in the figure")
    test.add_argument(
        "--worst", type=non_negative, default=4, help="test images with the lowest Dice shown in the figure"
    )
    test.add_argument("--seed", type=int, default=0, help="which random test images the figure shows")
    test.add_argument(
        "--figure", type=Path, default=None,
        help="where to write the PNG (default: test_predictions.png beside the checkpoint; an existing file is never "
        "overwritten)",
    )
    args = parser.parse_args(argv)
    if (args.input is None) != (args.output is None):
        parser.error("--input and --output go together: images from --input, masks and overlays to --output")
    if args.overwrite and args.input is None:
        parser.error("--overwrite applies to --input/--output only; test-split files are never overwritten")
    return args


def model_input(photo: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    """A uint8 photo (3, H, W) as the model takes it: resized to its input size and normalised."""
    return transform(tv_tensors.Image(photo)).as_subclass(torch.Tensor)


# ----------------------------------------------------------------------------- your own images


def is_image(path: Path) -> bool:
    """Whether Pillow recognises the file as an image (it reads only the header here); one too big to open
    safely raises DatasetError saying how to lift the limit, before anything is written."""
    try:
        with open_image(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def find_images(input_path: Path, output_dir: Path) -> list[Path]:
    """The images to predict: the file itself, or a folder's image files in name order (others skipped, warned of)."""
    if not input_path.exists():
        raise PetsegError(f"--input {input_path} does not exist.")
    if input_path.is_file():
        if not is_image(input_path):
            raise PetsegError(f"--input {input_path} is not an image file that Pillow can read (JPEG, PNG, ...).")
        return [input_path]
    if output_dir.resolve() == input_path.resolve():
        raise PetsegError(
            f"--output is the --input folder {input_path}; write the masks to another folder, or a later run "
            "would take them for photos."
        )
    files = sorted(path for path in input_path.iterdir() if path.is_file())
    images, skipped = [], []
    # One pass, each file's header read once: a folder of tens of thousands takes a while on a network drive.
    for path in tqdm(files, desc="finding images", unit="file", leave=False, dynamic_ncols=True):
        (images if is_image(path) else skipped).append(path)
    if skipped:
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        print(
            f"warning: skipping {len(skipped)} file(s) in {input_path} that are not images: "
            f"{', '.join(path.name for path in skipped[:10])}{more}",
            file=sys.stderr,
        )
    if not images:
        raise PetsegError(f"--input {input_path} holds no image file that Pillow can read (JPEG, PNG, ...).")
    return images


def output_paths(images: list[Path], output_dir: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths of each image; two photos whose names differ only in suffix are an error."""
    owners: dict[str, Path] = {}
    for image in images:
        if image.stem in owners:
            raise PetsegError(
                f"{owners[image.stem].name} and {image.name} would both be saved as {image.stem}{MASK_SUFFIX}; "
                "rename one of them."
            )
        owners[image.stem] = image
    return [
        (output_dir / f"{image.stem}{MASK_SUFFIX}", output_dir / f"{image.stem}{OVERLAY_SUFFIX}") for image in images
    ]


def check_outputs_are_free(paths: list[tuple[Path, Path]], output_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, when --output is a file or already holds one of the outputs."""
    if output_dir.exists() and not output_dir.is_dir():
        raise PetsegError(f"--output {output_dir} is a file; it must be a folder (it is created if missing).")
    existing = [path for pair in paths for path in pair if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the outputs)" if len(existing) > 1 else ""
        raise PetsegError(
            f"{existing[0]} already exists{more}; nothing was written. Pass --overwrite to replace the "
            "outputs, or choose another --output."
        )


@dataclass
class PhotoInputs(Dataset):
    """Each photo decoded, turned upright and made model input in a DataLoader worker, which hands over only
    that (3, S, S) tensor and the photo's size (H, W): a batch in waiting holds no photo, however big."""

    paths: list[Path]
    transform: v2.Transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        photo = read_image(self.paths[index], exif_orientation=True)
        return model_input(photo, self.transform), torch.tensor(photo.shape[-2:])


def write_png(image: torch.Tensor, path: Path) -> None:
    """A uint8 tensor (1 or 3, H, W) as a grayscale or RGB PNG, atomically."""
    # Not durable: a disk flush per file (two per photo) made a folder of 20,000 photos wait minutes on the disk,
    # while the rename alone keeps each output whole or absent when the process dies; only a power cut could
    # then cost an output, and predicting it again (--overwrite) makes it anew, unlike a checkpoint.
    with atomic_write(path, durable=False) as file:
        # Level 1 of zlib: a photo-sized PNG in a third of the default's time, about 10 % bigger.
        Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()).save(file, format="PNG", compress_level=1)


def predict_files(args: argparse.Namespace) -> None:
    images = find_images(args.input, args.output)
    paths = output_paths(images, args.output)
    check_outputs_are_free(paths, args.output, args.overwrite)
    predictor = load_for_eval(args)
    size = predictor.first["image_size"]
    print(predictor.describe())
    print(
        f"{len(images)} image(s) predicted at {size}×{size}{' with horizontal-flip TTA' if args.tta else ''}, "
        "masks at each image's own size"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    transform = build_transform(False, size, tuple(predictor.first["mean"]), tuple(predictor.first["std"]))
    loader = DataLoader(PhotoInputs(images, transform), batch_size=args.batch_size, num_workers=args.num_workers)
    pending = iter(zip(images, paths, strict=True))
    with tqdm(total=len(images), unit="img", desc="predicting", dynamic_ncols=True) as progress:
        for inputs, sizes in loader:
            logits = predict_logits(predictor.model, inputs.to(predictor.device), predictor.amp, args.tta)
            # One photo at a time from here: its mask, then the photo read again (no worker kept it) for its overlay.
            for logit, photo_size, (image, (mask_path, overlay_path)) in zip(
                logits, sizes.tolist(), pending, strict=False  # pending holds the photos of later batches too
            ):
                mask = mask_at_size(logit, photo_size).cpu()
                write_png(mask[None].to(torch.uint8) * 255, mask_path)
                write_png(prediction_overlay(read_image(image, exif_orientation=True), mask), overlay_path)
                progress.update()
    print(
        f"Wrote {len(images)} mask(s) (*{MASK_SUFFIX}, 0 or 255) and overlay(s) (*{OVERLAY_SUFFIX}) to "
        f"{display_path(args.output)}"
    )


# ----------------------------------------------------------------------------- the test split


def write_per_image_csv(names: list[str], result: EvalResult, path: Path) -> None:
    """One row per image: its size, Dice at the model's input size and at its own size, pet pixels."""
    with atomic_write(path, "w") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "width", "height", "dice", "dice_original", "pet_pixels", "predicted_pixels"])
        for name, dice, original in zip(names, result.per_image_dice, result.per_image_original, strict=True):
            writer.writerow([
                name, original.width, original.height, f"{dice:.6f}", f"{original.dice:.6f}", original.pet_pixels,
                original.predicted_pixels,
            ])


def pick_cases(dices: list[float], random_count: int, worst_count: int, seed: int) -> tuple[list[int], list[int]]:
    """Indexes of seeded random images and of the worst ones (lowest Dice first); no image is in both."""
    worst = sorted(range(len(dices)), key=lambda i: dices[i])[:worst_count]
    taken = set(worst)
    rest = [i for i in range(len(dices)) if i not in taken]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:random_count]
    return sorted(rest[i] for i in order.tolist()), worst


def figure_cases(
    predictor: Predictor, dataset: OxfordPetSegmentation, indexes: list[int], result: EvalResult, tta: bool
) -> list[Case]:
    """The chosen test images at their own size, with their masks and a caption giving both Dice scores."""
    if not indexes:
        return []
    pairs = [dataset.load_pair(i) for i in indexes]
    inputs = torch.stack([model_input(photo, dataset.transform) for photo, _ in pairs]).to(predictor.device)
    logits = predict_logits(predictor.model, inputs, predictor.amp, tta)
    return [
        Case(
            photo.as_subclass(torch.Tensor),
            truth[0].bool(),
            mask_at_size(logit, photo.shape[-2:]).cpu(),
            f"{dataset.names[i]}\nDice {result.per_image_dice[i]:.3f} at {result.size_label}, "
            f"{result.per_image_original[i].dice:.3f} full size",
        )
        for i, (photo, truth), logit in zip(indexes, pairs, logits, strict=True)
    ]


def score_test_split(args: argparse.Namespace) -> None:
    predictor = load_for_eval(args)
    dataset, result = score_split(args, predictor, "test")

    # Beside the (first) checkpoint; an ensemble's files are named apart from its first model's own.
    run_dir = predictor.paths[0].parent
    tag = ("_ensemble" if len(predictor.paths) > 1 else "") + ("_tta" if args.tta else "")
    table = unused_path(run_dir / f"test_dice{tag}.csv")
    write_per_image_csv(dataset.names, result, table)

    # The figure shows images at full size, so "worst" is judged there too.
    dices = [score.dice for score in result.per_image_original]
    random_picks, worst = pick_cases(dices, args.num_images, args.worst, args.seed)
    if not random_picks and not worst:
        print(f"Wrote {display_path(table)} (Dice of each test image)")
        return
    figure = unused_path(args.figure or run_dir / f"test_predictions{tag}.png")
    plot_cases(
        [
            (f"{len(random_picks)} random test images (seed {args.seed})",
             figure_cases(predictor, dataset, random_picks, result, args.tta)),
            (f"the {len(worst)} worst test images (lowest Dice at full size)",
             figure_cases(predictor, dataset, worst, result, args.tta)),
        ],
        figure,
        title=f"{'ensemble' if len(predictor.paths) > 1 else predictor.first['network']}: "
        f"test Dice {result.dice:.4f} at {result.size_label}, {result.dice_original:.4f} at full size"
        f"{', horizontal-flip TTA' if args.tta else ''}",
    )
    print(f"Wrote {display_path(table)} (Dice of each test image) and {display_path(figure)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with out_of_memory_advice(args.batch_size):
        if args.input is not None:
            predict_files(args)
        else:
            score_test_split(args)


if __name__ == "__main__":
    run_script(main)
