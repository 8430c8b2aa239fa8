"""Compare two or more training runs: the lab's figure and a markdown table.

    python src/compare.py saved_models/unet_RUN saved_models/resnet34_unet_RUN [--output FIG.png]

Runs trained on different datasets are refused (their test Dice are not comparable) unless --allow-mixed-datasets.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import checkpoint as ckpt
from cli import argument_parser
from errors import PetsegError, display_path, run_script
from files import unused_path
from models import build_model
from models.stats import count_flops, count_parameters
from plots import plot_learning_curves

NEEDED_FILES = ("history.csv", "results.json")


@dataclass
class Dataset:
    """The dataset a run was trained and tested on, as far as the run says: its folder (None when the run
    predates recording it) and its splits' fingerprint (oxford_pet.split_fingerprint; None when not recorded)."""

    path: str | None
    splits: dict | None = None

    def __str__(self) -> str:
        if self.path is None:
            return "unknown"
        return display_path(Path(self.path)) if Path(self.path).is_absolute() else self.path

    def same_as(self, other: Dataset) -> bool | None:
        """Whether both are one dataset; None when the runs do not say enough to tell."""
        if self.splits is not None and other.splits is not None:
            return self.splits == other.splits  # the same split files, wherever each run found them
        if self.path is None or other.path is None:
            return None
        if self.path == other.path:
            return True
        # A relative --data_path is kept as typed, relative to wherever train.py ran: it may name the other one.
        return False if Path(self.path).is_absolute() and Path(other.path).is_absolute() else None


@dataclass
class Run:
    network: str
    image_size: int
    history: list[dict[str, float]]
    results: dict
    parameters: int
    forward_flops: int  # one image at the run's image size
    dataset: Dataset
    name: str  # the folder's name, or as much of its path as tells it from the other runs' (unique_names)

    @property
    def label(self) -> str:
        return self.name if self.network in self.name else f"{self.network} ({self.name})"


def run_dataset(results: dict, checkpoint: dict) -> Dataset:
    """The dataset of results.json's record (oxford_pet.dataset_record), else of the --data_path its flags or its
    checkpoint's hold; runs from before either say nothing."""
    record = results.get("dataset")
    if isinstance(record, dict) and isinstance(record.get("path"), str):
        return Dataset(record["path"], record.get("splits"))
    for args in (results.get("args"), checkpoint.get("args")):
        if isinstance(args, dict) and isinstance(args.get("data_path"), str):
            return Dataset(args["data_path"])  # as typed: relative to wherever train.py ran
    return Dataset(None)


def unique_names(folders: list[Path]) -> list[str]:
    """Each folder's name, or where two runs share it (`a/r` and `b/r`) the shortest end of its path no other
    run's has (`a/r`, `b/r`): the labels of a figure and a table must tell the runs apart."""
    paths = [Path(folder).resolve().parts for folder in folders]
    names = []
    for parts in paths:
        depth = next(
            (depth for depth in range(1, len(parts)) if [other[-depth:] for other in paths].count(parts[-depth:]) == 1),
            len(parts),
        )
        names.append("/".join(parts[-depth:]))
    return names


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv as numbers, one dict per epoch."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
    except (ValueError, TypeError) as error:
        raise PetsegError(f"{path} is not a history.csv written by train.py ({error}).") from error
    if not rows:
        raise PetsegError(f"{path} has no epochs.")
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows


