"""Train a UNet or ResNet34-UNet from scratch on Oxford-IIIT Pet (pet vs background).

    python src/train.py                      # ResNet34-UNet, the recommended recipe
    python src/train.py -n unet -e 100 -b 16
    python src/train.py --resume saved_models/RUN   # continue an interrupted run

Each run gets its own folder in saved_models/: best.pt (best valid Dice), last.pt (the latest
epoch, for --resume), history.csv, curves.png and, at the end, results.json with the test
scores of best.pt. Every file is replaced atomically, so a crash leaves the previous one whole.

The script reads top to bottom: the flags, main(), set_up() (data, model, optimiser, run folder),
train() (the epoch loop, with train_one_epoch), test_best() and write_results().
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoint as ckpt
import distributed
import run_state
import storage
from batches import EvalBatches, TrainBatches, place_cache
from cache import DEFAULT_CACHE_DIR, cache_bytes, cache_fits_in_memory, load_or_build
from cli import argument_parser
from devices import (
    autocast,
    configure_backends,
    default_amp,
    describe_precision,
    fused_optimizer,
    needs_loss_scaling,
    seed_everything,
)
from distributed import Processes
from ema import MovingAverage
from errors import PetsegError, display_path, run_script
from evaluate import EvalResult, default_num_workers, eval_loader, evaluate, format_result
from files import REPO_ROOT, atomic_write, unused_path
from interrupts import sigint_deferred
from losses import LOSSES, auxiliary_loss, build_loss
from models import MODEL_NAMES, build_model
from models.resnet34_unet import DEFAULT_DECODER_CHANNELS
from models.stats import count_parameters, training_bytes
from oxford_pet import (
    AUGMENTATIONS,
    DEFAULT_DATA_PATH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_source_size,
    load_dataset,
    prepare_dataset,
)
from plots import plot_learning_curves
from run_state import Progress, Trainer
from utils import logits_to_mask, per_image_dice

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_dice", "valid_loss", "valid_dice", "valid_dataset_dice", "valid_iou", "seconds",
)
WARMUP_FRACTION = 0.1
MIN_WARMUP_STEPS = 10
# Steps between reads of the loss on the host: each read waits for the GPU to finish all it was given.
READ_EVERY = 25


# ----------------------------------------------------------------------------- flags


def positive(kind: type):
    """argparse type: a number > 0, so a bad value stops the run before anything is written."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def non_negative(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def ema_decay(text: str) -> float:
    """argparse type: 0 (off) or a decay in (0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or between 0 and 1, e.g. 0.999; got {text}")
    return value


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (the encoders downsample 32x), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "Train a segmentation model on Oxford-IIIT Pet and report its test Dice. Defaults are the recommended "
        "recipe for one CUDA GPU; under torchrun the same command trains on several (see docs/platforms.md)."
    )
    add_data_flags(parser.add_argument_group("data"))
    add_recipe_flags(parser.add_argument_group("model and optimisation"))
    add_study_flags(parser.add_argument_group(
        "recipe-study options", "variants measured against the defaults (docs/BENCHMARKS.md); all off by default"
    ))
    add_run_flags(parser.add_argument_group("run"))
    return parser


def add_data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH,
        help="folder holding images/ and annotations/; the default one is downloaded on first use",
    )
    data.add_argument(
        "--no-download", action="store_true", help="never download: fail with instructions if the dataset is missing"
    )
    data.add_argument(
        "--skip-bad", action="store_true",
        help="check every image and trimap first and leave out unusable ones (listed in one warning) instead of "
        "stopping",
    )
    data.add_argument(
        "--image-size", "--image_size", type=image_size, default=256, help="images are resized to SIZE x SIZE"
    )
    data.add_argument(
        "--num-workers", "--num_workers", type=non_negative, default=default_num_workers(),
        help="processes decoding images (0: in the main process)",
    )
    data.add_argument(
        "--no-cache", action="store_true",
        help="decode every image every epoch instead of once (slower; the cache is used only when it fits in memory)",
    )
    data.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
        help="where the decoded, resized images are kept (environment variable PETSEG_CACHE_DIR changes the default)",
    )


def add_recipe_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="architecture")
    model.add_argument("-e", "--epochs", type=positive(int), default=200, help="training epochs")
    model.add_argument(
        "-b", "--batch_size", "--batch-size", type=positive(int), default=32,
        help="images per optimiser step, over all processes when started by torchrun",
    )
    model.add_argument(
        "-lr", "--learning-rate", "--learning_rate", dest="learning_rate", type=positive(float), default=1e-3,
        help="peak AdamW learning rate of the one-cycle schedule",
    )
    model.add_argument("--weight-decay", "--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    model.add_argument(
        "--patience", type=non_negative, default=0,
        help="stop after this many epochs without a better valid Dice; 0 never stops early",
    )


def add_study_flags(study: argparse._ArgumentGroup) -> None:
    study.add_argument(
        "--deep-supervision", action=argparse.BooleanOptionalAction, default=False,
        help="also train 1x1 heads on the coarser decoder stages, their loss halving per stage (training only; "
        "the checkpoint predicts as without them)",
    )
    study.add_argument(
        "--decoder-channels", type=positive(int), nargs=5, default=None, metavar="C",
        help=f"resnet34_unet only: widths of the 5 decoder blocks, coarse to fine "
        f"(default: {' '.join(map(str, DEFAULT_DECODER_CHANNELS))})",
    )
    study.add_argument(
        "--full-res-skip", action=argparse.BooleanOptionalAction, default=False,
        help="resnet34_unet only: give the last decoder block a skip from the input image at full resolution "
        "(its encoder starts at half resolution)",
    )
    study.add_argument(
        "--loss", default="bce+dice", choices=LOSSES,
        help="training loss: BCE plus soft Dice per image, or either alone",
    )
    study.add_argument(
        "--augment", default="default", choices=AUGMENTATIONS,
        help="strength of the training augmentation: light (flip and crops of 80-100%% of the area), default "
        "(flip, crops of 50-100%%, rotation up to 10 degrees, colour jitter 30%%) or strong (crops of 30-100%% "
        "at aspect 2:3 to 3:2, rotation up to 20 degrees, jitter 40%%)",
    )
    study.add_argument(
        "--ema", type=ema_decay, default=0.0,
        help="validate, keep and test an exponential moving average of the weights with this decay per step "
        "(e.g. 0.999, warmed up over the first steps); 0 turns it off",
    )


def add_run_flags(run: argparse._ArgumentGroup) -> None:
    run.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu"
    )
    run.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="mixed precision: bf16 on Ampere and newer GPUs, fp16 with loss scaling on Volta and Turing (default: "
        "on for CUDA GPUs of compute capability 7.0 and newer; off on older ones, which have no tensor cores)",
    )
    run.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory layout, which tensor cores run natively (default: on for CUDA)",
    )
    run.add_argument(
        "--deterministic", action="store_true",
        help="repeatable GPU runs: deterministic algorithms only (an operation without one stops the run with an "
        "error), bilinear upsampling as matrix products, cuDNN deterministic and not benchmarking; slower. On the "
        "CPU runs are repeatable without it",
    )
    run.add_argument(
        "--sync-bn", action=argparse.BooleanOptionalAction, default=True,
        help="under torchrun with several processes: BatchNorm statistics over the images of all processes, "
        "so 8 images on each of 4 GPUs normalise like 32",
    )
    run.add_argument(
        "--compile", action="store_true",
        help="torch.compile the model (slow to start; see docs/BENCHMARKS.md for whether it pays off)",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument(
        "--save-dir", "--save_dir", type=Path, default=REPO_ROOT / "saved_models",
        help="runs are saved in a new folder here",
    )
    run.add_argument(
        "--run-name", default=None, help="name of the run's folder (default: NETWORK_DATE-TIME); never reused"
    )
    run.add_argument(
        "--resume", type=Path, default=None,
        help="continue a run from its last.pt (or its folder) with everything restored; only the data and machine "
        "flags may change",
    )


def parse_args(
    argv: list[str] | None = None, processes: Processes | None = None
) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and for --resume the checkpoint to continue from (its flags merged in)."""
    processes = processes or Processes()
    parser = build_parser()
    args = parser.parse_args(argv)
    resume_from = None
    if args.resume is not None:
        args, resume_from = run_state.merge_resumed_flags(parser, args)
    if args.data_path != DEFAULT_DATA_PATH and not args.data_path.is_dir():
        parser.error(
            f"--data_path {args.data_path} is not a folder. Point it at the folder holding images/ and "
            f"annotations/, or leave it out to use (and on first use download) {DEFAULT_DATA_PATH}."
        )
    if args.network != "resnet34_unet":
        for flag, value in (("--decoder-channels", args.decoder_channels), ("--full-res-skip", args.full_res_skip)):
            if value:
                parser.error(f"{flag} shapes the resnet34_unet decoder; drop it for -n {args.network}.")
    if args.batch_size % processes.world_size:
        parser.error(
            f"-b/--batch_size {args.batch_size} is the images of one optimiser step, split evenly over the "
            f"{processes.world_size} processes, and does not divide by {processes.world_size}. "
            f"Use a multiple of {processes.world_size}."
        )
    storage.check_before_training(parser, args, run_state.model_kwargs(args), talks=processes.is_main)
    return args, resume_from


