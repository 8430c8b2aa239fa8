"""Train a UNet or ResNet34-UNet from scratch on Oxford-IIIT Pet (pet vs background).

    python src/train.py                      # ResNet34-UNet, the recommended recipe
    python src/train.py -n unet -e 100 -b 16
    python src/train.py --resume saved_models/RUN   # continue an interrupted run

Each run gets its own folder in saved_models/: best.pt (best valid Dice), last.pt (the latest
epoch, for --resume), history.csv, curves.png and, at the end, results.json with the test
scores of best.pt. Every file is replaced atomically, so a crash leaves the previous one whole.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoint as ckpt
import distributed
import storage
from batches import EvalBatches, TrainBatches
from cache import DEFAULT_CACHE_DIR, cache_bytes, cache_fits_in_memory, load_or_build
from cli import argument_parser
from distributed import Processes
from evaluate import default_num_workers, eval_loader, evaluate, format_result
from models import MODEL_NAMES, build_model
from models.resnet34_unet import DEFAULT_DECODER_CHANNELS
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
from utils import (
    LOSS_WEIGHTS,
    REPO_ROOT,
    BCEDiceLoss,
    PetsegError,
    atomic_write,
    autocast,
    auxiliary_loss,
    describe_precision,
    display_path,
    logits_to_mask,
    needs_loss_scaling,
    per_image_dice,
    restore_rng_states,
    rng_states,
    run_script,
    seed_everything,
    sigint_deferred,
    unused_path,
)

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_dice", "valid_loss", "valid_dice", "valid_dataset_dice", "valid_iou", "seconds",
)
WARMUP_FRACTION = 0.1
MIN_WARMUP_STEPS = 10
# Flags that describe the machine rather than the experiment: --resume may change them.
RESUMABLE_FLAGS = (
    "data_path", "no_download", "skip_bad", "no_cache", "cache_dir", "device", "num_workers", "channels_last",
    "sync_bn", "compile", "resume",
)


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
        "recipe for one CUDA GPU; under torchrun the same command trains on several (see README, More GPUs)."
    )
    data = parser.add_argument_group("data")
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

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="architecture")
    model.add_argument(
        "--deep-supervision", action=argparse.BooleanOptionalAction, default=False,
        help="also train 1x1 heads on the coarser decoder stages, their loss halving per stage (training only; "
        "the checkpoint predicts as without them)",
    )
    model.add_argument(
        "--decoder-channels", type=positive(int), nargs=5, default=None, metavar="C",
        help=f"resnet34_unet only: widths of the 5 decoder blocks, coarse to fine "
        f"(default: {' '.join(map(str, DEFAULT_DECODER_CHANNELS))})",
    )
    model.add_argument(
        "--full-res-skip", action=argparse.BooleanOptionalAction, default=False,
        help="resnet34_unet only: give the last decoder block a skip from the input image at full resolution "
        "(its encoder starts at half resolution)",
    )
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
        "--loss", default="bce+dice", choices=LOSS_WEIGHTS,
        help="training loss: BCE plus soft Dice per image, or either alone",
    )
    model.add_argument(
        "--augment", default="default", choices=AUGMENTATIONS,
        help="strength of the training augmentation: light (flip and crops of 80-100%% of the area), default "
        "(flip, crops of 50-100%%, rotation up to 10 degrees, colour jitter 30%%) or strong (crops of 30-100%% "
        "at aspect 2:3 to 3:2, rotation up to 20 degrees, jitter 40%%)",
    )
    model.add_argument(
        "--ema", type=ema_decay, default=0.0,
        help="validate, keep and test an exponential moving average of the weights with this decay per step "
        "(e.g. 0.999, warmed up over the first steps); 0 turns it off",
    )
    model.add_argument(
        "--patience", type=non_negative, default=0,
        help="stop after this many epochs without a better valid Dice; 0 never stops early",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu"
    )
    run.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="mixed precision: bf16, or fp16 with loss scaling on GPUs older than Ampere (default: on for CUDA)",
    )
    run.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory layout, which tensor cores run natively (default: on for CUDA)",
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
    return parser


def plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def plain_args(args: argparse.Namespace) -> dict:
    """The run's flags as plain types, so a checkpoint holding them loads with weights_only=True."""
    return {key: plain(value) for key, value in vars(args).items()}


