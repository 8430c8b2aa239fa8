"""How fast data reaches the model, how fast train.py trains, and how fast the models predict.

    python benchmarks/throughput.py                         # synthetic photos of real sizes
    python benchmarks/throughput.py --data-path ../shared/oxford-iiit-pet-sample

Prints markdown tables and appends them, dated, with the device and the command, to
docs/BENCHMARKS.md (--no-record to skip; --report-to FILE keeps them in FILE as they fill). Measures:
- input pipeline, img/s on one CPU thread: the lab template's per-image PIL path (decode and
  resize), petseg's per-image path (--no-cache) and its decode-once cache: first the uint8
  batches the CPU hands to a GPU, then model-ready float batches made on this device (resize
  only, the lab path's work), then with the training augmentation;
- training: train.train_one_epoch itself with train.py's defaults (its scheduler, scaler and
  syncs), fed by the cached loader (cache in GPU memory, or in page-locked CPU memory) vs one
  ready batch repeated (compute only); on CUDA also forced fp16 with loss scaling, cudnn.benchmark
  off, and torch.compile;
- on CUDA, peak training memory per image of a batch; inference img/s; and the time 200 epochs of
  the full split (3312 train + 368 valid images) would take at the measured speed.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
import traceback
from argparse import BooleanOptionalAction, Namespace
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

import train_speed  # noqa: E402
from augment import crop_source_size  # noqa: E402
from batches import EvalBatches, TrainBatches  # noqa: E402
from cache import CachedSplit, load_or_build  # noqa: E402
from cli import argument_parser  # noqa: E402
from devices import autocast, default_amp, select_device  # noqa: E402
from errors import run_script  # noqa: E402
from files import atomic_write  # noqa: E402
from make_synthetic_pets import REAL_IMAGE_SIZE, make_synthetic_pets  # noqa: E402
from models import MODEL_NAMES  # noqa: E402
from oxford_pet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    OxfordPetSegmentation,
    build_transform,
    image_path,
    trimap_path,
)
from train_speed import FED_TARGET, Setup, synchronize  # noqa: E402

TRAINING_COLUMNS = [
    "model", "precision", "compile", "cudnn.benchmark", "cache", "fed by", "img/s", "ms/step", "fed / compute-only",
    "note",
]


class Report:
    """Markdown tables as they fill, rewritten (atomically) to `path` after every row, so that a run
    cut off still leaves the rows that finished."""

    def __init__(self, path: Path | None, description: str) -> None:
        self.path = path
        self.blocks: list[list[str]] = [[description]]
        self.save()

    def table(self, caption: str, columns: list[str], text_columns: set[str]) -> list[str]:
        """A table after the blocks so far; its rows come with row(). Columns not in text_columns are numbers."""
        aligns = ["---" if column in text_columns else "---:" for column in columns]
        block = [f"**{caption}**", "", "| " + " | ".join(columns) + " |", "|" + "|".join(aligns) + "|"]
        self.blocks.append(block)
        return block

    def row(self, block: list[str], cells: list[str]) -> None:
        block.append("| " + " | ".join(cells) + " |")
        self.save()

    def note(self, text: str) -> None:
        self.blocks.append([text])
        self.save()

    def body(self) -> str:
        return "\n\n".join("\n".join(block) for block in self.blocks) + "\n"

    def save(self) -> None:
        if self.path is not None:
            with atomic_write(self.path, "w") as file:
                file.write(self.body())


def lab_pil_sample(data_path: Path, name: str, size: int, as_float: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The lab template's way: PIL decode, resize, numpy, per image; uint8 or float in [0, 1]."""
    image = np.array(Image.open(image_path(data_path, name)).convert("RGB").resize((size, size), Image.BILINEAR))
    trimap = np.array(Image.open(trimap_path(data_path, name)).resize((size, size), Image.NEAREST))
    image, mask = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy((trimap == 1) | (trimap == 3))[None]
    return (image.float() / 255, mask.float()) if as_float else (image, mask.to(torch.uint8))