# ----------------------------------------------------------------------------- main


@dataclass
class Run:
    """One training run as set_up() makes it: its flags, where it runs, what trains and how far it has come."""

    args: argparse.Namespace
    processes: Processes
    device: torch.device
    amp: bool
    data_path: Path
    run_dir: Path
    trainer: Trainer
    valid_loader: EvalBatches | DataLoader
    loss_fn: nn.Module
    progress: Progress


def main(argv: list[str] | None = None) -> None:
    processes = distributed.from_environment()  # one process, unless started by torchrun
    args, resume_from = parse_args(argv, processes)
    device = distributed.start(processes, args.device)
    finished = False
    try:
        with stopped_by_sigterm(), quiet_unless(processes.is_main):
            run = set_up(args, resume_from, device, processes)
            with explained_stops(run):
                train(run)
                test = test_best(run)
            write_results(run, test)
        finished = True
    finally:
        distributed.stop(wait_for_others=finished)


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM (a cluster's scheduler, or torchrun passing one on) stops the run as Ctrl-C does."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def quiet_unless(talks: bool) -> Iterator[None]:
    """Silence a process that is not rank 0: one log and one set of progress bars per run.
    Its errors still reach the terminal, through run_script, once the block is left."""
    if talks:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


# ----------------------------------------------------------------------------- set up


def set_up(args: argparse.Namespace, resume_from: dict | None, device: torch.device, processes: Processes) -> Run:
    """Data, model, optimiser and run folder, for a new run or one resumed from its last.pt. Under torchrun
    every process runs this; rank 0 alone writes files."""
    amp = args.amp if args.amp is not None else default_amp(device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    configure_backends(device, args.deterministic)
    seed_everything(args.seed)
    data_path = distributed.first_on_each_machine(
        processes, lambda: prepare_dataset(args.data_path, download=not args.no_download, skip_bad=args.skip_bad)
    )
    model = build_model(args.network, **run_state.model_kwargs(args)).to(device)
    per_process = args.batch_size // processes.world_size
    # What training needs on the GPU, which a GPU-resident cache must leave free (the average doubles the weights).
    parameters = count_parameters(model)
    reserve = training_bytes(args.network, args.image_size, per_process, amp, parameters)
    reserve += 4 * parameters if args.ema else 0
    train_loader, valid_loader, n_valid = make_loaders(args, data_path, device, processes, reserve)
    if len(train_loader) == 0:
        raise PetsegError(
            f"-b/--batch_size {args.batch_size} is larger than the {train_loader.n_images} training images."
        )
    trainer = make_trainer(args, model, train_loader, device, amp, channels_last, resume_from)
    if resume_from is None:
        run_name = args.run_name or f"{args.network}_{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = distributed.broadcast(make_run_dir(args.save_dir, run_name) if processes.is_main else None)
        progress = Progress()
    else:
        run_dir = args.resume.parent
        run_state.check_same_training_set(resume_from, train_loader.n_images, run_dir, data_path)
        progress = run_state.restore(resume_from, trainer)
        announce_resume(resume_from, progress, run_dir, processes)
    args.processes = processes.world_size
    run = Run(args, processes, device, amp, data_path, run_dir, trainer, valid_loader,
              build_loss(args.loss), progress)
    print(start_line(run, n_valid, channels_last, train_loader.cached))
    return run


def make_loaders(
    args: argparse.Namespace, data_path: Path, device: torch.device, processes: Processes, reserve: int = 0
) -> tuple:
    """Train and valid batches, and the number of valid images. From the decode-once cache unless --no-cache,
    or it would not fit in memory; either way the training augmentation runs on whole batches on `device`
    (batches.TrainBatches). Each process gets its share of every training batch and of the valid images.
    The cache serves batches from the GPU's memory when it fits there beside `reserve` bytes for training."""
    augmentation = AUGMENTATIONS[args.augment]
    datasets = {
        split: load_dataset(data_path, split, args.image_size, args.skip_bad, augmentation)
        for split in ("train", "valid")
    }
    sizes = {"train": crop_source_size(args.image_size, augmentation), "valid": args.image_size}
    per_process = args.batch_size // processes.world_size
    valid_share = processes.shard(len(datasets["valid"]))
    needed = sum(cache_bytes(len(datasets[split]), size) for split, size in sizes.items()) * processes.local_world_size
    # Rank 0 decides for all: processes that disagreed would wait for each other in different places.
    use_cache = distributed.broadcast(not args.no_cache and processes.is_main and cache_fits_in_memory(needed))
    if use_cache:
        cached = distributed.first_on_each_machine(processes, lambda: {
            split: load_or_build(data, sizes[split], args.cache_dir, args.num_workers)
            for split, data in datasets.items()
        })
        cached = place_cache(cached, device, reserve)
        train_source = cached["train"]
        valid_loader = EvalBatches(cached["valid"], per_process, device, IMAGENET_MEAN, IMAGENET_STD, valid_share)
    else:
        train_source = datasets["train"]
        valid_loader = DataLoader(
            Subset(datasets["valid"], valid_share),
            per_process,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # evaluating must not draw from the global RNG
        )
    train_loader = TrainBatches(
        train_source, args.batch_size, device, args.image_size, IMAGENET_MEAN, IMAGENET_STD, args.seed,
        args.num_workers, processes.rank, processes.world_size, augmentation,
    )
    return train_loader, valid_loader, len(datasets["valid"])


def make_trainer(
    args: argparse.Namespace,
    model: nn.Module,
    loader: TrainBatches,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    resume_from: dict | None,
) -> Trainer:
    """The model as it trains (resumed weights, memory layout, moving average, DDP, compile), the optimiser,
    the learning-rate schedule and the loss scaler."""
    if resume_from is not None:
        model.load_state_dict(run_state.raw_weights(resume_from))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = MovingAverage(model, args.ema) if args.ema else None
    model = distributed.wrap(model, device, args.sync_bn)
    if args.compile:
        warn_if_compile_breaks_at_sync_bn(args, device)
        model = torch.compile(model)  # after DDP wrapping, as torch's DDP notes advise
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
        fused=fused_optimizer(device) or None,
    )
    scheduler = make_scheduler(optimizer, args.learning_rate, args.epochs, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, amp))
    return Trainer(model, optimizer, scheduler, scaler, loader, ema)


