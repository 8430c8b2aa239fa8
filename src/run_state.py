"""What trains and how it is kept, in one place so that they cannot drift apart: the Trainer built from the flags
(make_trainer); what best.pt and last.pt hold for inference (checkpoint_contents) and what last.pt adds for
--resume (training_state), which restore puts back after merge_resumed_flags has given the run its saved recipe."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import checkpoint as ckpt
import distributed
import models
from batches import TrainBatches
from devices import needs_loss_scaling, optimizer_kernel, restore_rng_states, rng_states
from distributed import Processes
from ema import MovingAverage
from errors import PetsegError, display_path
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD, split_differences

# Flags that describe the machine rather than the experiment: --resume may change them.
RESUMABLE_FLAGS = (
    "data_path", "no_download", "skip_bad", "no_cache", "cache_dir", "device", "num_workers", "channels_last",
    "sync_bn", "compile", "deterministic", "save_every", "resume",
)
PATH_FLAGS = ("data_path", "save_dir", "cache_dir")
WARMUP_FRACTION = 0.1
MIN_WARMUP_STEPS = 10


@dataclass
class Trainer:
    """What trains: the model as it trains (under DDP or torch.compile when used), its optimiser and the rest."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: TrainBatches
    ema: MovingAverage | None = None

    def validated(self) -> nn.Module:
        """The weights that are validated, kept in best.pt and tested: the moving average with --ema."""
        return self.ema.module if self.ema is not None else distributed.unwrap(self.model)


@dataclass
class Progress:
    """How far a run has come: every finished epoch's row of history.csv and the best valid Dice so far."""

    history: list[dict] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = 0
    finished_epoch: int = 0


def make_trainer(
    args: argparse.Namespace, model: nn.Module, loader: TrainBatches, device: torch.device, amp: bool,
    channels_last: bool, resume_from: dict | None,
) -> Trainer:
    """The model as it trains (resumed weights, memory layout, moving average, DDP, compile), the optimiser,
    the learning-rate schedule and the loss scaler."""
    if resume_from is not None:
        # With --ema, model_state holds the average: training continues from the raw weights, kept apart.
        model.load_state_dict(resume_from["training"].get("raw_model", resume_from["model_state"]))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = MovingAverage(model, args.ema) if args.ema else None
    model = distributed.wrap(model, device, args.sync_bn)
    if args.compile:
        warn_if_compile_breaks_at_sync_bn(args, device)
        model = torch.compile(model)  # after DDP wrapping, as torch's DDP notes advise
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, **optimizer_kernel(device)
    )
    scheduler = make_scheduler(optimizer, args.learning_rate, args.epochs, len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, amp))
    return Trainer(model, optimizer, scheduler, scaler, loader, ema)


def warn_if_compile_breaks_at_sync_bn(args: argparse.Namespace, device: torch.device) -> None:
    if device.type == "cuda" and args.sync_bn and distributed.world_size() > 1:  # 1 outside torchrun
        print(
            "warning: torch.compile breaks its graph at every SyncBatchNorm layer (pytorch/pytorch#161302), so "
            "--compile may gain little here; compare with and without it, or pass --no-sync-bn.",
            file=sys.stderr,
        )


