"""What an epoch's bookkeeping costs beside its training, per network, and what the full run takes with it.

    python benchmarks/bookkeeping_speed.py                 # both networks at the recipe's sizes: 256², batch 32
    python benchmarks/bookkeeping_speed.py --image-size 64 -b 4 --valid-images 32 --steps 2   # a CPU, small sizes

Times, per network, on random images (the content changes no timing): a training step (tools/train_speed.py:
train.train_one_epoch over the cached loader, train.py's defaults); validation (evaluate.evaluate over a
cached valid split of --valid-images); saving last.pt (the weights, AdamW's moments and the training state, as
run_state builds them) and best.pt with checkpoint.save_checkpoint; drawing curves.png of a 200-epoch
history; writing history.csv. Each write is timed --repeats times after one untimed, in --dir, which should
be on the disk runs write to. Then projects the full run (200 epochs, 3312 train / 368 valid images, the
valid pass scaled from --valid-images) with its bookkeeping two ways: every epoch and on the training thread
(train.py before src/bookkeeping.py), and as src/bookkeeping.py does it: history.csv and a host copy of the
state (HostCopy, timed here) every epoch, curves.png at most once per --save-every seconds and at the end, on
the training thread; last.pt after the first epoch, then at most once per interval and at the end, and best.pt
on the --improved share of epochs (an assumption: how often the valid Dice improves), written by a thread of
their own, which holds training up only when a write outlasts the epoch after it.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from argparse import ArgumentTypeError, Namespace
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

import checkpoint as ckpt  # noqa: E402
import run_state  # noqa: E402
import train_speed  # noqa: E402
from augment import crop_source_size  # noqa: E402
from batches import EvalBatches, TrainBatches  # noqa: E402
from bookkeeping import DEFAULT_SAVE_EVERY, HostCopy, write_history  # noqa: E402
from cache import CachedSplit  # noqa: E402
from cli import argument_parser, positive  # noqa: E402
from devices import default_amp, select_device  # noqa: E402
from errors import display_path, run_script  # noqa: E402
from evaluate import evaluate  # noqa: E402
from files import atomic_write  # noqa: E402
from models import MODEL_NAMES  # noqa: E402
from plots import plot_learning_curves  # noqa: E402
from train_speed import FULL_TRAIN_IMAGES, FULL_VALID_IMAGES, NORMALISATION, RECIPE_EPOCHS  # noqa: E402

BOOKKEEPING_TARGET = 0.03  # the ceiling: bookkeeping at most 3 % of a run


@dataclass
class Measured:
    """Seconds per call (median of the repeats) of one network's training step and bookkeeping."""

    network: str
    step: float
    validation: float
    last: float
    best: float
    figure: float
    history: float
    last_bytes: int
    best_bytes: int
    host_copy: float = 0.0  # bookkeeping.HostCopy of last.pt's contents, as the training thread takes it