def warn_if_compile_breaks_at_sync_bn(args: argparse.Namespace, device: torch.device) -> None:
    if device.type == "cuda" and args.sync_bn and distributed.active() and distributed.world_size() > 1:
        print(
            "warning: torch.compile breaks its graph at every SyncBatchNorm layer (pytorch/pytorch#161302), so "
            "--compile may gain little here; compare with and without it, or pass --no-sync-bn.",
            file=sys.stderr,
        )


def make_scheduler(
    optimizer: torch.optim.Optimizer, max_lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One cycle: the learning rate warms up over the first 10% of the steps, then anneals.

    A schedule too short to warm up gets a warning; under three steps (no warm-up fits) the rate
    stays at max_lr, rather than OneCycleLR failing or leaving it near zero.
    """
    total = epochs * steps_per_epoch
    warmup = max(2, round(WARMUP_FRACTION * total))  # OneCycleLR divides by (warm-up steps - 1)
    if warmup < MIN_WARMUP_STEPS:
        print(
            f"warning: only {total} optimiser steps ({epochs} epoch(s) x {steps_per_epoch}); the learning rate "
            f"warms up over {min(warmup, total)} of them, too few for a good model. Train for more epochs (-e) "
            "or with a smaller batch (-b).",
            file=sys.stderr,
        )
    if total < 3:
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=warmup / total)


def make_run_dir(save_dir: Path, name: str) -> Path:
    """A new folder for this run; an existing one (an earlier run's files) is never reused."""
    save_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = unused_path(save_dir / name)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another run took the name between the check and mkdir
            continue


def announce_resume(resume_from: dict, progress: Progress, run_dir: Path, processes: Processes) -> None:
    print(
        f"Resuming {display_path(run_dir)} after epoch {resume_from['epoch']} "
        f"(best valid Dice {progress.best_dice:.4f} at epoch {progress.best_epoch})"
    )
    saved_processes = resume_from["args"].get("processes", 1)
    if saved_processes != processes.world_size:
        print(
            f"note: the run was saved by {saved_processes} process(es) and continues with {processes.world_size}: "
            "the same images and augmentation per step, but sums in another order, so not bit-identical.",
            file=sys.stderr,
        )


def start_line(run: Run, n_valid: int, channels_last: bool, cached: bool) -> str:
    args, processes = run.args, run.processes
    n_params = count_parameters(run.trainer.model)
    batch = f"batch {args.batch_size}"
    if processes.launched:
        batch = f"global {batch} = {processes.world_size} processes x {args.batch_size // processes.world_size}"
    return (
        f"{args.network} ({n_params / 1e6:.1f}M parameters) on {run.device}, {describe_precision(run.device, run.amp)}"
        f"{', channels-last' if channels_last else ''}{', deterministic' if args.deterministic else ''}, {batch}; "
        f"{run.trainer.loader.n_images} train / {n_valid} valid images at {args.image_size}px"
        f"{'' if cached else ', decoded every epoch'}; run folder {display_path(run.run_dir)}"
    )


# ----------------------------------------------------------------------------- the epoch loop


def train(run: Run) -> None:
    """Epochs until the last (or --patience runs out): train, validate, keep the best checkpoint and last.pt."""
    args, progress, trainer = run.args, run.progress, run.trainer
    for epoch in range(progress.finished_epoch + 1, args.epochs + 1):
        if args.patience and epoch - 1 - progress.best_epoch >= args.patience:
            print(f"Stopping early: no better valid Dice for {args.patience} epochs.")
            break
        epoch_start = time.perf_counter()
        lr = trainer.optimizer.param_groups[0]["lr"]
        scores = train_one_epoch(
            trainer.model, trainer.loader, trainer.optimizer, trainer.scheduler, trainer.scaler, run.loss_fn,
            run.device, run.amp, f"epoch {epoch}/{args.epochs}", trainer.ema,
        )
        # Every process scores its share of the valid images; the scores are pooled, so all agree.
        valid = evaluate(trainer.validated(), run.valid_loader, run.device, amp=run.amp, loss_fn=run.loss_fn,
                         desc="valid")
        progress.history.append({
            "epoch": epoch, "lr": lr, "train_loss": scores["loss"], "train_dice": scores["dice"],
            "valid_loss": valid.loss, "valid_dice": valid.dice, "valid_dataset_dice": valid.dataset_dice,
            "valid_iou": valid.dataset_iou, "seconds": time.perf_counter() - epoch_start,
        })
        improved = valid.dice > progress.best_dice
        if improved:
            progress.best_dice, progress.best_epoch = valid.dice, epoch
        tqdm.write(
            f"epoch {epoch:3d}/{args.epochs}  lr {lr:.2e}  "
            f"train loss {scores['loss']:.4f} dice {scores['dice']:.4f}  "
            f"valid loss {valid.loss:.4f} dice {valid.dice:.4f}  {progress.history[-1]['seconds']:.1f}s"
            f"{'  *best' if improved else ''}"
        )
        resume_command = run.processes.resume_command(display_path(Path(__file__)), display_path(run.run_dir))
        with sigint_deferred(), storage.write_failures_explained(run.run_dir, resume_command):
            if run.processes.is_main:
                save_epoch(run, epoch, valid.dice, improved)
            progress.finished_epoch = epoch


class NonFiniteLoss(Exception):
    def __init__(self, step: int, noticed_at: int) -> None:
        super().__init__(f"loss not finite at step {step}, noticed at step {noticed_at}")
        self.step, self.noticed_at = step, noticed_at


def train_one_epoch(
    model: nn.Module,
    loader: TrainBatches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool,
    desc: str,
    ema: MovingAverage | None = None,
) -> dict[str, float]:
    """One pass over the training set; returns the mean loss and the mean per-image Dice of its batches.
    The moving average of the weights, if any, follows every step.

    Nothing here waits for the GPU but a read every READ_EVERY steps and at the end: the sums and the
    first step with a non-finite loss stay on the device until then (the next batch is meanwhile fetched
    by batches.prefetched). Under torchrun every process reads the same steps, so all stop together.
    """
    model.train()
    sums = torch.zeros(2, device=device)  # loss x images, and per-image Dice, summed
    first_bad_step = torch.zeros((), device=device)  # 0 while every loss was finite
    seen, steps = 0, len(loader)
    with tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True) as progress:
        for step, (images, masks) in enumerate(loader, start=1):
            with autocast(device, amp):
                outputs = model(images)
            # With --deep-supervision a model in training mode also returns its coarser stages' logits.
            logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, [])
            loss = loss_fn(logits, masks) + auxiliary_loss(loss_fn, aux_logits, masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(distributed.unwrap(model))
            with torch.no_grad():
                loss = loss.detach()
                dice = per_image_dice(logits_to_mask(logits.detach()), masks.bool()).sum()
                sums += torch.stack([loss * len(images), dice])
                first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), step, first_bad_step)
            seen += len(images)
            if step % READ_EVERY == 0 or step == steps:
                loss_sum = read_on_host(sums, first_bad_step, step)
                progress.set_postfix(loss=f"{loss_sum / seen:.4f}")
            progress.update()
    loss_sum, dice_sum, seen = distributed.sum_across([*sums.tolist(), seen])
    return {"loss": loss_sum / seen, "dice": dice_sum / seen}


