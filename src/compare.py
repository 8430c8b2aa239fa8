"""Compare two or more training runs: the lab's figure and a markdown table.

    python src/compare.py saved_models/unet_RUN saved_models/resnet34_unet_RUN [--output FIG.png]

The figure has train and valid Dice and loss per epoch of every run on shared axes; the table
has each run's test Dice (at the model's input size, the lab's definition, and at each image's
own size), parameters, forward GFLOPs per image, epochs, time per epoch and best epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
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
class Run:
    folder: Path
    network: str
    image_size: int
    history: list[dict[str, float]]
    results: dict
    parameters: int
    forward_flops: int  # one image at the run's image size

    @property
    def label(self) -> str:
        name = self.folder.name
        return name if self.network in name else f"{self.network} ({name})"


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv as numbers, one dict per epoch."""
    try:
        with open(path, newline="") as file:
            rows = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
    except (ValueError, TypeError) as error:
        raise PetsegError(f"{path} is not a history.csv written by train.py ({error}).") from error
    if not rows:
        raise PetsegError(f"{path} has no epochs.")
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows


def load_run(folder: Path) -> Run:
    """A finished run folder: its history, test results and best.pt's network, measured on the meta device."""
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
        results = json.loads((folder / "results.json").read_text())
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
        folder=folder,
        network=checkpoint["network"],
        image_size=checkpoint["image_size"],
        history=read_history(folder / "history.csv"),
        results=results,
        parameters=count_parameters(model),
        forward_flops=flops,
    )


def markdown_table(runs: list[Run]) -> str:
    lines = [
        "| run | network | image size | test Dice at image size | test Dice at original size | params (M) "
        "| GFLOPs/image | epochs | s/epoch | best epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        test = run.results["test"]
        # Runs scored before original-size scoring existed have no such number.
        original = f"{test['dice_original']:.4f}" if "dice_original" in test else "n/a"
        seconds = sum(row["seconds"] for row in run.history) / len(run.history)
        lines.append(
            f"| {run.folder.name} | {run.network} | {run.image_size}×{run.image_size} | {test['dice']:.4f} "
            f"| {original} "
            f"| {run.parameters / 1e6:.2f} | {run.forward_flops / 1e9:.2f} | {len(run.history)} | {seconds:.1f} "
            f"| {run.results['best_epoch']} |"
        )
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give two or more run folders to compare")
    if len({run.resolve() for run in args.runs}) < len(args.runs):
        parser.error("a run folder is given more than once")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [load_run(folder) for folder in args.runs]
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
    print(f"\nWrote {display_path(figure)}")


if __name__ == "__main__":
    run_script(main)