def parse_args(
    argv: list[str] | None = None, processes: Processes | None = None
) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and for --resume the checkpoint to continue from (its flags merged in)."""
    processes = processes or Processes()
    parser = build_parser()
    args = parser.parse_args(argv)
    resume_from = None
    if args.resume is not None:
        resume_path = ckpt.resolve_checkpoint_path(args.resume, ckpt.LAST_NAME)
        finished = (resume_path.parent / "results.json").exists()
        resume_from = ckpt.load_checkpoint(resume_path)
        if "training" not in resume_from and not (finished and resume_path.name == ckpt.LAST_NAME):
            raise ckpt.CheckpointError(
                f"{args.resume} holds weights only (a best.pt?); --resume needs the run's last.pt or its folder."
            )
        saved = resume_from["args"]
        for key, value in vars(args).items():
            changed = value != parser.get_default(key)
            if key not in RESUMABLE_FLAGS and changed and plain(value) != saved.get(key):
                parser.error(
                    f"--{key.replace('_', '-')} {plain(value)} differs from the resumed run's {saved.get(key)}; "
                    "a resumed run keeps its recipe. Start a new run to change it."
                )
        overrides = {
            key: plain(getattr(args, key)) for key in RESUMABLE_FLAGS if getattr(args, key) != parser.get_default(key)
        }
        # Defaults first: a run saved before a flag existed resumes with that flag's default.
        merged = {**{key: plain(parser.get_default(key)) for key in vars(args)}, **saved, **overrides}
        paths = {key: Path(merged[key]) for key in ("data_path", "save_dir", "cache_dir")}
        args = argparse.Namespace(**{**merged, **paths})
        args.resume = resume_path
        if finished:
            raise PetsegError(
                f"{display_path(resume_path.parent)} has finished (see its results.json); there is nothing to resume."
            )
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
    storage.check_before_training(parser, args, model_kwargs(args), talks=processes.is_main)
    return args, resume_from


def model_kwargs(args: argparse.Namespace) -> dict:
    """The architecture's options from the flags, as plain types (the checkpoint keeps them for inference)."""
    kwargs: dict = {"deep_supervision": args.deep_supervision}
    if args.network == "resnet34_unet":
        kwargs["decoder_channels"] = list(args.decoder_channels or DEFAULT_DECODER_CHANNELS)
        kwargs["full_resolution_skip"] = args.full_res_skip
    return kwargs


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