def read_on_host(sums: torch.Tensor, first_bad_step: torch.Tensor, step: int) -> float:
    """This process's loss sum so far, read with the first non-finite step of any process (one wait for the
    GPU); raises NonFiniteLoss if there was one."""
    bad = distributed.min_across(torch.where(first_bad_step > 0, first_bad_step, float("inf")))
    loss_sum, bad_step = torch.stack([sums[0], bad]).tolist()
    if bad_step != float("inf"):
        raise NonFiniteLoss(int(bad_step), step)
    return loss_sum


def save_epoch(run: Run, epoch: int, valid_dice: float, improved: bool) -> None:
    """history.csv, curves.png, best.pt when the valid Dice improved, then last.pt (rank 0 alone)."""
    history = run.progress.history
    write_history(history, run.run_dir / "history.csv")
    plot_learning_curves(
        [(run.run_dir.name, history)], run.run_dir / "curves.png",
        title=f"{run.args.network}: train (dashed) and valid (solid)",
    )
    contents = run_state.checkpoint_contents(run.args, run.trainer.validated(), epoch, valid_dice, run.amp)
    # best before last: a crash between the two resumes from the older last.pt, which redoes this epoch.
    if improved:
        ckpt.save_checkpoint(run.run_dir / ckpt.BEST_NAME, **contents)
    ckpt.save_checkpoint(
        run.run_dir / ckpt.LAST_NAME, **contents, training=run_state.training_state(run.trainer, run.progress)
    )