def synthetic_split(n_images: int, size: int) -> CachedSplit:
    """Random uint8 images and 0/1 masks in the cache's layout."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, 2, (n_images, 1, size, size), dtype=torch.uint8, generator=generator)
    return CachedSplit(images, masks, [f"image_{index}" for index in range(n_images)])


def history_rows(epochs: int) -> list[dict]:
    """A run's history.csv rows, as many as a full run writes."""
    return [
        {"epoch": epoch, "lr": 1e-3, "train_loss": 1 / epoch, "train_dice": 1 - 1 / (epoch + 1),
         "valid_loss": 1 / epoch, "valid_dice": 1 - 1 / (epoch + 2), "valid_dataset_dice": 0.9, "valid_iou": 0.8,
         "seconds": 1.0}
        for epoch in range(1, epochs + 1)
    ]


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls, after one untimed (first-call costs: imports, allocations, autotuning)."""
    run()
    times = []
    for _ in range(repeats):
        train_speed.synchronize(device)
        start = time.perf_counter()
        run()
        train_speed.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, device: torch.device, args: Namespace, folder: Path) -> Measured:
    """One network's training step, validation and writes, as train.py makes them for a run with its defaults."""
    cuda = device.type == "cuda"
    setup = train_speed.Setup(amp=default_amp(device), cudnn_benchmark=cuda)
    with train_speed.configured(setup):
        split = synthetic_split(args.steps * args.batch_size, crop_source_size(args.image_size))
        # Where train.py keeps a cache that fits: in the GPU's memory on CUDA.
        cache = next(iter(train_speed.cache_placements(split, device).values()))
        loader = TrainBatches(cache, args.batch_size, device, args.image_size, *NORMALISATION)
        training = train_speed.make_training(name, device, setup, loader)
        step, _ = train_speed.time_epoch(training, loader, args.warmup_steps)
        valid = synthetic_split(args.valid_images, args.image_size)
        valid_loader = EvalBatches(valid.to(device) if cuda else valid, args.batch_size, device, *NORMALISATION)
        trainer = training.trainer
        validation = median_seconds(
            lambda: evaluate(trainer.validated(), valid_loader, device, amp=setup.amp, loss_fn=training.loss_fn),
            args.repeats, device,
        )
    flags = train_speed.default_flags(name)
    flags.image_size, flags.batch_size = args.image_size, args.batch_size
    history = history_rows(RECIPE_EPOCHS)
    progress = run_state.Progress(history, best_dice=0.9, best_epoch=RECIPE_EPOCHS, finished_epoch=RECIPE_EPOCHS)

    def contents() -> dict:
        return run_state.checkpoint_contents(flags, trainer.validated(), RECIPE_EPOCHS, 0.9, setup.amp)

    def save_last() -> None:
        training_state = run_state.training_state(trainer, progress)
        ckpt.save_checkpoint(folder / ckpt.LAST_NAME, **contents(), training=training_state)

    host = HostCopy(device)

    def copy_to_host() -> None:
        host.take({**contents(), "training": run_state.training_state(trainer, progress)}, RECIPE_EPOCHS)
        host.ready()

    title = f"{name}: train (dashed) and valid (solid)"
    return Measured(
        network=name, step=step, validation=validation,
        last=median_seconds(save_last, args.repeats, device),
        best=median_seconds(lambda: ckpt.save_checkpoint(folder / ckpt.BEST_NAME, **contents()), args.repeats, device),
        figure=median_seconds(
            lambda: plot_learning_curves([(name, history)], folder / "curves.png", title=title), args.repeats, device
        ),
        history=median_seconds(lambda: write_history(history, folder / "history.csv"), args.repeats, device),
        last_bytes=(folder / ckpt.LAST_NAME).stat().st_size, best_bytes=(folder / ckpt.BEST_NAME).stat().st_size,
        host_copy=median_seconds(copy_to_host, args.repeats, device),
    )