def gather_batches(split: CachedSplit, batch_size: int) -> None:
    """What the CPU does per batch for a GPU run from the cache: cut uint8 images and masks out of memory."""
    order = torch.randperm(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        split.images.index_select(0, index), split.masks.index_select(0, index)  # noqa: B018 - the timed work


def images_per_second(count: int, run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def epoch(batches: Iterable, device: torch.device) -> None:
    for _ in batches:
        pass
    synchronize(device)


@torch.no_grad()
def inference_rate(model: torch.nn.Module, images: torch.Tensor, device: torch.device, amp: bool, steps: int) -> float:
    """img/s of eval-mode forward passes on one batch, after one warm-up."""
    model.eval()

    def run() -> None:
        with autocast(device, amp):
            for _ in range(steps):
                model(images)
        synchronize(device)

    run()
    return images_per_second(len(images) * steps, run)


def input_rows(
    report: Report, data_path: Path, size: int, batch_size: int, device: torch.device, scratch: Path
) -> CachedSplit:
    """The input-pipeline table, on one CPU thread as each DataLoader worker has (img/s per core,
    comparable across paths); returns the training split's cache at the crop source size."""
    table = report.table("Input pipeline (one CPU thread)", ["what", "img/s", "vs the lab path"], {"what"})
    train_set = OxfordPetSegmentation(data_path, "train", build_transform(train=True, image_size=size))
    eval_set = OxfordPetSegmentation(data_path, "train", build_transform(train=False, image_size=size))
    names, n = train_set.names, len(train_set)
    caches: dict[int, CachedSplit] = {}
    lab_rates: dict[str, float] = {}  # the lab path's img/s, which the other rows are compared with

    def add(what: str, count: int, run: Callable[[], object], baseline: str | None = None, lab: str = "") -> None:
        rate = images_per_second(count, run)
        if lab:
            lab_rates[lab] = rate
        report.row(table, [what, f"{rate:.1f}", f"{rate / lab_rates[baseline]:.1f}x" if baseline else ""])

    def build(source_size: int) -> None:
        caches[source_size] = load_or_build(train_set, source_size, scratch / "cache")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    add("input, uint8 for the GPU: lab template per-image PIL (decodes every epoch)", n,
        lambda: [lab_pil_sample(data_path, name, size, as_float=False) for name in names], "uint8", lab="uint8")
    add("input, resize only: lab template per-image PIL, to float", n,
        lambda: [lab_pil_sample(data_path, name, size) for name in names], "float", lab="float")
    add("input, resize only: petseg per-image (`--no-cache`)", n, lambda: [eval_set[i] for i in range(n)], "float")
    add("input: building the cache (once; then reused by every run)", n, lambda: build(size))
    add("input, uint8 for the GPU: petseg cache (batches cut from memory)", n,
        lambda: gather_batches(caches[size], batch_size), "uint8")
    eval_batches = EvalBatches(caches[size], batch_size, device, IMAGENET_MEAN, IMAGENET_STD)
    add(f"input, resize only: petseg cache, normalised float batches on {device.type}", n,
        lambda: epoch(eval_batches, device), "float")
    augmented = (batch_size, device, size, IMAGENET_MEAN, IMAGENET_STD)
    decoded = TrainBatches(train_set, *augmented)
    add(f"input, augmented: petseg per-image (`--no-cache`) + batched augmentation on {device.type}",
        len(decoded) * batch_size, lambda: epoch(decoded, device), "float")
    build(crop_source_size(size))
    cached = TrainBatches(caches[crop_source_size(size)], *augmented)
    add(f"input, augmented: petseg cache + batched augmentation on {device.type}", len(cached) * batch_size,
        lambda: epoch(cached, device), "float")
    torch.set_num_threads(threads)
    return caches[crop_source_size(size)]


def failure(error: Exception, device: torch.device) -> str:
    """What a failed measurement's row says (its traceback goes to the log); frees the GPU memory it held."""
    traceback.print_exc()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return f"failed: {type(error).__name__}: {reason}"


def setup_cells(name: str, setup: Setup, device: torch.device) -> list[str]:
    cudnn = ("on" if setup.cudnn_benchmark else "off") if device.type == "cuda" else "n/a"
    return [name, setup.precision(device), "compile" if setup.compiled else "eager", cudnn]


def training_cells(row: dict, batch_size: int, device: torch.device) -> list[str]:
    ratio = ""
    if row["ratio"] is not None:
        ratio = f"{row['ratio']:.0%}" + ("" if row["ratio"] >= FED_TARGET else f" (under {FED_TARGET:.0%})")
    seconds = row["step_seconds"]
    return [
        *setup_cells(row["model"], row["setup"], device), row["cache"], row["feed"], f"{batch_size / seconds:.1f}",
        f"{1000 * seconds:.1f}", ratio, row["note"],
    ]


def time_setup(
    report: Report, table: list[str], name: str, split: CachedSplit, device: torch.device, args: Namespace,
    setup: Setup, placements: int,
) -> list[dict]:
    """The setup's rows, each into the table as soon as it is timed. A setup that fails becomes a row
    saying why and the others go on: on a first GPU run the error is itself the finding."""
    rows = []
    try:
        for row in train_speed.training_rows(
            name, split, device, args.batch_size, args.image_size, args.steps, args.warmup_steps, setup, placements
        ):
            report.row(table, training_cells(row, args.batch_size, device))
            rows.append(row)
    except Exception as error:  # reported in the table; the other rows go on
        report.row(table, [*setup_cells(name, setup, device), "", "", "", "", "", failure(error, device)])
    return rows


def eager_setups(device: torch.device, fp16: bool) -> list[Setup]:
    """train.py's defaults on this device first (its rows time every cache placement), then one change each."""
    cuda = device.type == "cuda"
    forced = [Setup(amp=True, force_fp16=True, cudnn_benchmark=cuda)] if fp16 else []
    default = Setup(amp=default_amp(device), cudnn_benchmark=cuda)  # as devices.configure_backends sets it
    return [default, *forced, *([Setup(amp=default.amp, cudnn_benchmark=False)] if cuda else [])]


def model_rows(
    report: Report, tables: dict, name: str, split: CachedSplit, device: torch.device, args: Namespace
) -> float | None:
    """The model's eager training rows, its memory per image (on CUDA), its inference speed and the
    projection of a full run; returns its compute-only seconds per step under train.py's defaults."""
    default = eager_setups(device, fp16=False)[0]
    rows = []
    for setup in eager_setups(device, args.fp16):
        rows += time_setup(report, tables["training"], name, split, device, args, setup, 2 if setup == default else 1)
    if "memory" in tables:
        try:
            memory = train_speed.peak_memory(name, device, args.batch_size, args.image_size)
            cells = [f"{memory['peak'] / 2**30:.2f}", f"{memory['fixed'] / 2**30:.2f}",
                     f"{memory['per_image'] / 2**20:.1f}"]
        except Exception as error:  # reported in the table; the other rows go on
            cells = ["", "", failure(error, device)]
        report.row(tables["memory"], [name, str(args.batch_size), *cells])
    base = [row for row in rows if row["setup"] == default]
    if len(base) < 2:  # its compute-only or loader-fed row failed: nothing to project from
        return base[0]["step_seconds"] if base else None
    try:
        model = train_speed.default_model(name, device)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        predict = inference_rate(model, images, device, default.amp, args.steps)
        del model, images
        # base[1] is fed from the first cache placement: the GPU's on CUDA, as train.py keeps a cache that fits.
        report.row(tables["projection"], projection_cells(name, base[1], predict, device, args))
    except Exception as error:  # reported in the table; the other rows go on
        report.row(tables["projection"], [name, "", "", "", "", "", "", failure(error, device)])
    return base[0]["step_seconds"]


def projection_cells(name: str, fed: dict, predict: float, device: torch.device, args: Namespace) -> list[str]:
    """The projection's row from the loader-fed row of train.py's defaults and the inference speed."""
    rate = args.batch_size / fed["step_seconds"]
    tflops = train_speed.train_flops_per_image(name, args.image_size) * rate / 1e12
    minutes = train_speed.projected_seconds(fed["step_seconds"], args.batch_size, predict) / 60
    target = train_speed.TARGET_MINUTES.get(name)
    if device.type == "cuda" and (args.image_size, args.batch_size) == (256, 32) and target is not None:
        verdict = f"under {target:g} min: {'met' if minutes < target else 'missed'}"
    else:
        verdict = "(the targets are for 256², batch 32, on one H100/H200)"
    return [
        name, f"{rate:.1f}", f"{fed['ratio']:.0%}", f"{predict:.1f}", f"{tflops:.2f}",
        f"{tflops / train_speed.H200_BF16_TFLOPS:.1%}", f"{minutes:.1f}", verdict,
    ]


def measure_models(report: Report, split: CachedSplit, device: torch.device, args: Namespace) -> None:
    """Training rows of every model (eager setups first, torch.compile last: it is the slowest to
    time), memory per image and the projections."""
    tables = {"training": report.table(
        f"Training: train.train_one_epoch with train.py's defaults, batch {args.batch_size}, {args.image_size}²",
        TRAINING_COLUMNS, set(TRAINING_COLUMNS[:6] + TRAINING_COLUMNS[-1:]),
    )}
    if device.type == "cuda":
        tables["memory"] = report.table(
            "Peak training memory (mixed precision, a few steps)",
            ["model", "batch", "peak GiB", "model + gradients + AdamW GiB", "per image MiB"], {"model"},
        )
    else:
        report.note("Peak memory per image: CUDA only (torch counts no CPU allocations).")
    tables["projection"] = report.table(
        f"What {train_speed.RECIPE_EPOCHS} epochs of the full split ({train_speed.FULL_TRAIN_IMAGES} train + "
        f"{train_speed.FULL_VALID_IMAGES} valid images) take at this speed (valid pass timed as inference; "
        "checkpoint writes and the test pass not included)",
        ["model", "img/s fed by the cached loader", "fed / compute-only", "inference img/s", "training TFLOP/s",
         f"of {train_speed.H200_BF16_TFLOPS:g} (H200, bf16)", "minutes", "target"], {"model", "target"},
    )
    eager = {name: model_rows(report, tables, name, split, device, args) for name in args.models}
    if not args.compile:
        report.note("torch.compile: not timed (--no-compile, the default off CUDA, where compiling takes minutes).")
        return
    for name in args.models:
        setup = Setup(amp=default_amp(device), compiled=True, cudnn_benchmark=device.type == "cuda")
        rows = time_setup(report, tables["training"], name, split, device, args, setup, 1)
        if rows and eager[name] is not None:
            report.note(f"torch.compile, compute only: {name} at {eager[name] / rows[0]['step_seconds']:.2f}x eager's "
                        "speed.")


def parse_args(argv: list[str] | None) -> Namespace:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-path", "--data_path", type=Path, default=None,
        help="a dataset in the official layout (default: synthetic photos of real sizes, in a temporary folder)",
    )
    parser.add_argument(
        "--n-images", type=int, default=200, help="synthetic training photos (the official train split has 3312)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of the square model input, in pixels")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto picks cuda, then mps, then cpu"
    )
    parser.add_argument(
        "-b", "--batch-size", type=int, default=None, help="images per batch (default: 32 on CUDA, 4 elsewhere)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per row (default: 30 on CUDA, 2 elsewhere)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None,
        help="untimed steps before each row: cudnn's autotuning, compiling (default: 3 on CUDA, 1 elsewhere)",
    )
    parser.add_argument(
        # Not every registered network by default: each one more lengthens gpu_check's timed stage.
        "--models", nargs="+", default=[name for name in MODEL_NAMES if name in train_speed.TARGET_MINUTES],
        choices=MODEL_NAMES,
        help=f"the models to time, among {', '.join(MODEL_NAMES)} (default: those with a speed target, "
        f"{', '.join(train_speed.TARGET_MINUTES)})",
    )
    parser.add_argument(
        "--fp16", action=BooleanOptionalAction, default=None,
        help="also time forced fp16 with loss scaling, as GPUs without bf16 train (default: on for CUDA)",
    )
    parser.add_argument(
        "--compile", action=BooleanOptionalAction, default=None,
        help="also time torch.compile, as train.py --compile (default: on for CUDA)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to docs/BENCHMARKS.md")
    parser.add_argument(
        "--report-to", type=Path, default=None,
        help="also keep the tables in this file, rewritten after every row (a run cut off leaves what finished)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (32 if on_cuda else 4)
    args.steps = args.steps or (30 if on_cuda else 2)
    if args.warmup_steps is None:
        args.warmup_steps = 3 if on_cuda else 1
    args.fp16 = on_cuda if args.fp16 is None else args.fp16
    args.compile = on_cuda if args.compile is None else args.compile
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        data_path = args.data_path or make_synthetic_pets(
            Path(scratch) / "pets", n_trainval=args.n_images * 10 // 9 + 1, n_test=1, image_size=REAL_IMAGE_SIZE,
            progress=True,
        )
        n_train = len(OxfordPetSegmentation(data_path, "train"))
        images = f"{n_train} training images of {data_path}" if args.data_path else (
            f"{n_train} synthetic training photos of real sizes (about {REAL_IMAGE_SIZE[0]}×{REAL_IMAGE_SIZE[1]})"
        )
        device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
        report = Report(args.report_to, (
            f"{images} at {args.image_size}², on {device_name}. Training rows: batch {args.batch_size}, timed "
            f"steps per row {args.steps}, after warm-up steps {args.warmup_steps}; train.py's defaults (AdamW, "
            f"one-cycle schedule, BCE + soft Dice{', channels-last' if on_cuda else ''})."
        ))
        split = input_rows(report, data_path, args.image_size, args.batch_size, device, Path(scratch))
        measure_models(report, split, device, args)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    report.note(f"Peak resident memory of the process {peak_rss:.1f} GiB; {time.perf_counter() - start:.0f} s in all.")
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)])
    text = f"## {datetime.now():%Y-%m-%d %H:%M} — throughput on {device_name}\n\n```\n{command}\n```\n\n{report.body()}"
    print("\n" + text)
    if not args.no_record:
        with open(REPO_ROOT / "docs" / "BENCHMARKS.md", "a") as file:
            file.write("\n" + text)
        print("Appended to docs/BENCHMARKS.md")


if __name__ == "__main__":
    run_script(main)