def write_history(history: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as file:
        file.write(text.getvalue())


@contextlib.contextmanager
def explained_stops(run: Run) -> Iterator[None]:
    """Ctrl-C (or SIGTERM), a diverged loss and a full GPU end the run with what to do next, not a traceback."""
    args, progress, processes = run.args, run.progress, run.processes
    try:
        yield
    except KeyboardInterrupt:
        # torchrun passes the terminal's Ctrl-C (or a scheduler's SIGTERM) on again: a second one must not
        # cut this message short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nInterrupted.", file=sys.stderr)
        if progress.finished_epoch:
            command = processes.resume_command(display_path(Path(__file__)), display_path(run.run_dir))
            print(
                f"{display_path(run.run_dir / ckpt.LAST_NAME)} holds the end of epoch {progress.finished_epoch}; "
                f"continue with:\n  {command}",
                file=sys.stderr,
            )
        else:
            print("No epoch had finished, so there is nothing to resume; start the run again.", file=sys.stderr)
            if processes.is_main and not any(run.run_dir.iterdir()):
                run.run_dir.rmdir()
        sys.exit(130)
    except NonFiniteLoss as error:
        if not processes.is_main:
            sys.exit(1)  # every process stopped at the same step; rank 0 says why
        raise PetsegError(
            f"the training loss became NaN or infinite at epoch {progress.finished_epoch + 1}, step {error.step} "
            f"(seen at step {error.noticed_at}: the loss is read every {READ_EVERY} steps): the run diverged. "
            f"Try a lower -lr (this run used {args.learning_rate:g}) or --no-amp. The best checkpoint so far "
            f"(epoch {progress.best_epoch}) is kept in {display_path(run.run_dir)}."
        ) from error
    except torch.cuda.OutOfMemoryError as error:
        cache_on_gpu = run.trainer.loader.cache_device.type == "cuda"
        raise PetsegError(
            f"the GPU ran out of memory with -b {args.batch_size} at --image-size {args.image_size} ({args.network}). "
            f"Try a smaller -b (e.g. {max(1, args.batch_size // 2)}) or --image-size"
            f"{', or --no-cache (the decode-once cache is in the GPU memory)' if cache_on_gpu else ''}, or close "
            "other programs using the GPU."
        ) from error


# ----------------------------------------------------------------------------- test and results


def test_best(run: Run) -> EvalResult:
    """best.pt's scores on the test split, decoded afresh, once, to also score each image at its own size
    (the same loader inference.py uses)."""
    args, processes = run.args, run.processes
    distributed.barrier()  # best.pt is written
    run.trainer.validated().load_state_dict(ckpt.load_checkpoint(run.run_dir / ckpt.BEST_NAME)["model_state"])
    test_loader = eval_loader(
        run.data_path, "test", args.image_size, IMAGENET_MEAN, IMAGENET_STD, args.batch_size // processes.world_size,
        args.num_workers, run.device, skip_bad=args.skip_bad, original_masks=True, shard=processes.shard,
    )
    return evaluate(run.trainer.validated(), test_loader, run.device, amp=run.amp, loss_fn=run.loss_fn, desc="test")


def write_results(run: Run, test: EvalResult) -> None:
    """Print the test scores; rank 0 writes results.json and shrinks last.pt to the final weights."""
    progress, run_dir = run.progress, run.run_dir
    print(
        f"Best valid Dice {progress.best_dice:.4f} at epoch {progress.best_epoch}; test set "
        f"({len(test.per_image_dice)} images) with that checkpoint:"
    )
    print(format_result("test", test))
    if not run.processes.is_main:
        return
    results = {
        "network": run.args.network,
        "checkpoint": ckpt.BEST_NAME,
        "best_epoch": progress.best_epoch,
        "epochs_run": len(progress.history),
        "valid_dice": progress.best_dice,
        "test": test.summary(),
        "train_seconds": sum(row["seconds"] for row in progress.history),
        "args": run_state.plain_args(run.args),
    }
    resume_command = run.processes.resume_command(display_path(Path(__file__)), display_path(run_dir))
    with storage.write_failures_explained(run_dir, resume_command):  # --resume redoes the test, then this
        with atomic_write(run_dir / "results.json", "w") as file:
            json.dump(results, file, indent=2)
        # A finished run cannot be resumed: last.pt keeps the final weights, without the optimiser's
        # moments that made up two thirds of it.
        last = ckpt.load_checkpoint(run_dir / ckpt.LAST_NAME)
        del last["training"]
        ckpt.save_checkpoint(run_dir / ckpt.LAST_NAME, **last)
    print(
        f"Saved {display_path(run_dir / ckpt.BEST_NAME)} and results.json, history.csv, curves.png and last.pt "
        "(the final epoch's weights) beside it."
    )


if __name__ == "__main__":
    run_script(main)