def load_run(folder: Path, name: str) -> Run:
    """A finished run folder, labelled `name`: its history, test results and best.pt's network, measured on the
    meta device."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PetsegError(f"{folder} is not a folder; pass the run folders train.py wrote (in saved_models/).")
    missing = [name for name in NEEDED_FILES if not (folder / name).is_file()]
    if missing:
        raise PetsegError(
            f"{folder} has no {' and no '.join(missing)}: it is not a finished train.py run (results.json is "
            "written after the test evaluation at the end of training)."
        )
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PetsegError(f"{folder / 'results.json'} is not valid JSON ({error}).") from error
    if not isinstance(results, dict) or not {"test", "best_epoch"} <= results.keys():
        raise PetsegError(f"{folder / 'results.json'} lacks the test scores or best epoch train.py writes there.")
    checkpoint = ckpt.load_checkpoint(folder)
    # Counting needs shapes only: the meta device skips allocating weights and doing the arithmetic.
    with torch.device("meta"):
        model = build_model(checkpoint["network"], **checkpoint["model_kwargs"]).eval()
        flops = count_flops(model, checkpoint["image_size"])
    return Run(
        network=checkpoint["network"],
        image_size=checkpoint["image_size"],
        history=read_history(folder / "history.csv"),
        results=results,
        parameters=count_parameters(model),
        forward_flops=flops,
        dataset=run_dataset(results, checkpoint),
        name=name,
    )


def markdown_table(runs: list[Run]) -> str:
    lines = [
        "| run | network | image size | test Dice at image size | test Dice at original size | params (M) "
        "| GFLOPs/image | epochs | s/epoch | best epoch | dataset |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        test = run.results["test"]
        # Runs scored before original-size scoring existed have no such number.
        original = f"{test['dice_original']:.4f}" if "dice_original" in test else "n/a"
        seconds = sum(row["seconds"] for row in run.history) / len(run.history)
        lines.append(
            f"| {cell(run.name)} | {run.network} | {run.image_size}×{run.image_size} | {test['dice']:.4f} "
            f"| {original} | {run.parameters / 1e6:.2f} | {run.forward_flops / 1e9:.2f} | {len(run.history)} "
            f"| {seconds:.1f} | {run.results['best_epoch']} | {cell(str(run.dataset))} |"
        )
    return "\n".join(lines)


def cell(text: str) -> str:
    """Text as one markdown table cell: a `|` in a run's name or path would otherwise split it in two."""
    return text.replace("|", "\\|")


def check_one_dataset(runs: list[Run], allow_mixed: bool) -> list[str]:
    """Refuse runs of different datasets, whose test Dice are not comparable, unless allow_mixed; returns the
    warnings to print: the mix when allowed, and the runs whose dataset is unknown."""
    mixed = [
        (first, second) for i, first in enumerate(runs) for second in runs[i + 1:]
        if first.dataset.same_as(second.dataset) is False
    ]
    if mixed and not allow_mixed:
        first, second = mixed[0]
        raise PetsegError(
            f"{first.name} and {second.name} were trained on different datasets ({first.dataset} and "
            f"{second.dataset}; see the dataset column): their test Dice are not comparable. Compare runs of one "
            "dataset, or pass --allow-mixed-datasets to put them in one table anyway."
        )
    warnings = [
        "warning: the runs were trained on different datasets (see the dataset column): their test Dice are not "
        "comparable."
    ] if mixed else []
    unknown = [run.name for run in runs if run.dataset.path is None]
    if unknown:
        warnings.append(
            f"warning: {', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not record the dataset "
            "(a run from before petseg recorded it): make sure every run was trained on the same one."
        )
    return warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(
        "Compare training runs: Dice and loss per epoch on shared axes, and a markdown table of test Dice, size, "
        "compute and time."
    )
    parser.add_argument(
        "runs", type=Path, nargs="+", metavar="RUN_DIR", help="two or more finished run folders written by train.py"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None,
        help="the figure's PNG (default: comparison.png beside the first run's folder; an existing file is never "
        "overwritten)",
    )
    parser.add_argument(
        "--allow-mixed-datasets", action="store_true",
        help="compare runs trained on different datasets (refused otherwise: their test Dice are not comparable)",
    )
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give two or more run folders to compare")
    if len({run.resolve() for run in args.runs}) < len(args.runs):
        parser.error("a run folder is given more than once")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [load_run(folder, name) for folder, name in zip(args.runs, unique_names(args.runs), strict=True)]
    warnings = check_one_dataset(runs, args.allow_mixed_datasets)
    figure = unused_path(args.output or args.runs[0].resolve().parent / "comparison.png")
    plot_learning_curves(
        [(run.label, run.history) for run in runs],
        figure,
        title="train (dashed) and valid (solid) per epoch",
    )
    print(markdown_table(runs))
    print(
        "\nTest Dice at image size: mean per-image Dice with images and masks resized to the run's image size (the "
        "lab's definition, 256×256 in the lab). At original size: the logits resized to each test image's own size. "
        "GFLOPs: one forward pass of one image at the run's image size (2 FLOPs per multiply-add). s/epoch: training "
        "and validation."
    )
    for warning in warnings:
        print(f"\n{warning}", file=sys.stderr)
    print(f"\nWrote {display_path(figure)}")


if __name__ == "__main__":
    run_script(main)