def write_history(history: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as file:
        file.write(text.getvalue())


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool,
    desc: str,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over the training set; returns the mean loss and the mean per-image Dice of its batches.
    The moving average of the weights, if any, follows every step."""
    model.train()
    loss_sum, dice_sum, seen = 0.0, 0.0, 0
    progress = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for step, (images, masks) in enumerate(progress, start=1):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp):
            outputs = model(images)
        # With --deep-supervision a model in training mode also returns its coarser stages' logits.
        logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, [])
        loss = loss_fn(logits, masks) + auxiliary_loss(loss_fn, aux_logits, masks)
        loss_value = loss.item()
        # Summed over processes, a NaN on any one is a NaN for all: they stop at the same step.
        loss_everywhere = distributed.sum_across([loss_value])[0]
        if not math.isfinite(loss_everywhere):
            raise NonFiniteLoss(step, loss_everywhere)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(distributed.unwrap(model))
        n = len(images)
        loss_sum += loss_value * n
        dice_sum += per_image_dice(logits_to_mask(logits.detach()), masks.bool()).sum().item()
        seen += n
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}")
    loss_sum, dice_sum, seen = distributed.sum_across([loss_sum, dice_sum, seen])
    return {"loss": loss_sum / seen, "dice": dice_sum / seen}


def make_loaders(args: argparse.Namespace, data_path: Path, device: torch.device, processes: Processes) -> tuple:
    """Train and valid batches, and the number of valid images. From the decode-once cache unless --no-cache,
    or it would not fit in memory; either way the training augmentation runs on whole batches on `device`
    (batches.TrainBatches). Each process gets its share of every training batch and of the valid images."""
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


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the model's weights and BatchNorm statistics."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], steps: torch.Tensor) -> None:
        # Warmed up: early on the average follows the model closely, so it is useful from the first epoch.
        weight = 1 - min(decay, (1 + steps.item()) / (10 + steps.item()))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's step counters
            torch._foreach_copy_(averaged, current)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run may resume with another precision (another GPU, or none): only a float16 run's loss
    scale carries over to a float16 run; otherwise the scaler starts afresh or stays off."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


@contextlib.contextmanager
def quiet_unless(talks: bool) -> Iterator[None]:
    """Silence a process that is not rank 0: one log and one set of progress bars per run.
    Its errors still reach the terminal, through run_script, once the block is left."""
    if talks:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def main(argv: list[str] | None = None) -> None:
    processes = distributed.from_environment()  # one process, unless started by torchrun
    args, resume_from = parse_args(argv, processes)
    device = distributed.start(processes, args.device)
    # SIGTERM (a cluster's scheduler, or torchrun passing one on) stops the run as Ctrl-C does.
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    finished = False
    try:
        with quiet_unless(processes.is_main):
            train_and_test(args, resume_from, device, processes)
        finished = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        distributed.stop(wait_for_others=finished)


def train_and_test(
    args: argparse.Namespace, resume_from: dict | None, device: torch.device, processes: Processes
) -> None:
    """The run: train, keep the best-valid-Dice checkpoint, report its test Dice. Under torchrun every
    process runs this; rank 0 alone writes files."""
    amp = args.amp if args.amp is not None else device.type == "cuda"
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    seed_everything(args.seed)
    data_path = distributed.first_on_each_machine(
        processes, lambda: prepare_dataset(args.data_path, download=not args.no_download, skip_bad=args.skip_bad)
    )

    train_loader, valid_loader, n_valid = make_loaders(args, data_path, device, processes)
    if len(train_loader) == 0:
        raise PetsegError(
            f"-b/--batch_size {args.batch_size} is larger than the {train_loader.n_images} training images."
        )

    model = build_model(args.network, **model_kwargs(args)).to(device)
    if resume_from is not None:
        # With --ema, model_state holds the average (what best.pt and inference use); the raw weights are apart.
        model.load_state_dict(resume_from["training"].get("raw_model", resume_from["model_state"]))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = moving_average(model, args.ema) if args.ema else None
    model = distributed.wrap(model, device, args.sync_bn)
    if args.compile:
        model = torch.compile(model)  # after DDP wrapping, as torch's DDP notes advise
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.learning_rate, args.epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, amp))
    loss_fn = BCEDiceLoss(*LOSS_WEIGHTS[args.loss])

    history: list[dict] = []
    best_dice, best_epoch, start_epoch = -1.0, 0, 1
    if resume_from is None:
        run_name = args.run_name or f"{args.network}_{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = distributed.broadcast(make_run_dir(args.save_dir, run_name) if processes.is_main else None)
    else:
        run_dir = args.resume.parent
        state = resume_from["training"]
        saved_images = state.get("train_images", train_loader.n_images)
        if saved_images != train_loader.n_images:
            raise PetsegError(
                f"{display_path(run_dir)} trained on {saved_images} images, but {display_path(data_path)} now gives "
                f"{train_loader.n_images}; its learning-rate schedule is fixed to that many steps. Resume with the "
                "data (and --skip-bad choice) it was trained on."
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(scaler, state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        train_loader.generator.set_state(state["loader_generator"])
        restore_rng_states(state["rng"])
        history, best_dice, best_epoch = state["history"], state["best_dice"], state["best_epoch"]
        start_epoch = resume_from["epoch"] + 1
        print(
            f"Resuming {display_path(run_dir)} after epoch {resume_from['epoch']} "
            f"(best valid Dice {best_dice:.4f} at epoch {best_epoch})"
        )
        saved_processes = resume_from["args"].get("processes", 1)
        if saved_processes != processes.world_size:
            print(
                f"note: the run was saved by {saved_processes} process(es) and continues with {processes.world_size}: "
                "the same images and augmentation per step, but sums in another order, so not bit-identical.",
                file=sys.stderr,
            )
    args.processes = processes.world_size

    n_params = sum(p.numel() for p in model.parameters())
    batch = f"batch {args.batch_size}"
    if processes.launched:
        batch = f"global {batch} = {processes.world_size} processes x {args.batch_size // processes.world_size}"
    print(
        f"{args.network} ({n_params / 1e6:.1f}M parameters) on {device}, {describe_precision(device, amp)}"
        f"{', channels-last' if channels_last else ''}, {batch}; "
        f"{train_loader.n_images} train / {n_valid} valid images at {args.image_size}px"
        f"{'' if train_loader.cached else ', decoded every epoch'}; run folder {display_path(run_dir)}"
    )

    def validated() -> nn.Module:
        """The weights that are validated, kept in best.pt and tested: the moving average with --ema."""
        return ema.module if ema is not None else distributed.unwrap(model)

    def checkpoint_contents(epoch: int, valid_dice: float) -> dict:
        return {
            "network": args.network,
            "model_kwargs": model_kwargs(args),
            "model_state": validated().state_dict(),
            "image_size": args.image_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "epoch": epoch,
            "valid_dice": valid_dice,
            "amp": amp,
            "args": plain_args(args),
        }

    finished_epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            if args.patience and epoch - 1 - best_epoch >= args.patience:
                print(f"Stopping early: no better valid Dice for {args.patience} epochs.")
                break
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, loss_fn, device, amp, f"epoch {epoch}/{args.epochs}",
                ema,
            )
            # Every process scores its share of the valid images; the scores are pooled, so all agree.
            valid = evaluate(validated(), valid_loader, device, amp=amp, loss_fn=loss_fn, desc="valid")
            history.append({
                "epoch": epoch,
                "lr": lr,
                "train_loss": train["loss"],
                "train_dice": train["dice"],
                "valid_loss": valid.loss,
                "valid_dice": valid.dice,
                "valid_dataset_dice": valid.dataset_dice,
                "valid_iou": valid.dataset_iou,
                "seconds": time.perf_counter() - epoch_start,
            })
            improved = valid.dice > best_dice
            if improved:
                best_dice, best_epoch = valid.dice, epoch
            tqdm.write(
                f"epoch {epoch:3d}/{args.epochs}  lr {lr:.2e}  "
                f"train loss {train['loss']:.4f} dice {train['dice']:.4f}  "
                f"valid loss {valid.loss:.4f} dice {valid.dice:.4f}  {history[-1]['seconds']:.1f}s"
                f"{'  *best' if improved else ''}"
            )
            resume_command = processes.resume_command(display_path(Path(__file__)), display_path(run_dir))
            with sigint_deferred(), storage.write_failures_explained(run_dir, resume_command):
                if processes.is_main:
                    write_history(history, run_dir / "history.csv")
                    plot_learning_curves(
                        [(run_dir.name, history)], run_dir / "curves.png",
                        title=f"{args.network}: train (dashed) and valid (solid)",
                    )
                    # best before last: a crash between the two resumes from the older last.pt, which redoes this epoch.
                    if improved:
                        ckpt.save_checkpoint(run_dir / ckpt.BEST_NAME, **checkpoint_contents(epoch, valid.dice))
                    training_state = {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "loader_generator": train_loader.generator.get_state(),
                        "train_images": train_loader.n_images,
                        "rng": rng_states(),
                        "history": history,
                        "best_dice": best_dice,
                        "best_epoch": best_epoch,
                    }
                    if ema is not None:  # model_state holds the average; resuming needs the raw weights too
                        training_state.update(ema=ema.state_dict(), raw_model=distributed.unwrap(model).state_dict())
                    ckpt.save_checkpoint(
                        run_dir / ckpt.LAST_NAME, **checkpoint_contents(epoch, valid.dice), training=training_state
                    )
                finished_epoch = epoch
        distributed.barrier()  # best.pt is written
        checkpoint = ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME)
        validated().load_state_dict(checkpoint["model_state"])
        # Decoded afresh, once, to also score each image at its own size; the same loader inference.py uses.
        test_loader = eval_loader(
            data_path, "test", args.image_size, IMAGENET_MEAN, IMAGENET_STD, args.batch_size // processes.world_size,
            args.num_workers, device, skip_bad=args.skip_bad, original_masks=True, shard=processes.shard,
        )
        test = evaluate(validated(), test_loader, device, amp=amp, loss_fn=loss_fn, desc="test")
    except KeyboardInterrupt:
        # torchrun passes the terminal's Ctrl-C (or a scheduler's SIGTERM) on again: a second one must not
        # cut this message short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nInterrupted.", file=sys.stderr)
        if finished_epoch:
            print(
                f"{display_path(run_dir / ckpt.LAST_NAME)} holds the end of epoch {finished_epoch}; continue with:\n"
                f"  {processes.resume_command(display_path(Path(__file__)), display_path(run_dir))}",
                file=sys.stderr,
            )
        else:
            print("No epoch had finished, so there is nothing to resume; start the run again.", file=sys.stderr)
            if processes.is_main and not any(run_dir.iterdir()):
                run_dir.rmdir()
        sys.exit(130)
    except NonFiniteLoss as error:
        if not processes.is_main:
            sys.exit(1)  # every process stopped at the same step; rank 0 says why
        raise PetsegError(
            f"the training loss became {error.value} at epoch {finished_epoch + 1}, step {error.step}: "
            "the run diverged. "
            f"Try a lower -lr (this run used {args.learning_rate:g}) or --no-amp. The best checkpoint so far "
            f"(epoch {best_epoch}) is kept in {display_path(run_dir)}."
        ) from error
    except torch.cuda.OutOfMemoryError as error:
        raise PetsegError(
            f"the GPU ran out of memory with -b {args.batch_size} at --image-size {args.image_size} ({args.network}). "
            f"Try a smaller -b (e.g. {max(1, args.batch_size // 2)}) or --image-size, or close other programs "
            "using the GPU."
        ) from error

    print(
        f"Best valid Dice {best_dice:.4f} at epoch {best_epoch}; test set ({len(test.per_image_dice)} images) "
        "with that checkpoint:"
    )
    print(format_result("test", test))
    if not processes.is_main:
        return
    results = {
        "network": args.network,
        "checkpoint": ckpt.BEST_NAME,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "valid_dice": best_dice,
        "test": test.summary(),
        "train_seconds": sum(row["seconds"] for row in history),
        "args": plain_args(args),
    }
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