def make_scheduler(
    optimizer: torch.optim.Optimizer, max_lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One cycle: the learning rate warms up over the first 10% of the steps, then anneals. A schedule too short
    to warm up gets a warning; under three steps (no warm-up fits) the rate stays at max_lr, rather than OneCycleLR
    failing or leaving it near zero."""
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


def plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def plain_args(args: argparse.Namespace) -> dict:
    """The run's flags as plain types, so a checkpoint holding them loads with weights_only=True."""
    return {key: plain(value) for key, value in vars(args).items()}


def checkpoint_contents(
    args: argparse.Namespace, model: nn.Module, epoch: int, valid_dice: float, amp: bool, dataset: dict | None = None
) -> dict:
    """What best.pt and last.pt hold for inference: the network, its options and weights, and how inputs are
    made; and what their numbers depend on: the epoch, its valid Dice, the flags and the dataset
    (oxford_pet.dataset_record)."""
    return {
        "dataset": dataset,
        "network": args.network,
        "model_kwargs": models.model_kwargs(args.network, args),
        "model_state": model.state_dict(),
        "image_size": args.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "epoch": epoch,
        "valid_dice": valid_dice,
        "amp": amp,
        "args": plain_args(args),
    }


def training_state(trainer: Trainer, progress: Progress) -> dict:
    """What last.pt holds beyond checkpoint_contents, for --resume to continue exactly."""
    state = {
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "loader_generator": trainer.loader.generator.get_state(),
        "train_images": trainer.loader.n_images,
        "rng": rng_states(),
        "history": progress.history,
        "best_dice": progress.best_dice,
        "best_epoch": progress.best_epoch,
    }
    if trainer.ema is not None:  # model_state holds the average; resuming needs the raw weights too
        state.update(ema=trainer.ema.state_dict(), raw_model=distributed.unwrap(trainer.model).state_dict())
    return state


def restore(resume_from: dict, trainer: Trainer) -> Progress:
    """Put last.pt's training state back into `trainer` (whose model make_trainer already loaded)."""
    state = resume_from["training"]
    load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    restore_scaler(trainer.scaler, state["scaler"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.loader.generator.set_state(state["loader_generator"])
    restore_rng_states(state["rng"])
    return Progress(state["history"], state["best_dice"], state["best_epoch"], finished_epoch=resume_from["epoch"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The saved optimiser state, with this machine's kernel choice (AdamW fused on CUDA) rather than the one
    of the machine that saved it. The choice goes into the saved groups before loading, since torch places
    the step counters by it (on the GPU for the fused kernel, on the CPU otherwise) as it loads."""
    kernels = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach") if key in optimizer.param_groups[0]}
    groups = [{**group, **kernels} for group in saved["param_groups"]]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run may resume with another precision (another GPU, or none): only a float16 run's loss scale
    carries over to a float16 run; otherwise the scaler starts afresh or stays off."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def check_same_data(resume_from: dict, dataset: dict, n_train_images: int, run_dir: Path) -> None:
    """--resume continues on the data the run was trained on: the same split files, name for name (a run saved
    before split fingerprints existed: the same number of training images), wherever the folder now is."""
    saved = resume_from.get("dataset")
    differences = [] if saved is None else split_differences(saved["splits"], dataset["splits"])
    saved_images = resume_from["training"].get("train_images", n_train_images)
    if saved_images != n_train_images:  # also --skip-bad leaving out other pairs
        differences.append(f"it trained on {saved_images} images and now gets {n_train_images}")
    if differences:
        raise PetsegError(
            f"{display_path(run_dir)} cannot resume on {dataset['path']}: {'; '.join(differences)}. Resume it with "
            f"the data (and --skip-bad choice) it was trained on"
            f"{f' (--data_path {saved_path})' if (saved_path := (saved or {}).get('path')) else ''}, or train a new "
            "run on this data (without --resume)."
        )
    if saved is not None and saved["path"] != dataset["path"]:
        print(f"note: the dataset is now at {dataset['path']} (the run trained on {saved['path']}); its split "
              "files are the same, name for name.", file=sys.stderr)
    elif saved is None:
        print("note: this run was saved before runs recorded their split; only its number of training images "
              "is checked.", file=sys.stderr)


def check_best_checkpoint(run_dir: Path, progress: Progress, args: argparse.Namespace, resuming: bool) -> dict | None:
    """best.pt, if it is this run's best (checked before a resumed run trains, and before the test scores it);
    else one error saying what is wrong (missing, another run's, another epoch's) and what to do, so that no run
    reports another model's Test Dice. Resuming, a best.pt of an epoch after last.pt's is this run's: it was
    killed before its last.pt (written by time) caught up. Those epochs are redone; the best they found stays
    the best to beat, and the one tested."""
    path = run_dir / ckpt.BEST_NAME
    best = ckpt.load_checkpoint(path) if path.is_file() else None
    if resuming and best is not None and best["epoch"] > progress.finished_epoch:
        print(f"note: {display_path(path)} is from epoch {best['epoch']}, after last.pt's epoch "
              f"{progress.finished_epoch}: the run stopped before last.pt caught up. The epochs after "
              f"{progress.finished_epoch} are trained again; that best.pt stays the best to beat.", file=sys.stderr)
        progress.best_epoch, progress.best_dice = best["epoch"], best["valid_dice"]
    run_id = getattr(args, "run_id", None)
    if best is None:
        problem = "there is no best.pt" if progress.best_epoch else None
    elif run_id is not None and best["args"].get("run_id") not in (None, run_id):
        problem = f"its best.pt is another run's (run id {best['args']['run_id']}, this run's is {run_id})"
    elif (best["epoch"], best["valid_dice"]) != (progress.best_epoch, progress.best_dice):
        problem = (f"its best.pt holds epoch {best['epoch']} (valid Dice {best['valid_dice']:.4f}), but this run's "
                   f"best is epoch {progress.best_epoch} (valid Dice {progress.best_dice:.4f})")
    else:
        problem = None
    if problem is not None:
        raise PetsegError(
            f"{display_path(run_dir)}: {problem}, so its Test Dice would not be this run's. Put the run's own "
            f"best.pt back beside its last.pt, or train a new run (without --resume)."
        )
    return best


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags given on the command line, whatever their value (argparse fills in a default only where an
    attribute is not set yet, so what stays unset was not typed)."""
    untyped = object()
    namespace = argparse.Namespace(**{action.dest: untyped for action in parser._actions})
    return {key for key, value in vars(parser.parse_args(argv, namespace)).items() if value is not untyped}


def merge_resumed_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None = None
) -> tuple[argparse.Namespace, dict]:
    """For --resume: the saved run's flags, with the machine's (RESUMABLE_FLAGS) taken from the command line
    when typed; a typed recipe flag of another value than the run's is a flag error, even when it is the
    default. Returns the flags and the loaded last.pt."""
    resume_path = ckpt.resolve_checkpoint_path(args.resume, ckpt.LAST_NAME)
    finished = (resume_path.parent / "results.json").exists()
    resume_from = ckpt.load_checkpoint(resume_path)
    if "training" not in resume_from and not (finished and resume_path.name == ckpt.LAST_NAME):
        raise ckpt.CheckpointError(
            f"{args.resume} holds weights only (a best.pt?); --resume needs the run's last.pt or its folder."
        )
    saved, typed = resume_from["args"], typed_flags(parser, argv)
    for key in sorted(typed - set(RESUMABLE_FLAGS)):
        if (given := plain(getattr(args, key))) != saved.get(key, plain(parser.get_default(key))):
            parser.error(
                f"--{key.replace('_', '-')} {given} differs from the resumed run's {saved.get(key)}; a resumed "
                "run keeps its recipe. Start a new run to change it."
            )
    overrides = {key: plain(getattr(args, key)) for key in RESUMABLE_FLAGS if key in typed}
    # Defaults first: a run saved before a flag existed resumes with that flag's default.
    merged = {**{key: plain(parser.get_default(key)) for key in vars(args)}, **saved, **overrides}
    args = argparse.Namespace(**{**merged, **{key: Path(merged[key]) for key in PATH_FLAGS}})
    args.resume = resume_path
    if finished:
        raise PetsegError(
            f"{display_path(resume_path.parent)} has finished (see its results.json); there is nothing to resume."
        )
    return args, resume_from


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