def project(measured: Measured, batch_size: int, valid_images: int, save_every: float, improved: float) -> dict:
    """Seconds of the full run: its training, its validation, and the bookkeeping that holds training up,
    written every epoch on the training thread ("every_epoch") and as src/bookkeeping.py does it ("policy").
    The policy's timed writes are counted over the run's length without them; a background write holds
    training up by what it outlasts the epoch that follows it."""
    training = RECIPE_EPOCHS * (FULL_TRAIN_IMAGES // batch_size) * measured.step
    validation = RECIPE_EPOCHS * measured.validation * FULL_VALID_IMAGES / valid_images
    epoch = (training + validation) / RECIPE_EPOCHS
    every_epoch = RECIPE_EPOCHS * (measured.history + improved * measured.best + measured.last + measured.figure)
    on_thread = RECIPE_EPOCHS * (measured.history + measured.host_copy)
    intervals = math.floor((training + validation + on_thread) / save_every)
    last_saves = min(RECIPE_EPOCHS, 2 + intervals)  # after epoch 1, once per interval, at the end
    figures = last_saves  # drawn with last.pt
    waits = last_saves * max(0.0, measured.last - epoch) + improved * RECIPE_EPOCHS * max(0.0, measured.best - epoch)
    return {
        "training": training,
        "validation": validation,
        "every_epoch": every_epoch,
        "policy": on_thread + figures * measured.figure + waits,
        "background": last_saves * measured.last + improved * RECIPE_EPOCHS * measured.best,
        "last_saves": last_saves,
        "figures": figures,
    }


def measurement_table(rows: list[Measured], args: Namespace) -> list[str]:
    lines = [
        f"| network | training step (batch {args.batch_size}) | validation ({args.valid_images} images) "
        "| last.pt | best.pt | curves.png (200 epochs) | history.csv | host copy of last.pt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.network} | {row.step:.3f} s | {row.validation:.3f} s | {row.last:.3f} s "
            f"({row.last_bytes / 1e6:.0f} MB) | {row.best:.3f} s ({row.best_bytes / 1e6:.0f} MB) | {row.figure:.3f} s "
            f"| {row.history:.4f} s | {row.host_copy:.3f} s |"
        )
    return lines


def projection_table(rows: list[Measured], args: Namespace) -> list[str]:
    lines = [
        f"| network | training | validation | bookkeeping every epoch | bookkeeping under the policy "
        f"(last.pt, figure) | written in the background | full run under the policy | bookkeeping share "
        f"| at most {BOOKKEEPING_TARGET:.0%} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        run = project(row, args.batch_size, args.valid_images, args.save_every, args.improved)
        every = run["every_epoch"] / (run["training"] + run["validation"] + run["every_epoch"])
        total = run["training"] + run["validation"] + run["policy"]
        share = run["policy"] / total
        verdict = "yes" if share <= BOOKKEEPING_TARGET else "no"
        lines.append(
            f"| {row.network} | {run['training'] / 60:.1f} min | {run['validation'] / 60:.1f} min "
            f"| {run['every_epoch'] / 60:.2f} min ({every:.1%}) | {run['policy'] / 60:.2f} min ({run['last_saves']}, "
            f"{run['figures']}) | {run['background'] / 60:.2f} min | {total / 60:.1f} min | {share:.1%} | {verdict} |"
        )
    return lines


def report(rows: list[Measured], args: Namespace, device_name: str) -> list[str]:
    return [
        f"`{args.command}`", "",
        f"On {device_name}: train.py's defaults at {args.image_size}², batch {args.batch_size}; training steps timed: "
        f"{args.steps}, after {args.warmup_steps} untimed; each write and the validation pass: the median of "
        f"{args.repeats} after one untimed, in a temporary folder in {display_path(args.parent)}. Seconds per call:",
        "",
        *measurement_table(rows, args), "",
        f"The full run: {RECIPE_EPOCHS} epochs of {FULL_TRAIN_IMAGES} train images ({FULL_TRAIN_IMAGES} // "
        f"{args.batch_size} steps an epoch) and {FULL_VALID_IMAGES} valid images (validation scaled from "
        f"{args.valid_images}). Policy: history.csv every epoch, best.pt on {args.improved:.0%} of the epochs "
        f"(assumed), last.pt after epoch 1, then at most once per {args.save_every:g} s and at the end, curves.png "
        "at most once per interval and at the end (their counts in brackets):", "",
        *projection_table(rows, args),
    ]


def write_report(lines: list[str], args: Namespace, rows: list[Measured]) -> None:
    if args.report_to is not None:
        with atomic_write(args.report_to, "w") as file:
            file.write("\n".join(lines) + "\n")
    if args.json is not None:
        with atomic_write(args.json, "w") as file:
            sizes = {"image_size": args.image_size, "batch_size": args.batch_size, "valid_images": args.valid_images}
            json.dump({row.network: {**asdict(row), **sizes} for row in rows}, file, indent=2)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> Namespace:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES, help="networks to time")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="as train.py's")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square model input, in pixels")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="images per training step and valid batch")
    parser.add_argument(
        "--valid-images", type=int, default=FULL_VALID_IMAGES,
        help=f"images of the timed validation pass (default: {FULL_VALID_IMAGES}, the full split's); the "
        "projection scales it to those",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps (default: 30 on CUDA, 2 elsewhere)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed steps before them (default: 3 on CUDA, 1 elsewhere)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each write and of validation")
    parser.add_argument(
        "--save-every", type=positive(float), default=DEFAULT_SAVE_EVERY,
        help="the policy's seconds between last.pt saves",
    )
    parser.add_argument(
        "--improved", type=fraction, default=0.25,
        help="share of the epochs whose valid Dice improves, so that best.pt is written",
    )
    parser.add_argument(
        "--dir", type=Path, default=None,
        help="folder the files are written in (default: a temporary one in saved_models/, the disk runs write to)",
    )
    parser.add_argument("--report-to", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write the measured seconds to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Measured]:
    """The measurements, each network's as it finishes in --report-to and --json, all printed at the end."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = shlex.join(["python", f"benchmarks/{Path(__file__).name}", *argv])
    device = select_device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (30 if cuda else 2)
    args.warmup_steps = (3 if cuda else 1) if args.warmup_steps is None else args.warmup_steps
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    args.parent = args.dir or REPO_ROOT / "saved_models"
    args.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Measured] = []
    with tempfile.TemporaryDirectory(dir=args.parent, prefix="bookkeeping-") as folder:
        for name in args.models:
            rows.append(measure(name, device, args, Path(folder)))
            write_report(report(rows, args, device_name), args, rows)
    print("\n".join(report(rows, args, device_name)))
    return rows


if __name__ == "__main__":
    run_script(main)
