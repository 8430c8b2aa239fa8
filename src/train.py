"""Train a UNet or ResNet34-UNet from scratch on Oxford-IIIT Pet (pet vs background).

    python src/train.py                      # ResNet34-UNet, the recommended recipe
    python src/train.py -n unet -e 100 -b 16
    python src/train.py --resume saved_models/RUN   # continue an interrupted run

Each run gets a folder in saved_models/: best.pt (best valid Dice), last.pt (for --resume), history.csv,
curves.png and, at the end, results.json with best.pt's test scores (docs/training.md says more). The story
reads top to bottom: parse_args() (the flags, the recipe, are train_flags.py's), main(), set_up(), train()
(the epoch loop; what is written after each epoch is bookkeeping.py's), test_best() and write_results().
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint as ckpt
import distributed
import run_state
import storage
from batches import EvalBatches, TrainBatches, make_loaders
from bookkeeping import Bookkeeper
from devices import autocast, configure_backends, default_amp, describe_precision, seed_everything
from distributed import Processes, quiet_unless
from ema import MovingAverage
from errors import PetsegError, display_path, run_script
from evaluate import EvalResult, eval_loader, evaluate, format_result
from files import atomic_write, make_run_dir
from interrupts import describe as describe_interrupt
from interrupts import exit_status, ignore_interrupts, interrupts_raised
from locks import run_lock
from losses import Loss, auxiliary_loss, build_loss
from models import build_model, model_kwargs, refused_options
from models.stats import count_parameters, training_bytes
from oxford_pet import (
    DEFAULT_DATA_PATH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_split_overlap,
    dataset_record,
    prepare_dataset,
)
from run_state import Progress, Trainer, announce_resume, make_trainer
from train_flags import build_parser
from utils import logits_to_mask, per_image_dice

# Steps between reads of the loss on the host: each read waits for the GPU to finish all it was given.
READ_EVERY = 25


def parse_args(
    argv: list[str] | None = None, processes: Processes | None = None
) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and for --resume the checkpoint to continue from (its flags merged in)."""
    processes = processes or Processes()
    parser = build_parser()
    args = parser.parse_args(argv)
    resume_from = None
    if args.resume is not None:
        args, resume_from = run_state.merge_resumed_flags(parser, args, argv)
    if args.data_path != DEFAULT_DATA_PATH and not args.data_path.is_dir():
        parser.error(
            f"--data_path {args.data_path} is not a folder. Point it at the folder holding images/ and "
            f"annotations/, or leave it out to use (and on first use download) {DEFAULT_DATA_PATH}."
        )
    for flag, takers in refused_options(args.network, args):
        decoders = " and ".join(f"the {name} decoder" for name in takers)
        parser.error(f"{flag} shapes {decoders}; drop it for -n {args.network}.")
    if args.batch_size % processes.world_size:
        parser.error(
            f"-b/--batch_size {args.batch_size} is the images of one optimiser step, split evenly over the "
            f"{processes.world_size} processes, and does not divide by {processes.world_size}. "
            f"Use a multiple of {processes.world_size}."
        )
    storage.check_before_training(parser, args, talks=processes.is_main)
    return args, resume_from


# ----------------------------------------------------------------------------- main


@dataclass
class Run:
    """One training run as set_up() makes it: its flags, where it runs, what trains and how far it has come."""

    args: argparse.Namespace
    processes: Processes
    device: torch.device
    amp: bool
    batch_per_process: int  # this process's share of -b: computed once, here
    dataset: dict  # oxford_pet.dataset_record: where the data is and a fingerprint of its splits
    run_dir: Path
    trainer: Trainer
    valid_loader: EvalBatches | DataLoader
    loss_fn: Loss
    progress: Progress
    keeper: Bookkeeper  # history.csv, best.pt, last.pt and curves.png, written as bookkeeping.py says


def main(argv: list[str] | None = None) -> None:
    processes = distributed.from_environment()  # one process, unless started by torchrun
    args, resume_from = parse_args(argv, processes)
    device = distributed.start(processes, args.device)
    finished = False
    # SIGINT, SIGTERM and SIGHUP stop the run the same way from here on (interrupts.py); one live process per run
    # folder (locks.py): a resumed run's is locked before it trains, a new run's once its folder is made.
    try:
        with interrupts_raised(), quiet_unless(processes.is_main), contextlib.ExitStack() as locked:
            if args.resume is not None and processes.is_main:
                locked.enter_context(run_lock(args.resume.parent))
            run = set_up(args, resume_from, device, processes)
            if args.resume is None and processes.is_main:
                locked.enter_context(run_lock(run.run_dir))
            with run.keeper, explained_stops(run):
                train(run)
                write_results(run, test_best(run))
        finished = True
    finally:
        distributed.stop(wait_for_others=finished)


# ----------------------------------------------------------------------------- set up


def set_up(args: argparse.Namespace, resume_from: dict | None, device: torch.device, processes: Processes) -> Run:
    """Data, model, optimiser and run folder, for a new run or one resumed from its last.pt. Under torchrun
    every process runs this; rank 0 alone writes files."""
    amp = args.amp if args.amp is not None else default_amp(device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    configure_backends(device, args.deterministic)
    seed_everything(args.seed)
    # Only a new run may download (into the folder it names); a resumed one trains on the data it had.
    download = not args.no_download and resume_from is None
    data_path = distributed.first_on_each_machine(
        processes, lambda: prepare_dataset(args.data_path, download=download, skip_bad=args.skip_bad)
    )
    check_split_overlap(data_path)
    dataset = dataset_record(data_path)
    args.data_path = data_path  # resolved: a resume from another folder finds the same data
    model = build_model(args.network, **model_kwargs(args.network, args)).to(device)
    per_process = args.batch_size // processes.world_size
    # What training needs on the GPU, which a GPU-resident cache must leave free (the average doubles the weights).
    parameters = count_parameters(model)
    reserve = training_bytes(args.network, args.image_size, per_process, amp, parameters)
    reserve += 4 * parameters if args.ema else 0
    train_loader, valid_loader, n_valid = make_loaders(args, data_path, device, processes, per_process, reserve)
    if len(train_loader) == 0:
        raise PetsegError(
            f"-b/--batch_size {args.batch_size} is larger than the {train_loader.n_images} training images."
        )
    trainer = make_trainer(args, model, train_loader, device, amp, channels_last, resume_from)
    if resume_from is None:
        run_name = args.run_name or f"{args.network}_{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = distributed.broadcast(make_run_dir(args.save_dir, run_name) if processes.is_main else None)
        args.run_id = distributed.broadcast(uuid.uuid4().hex)  # best.pt and last.pt of one run carry the same
        progress = Progress()
    else:
        run_dir = args.resume.parent
        run_state.check_same_data(resume_from, dataset, train_loader.n_images, run_dir)
        progress = run_state.restore(resume_from, trainer)
        run_state.check_best_checkpoint(run_dir, progress, args, resuming=True)
        announce_resume(resume_from, progress, run_dir, processes)
    args.processes = processes.world_size
    keeper = Bookkeeper(
        run_dir, device, args.save_every, processes.is_main, processes.resume_command(display_path(Path(__file__)),
        display_path(run_dir)), f"{args.network}: train (dashed) and valid (solid)", progress.finished_epoch,
    )
    run = Run(args, processes, device, amp, per_process, dataset, run_dir, trainer, valid_loader,
              build_loss(args.loss), progress, keeper)
    print(start_line(run, n_valid, channels_last))
    return run


def start_line(run: Run, n_valid: int, channels_last: bool) -> str:
    args, processes = run.args, run.processes
    n_params = count_parameters(run.trainer.model)
    batch = f"batch {args.batch_size}"
    if processes.launched:
        batch = f"global {batch} = {processes.world_size} processes x {run.batch_per_process}"
    return (
        f"{args.network} ({n_params / 1e6:.1f}M parameters) on {run.device}, {describe_precision(run.device, run.amp)}"
        f"{', channels-last' if channels_last else ''}{', deterministic' if args.deterministic else ''}, {batch}; "
        f"{run.trainer.loader.n_images} train / {n_valid} valid images at {args.image_size}px"
        f"{'' if run.trainer.loader.cached else ', decoded every epoch'}; run folder {display_path(run.run_dir)}"
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
        run.keeper.after_epoch(epoch, progress.history, improved, partial(checkpoint_contents, run, epoch, valid.dice))
        progress.finished_epoch = epoch
    run.keeper.save_latest(progress.history)


class NonFiniteLoss(Exception):
    def __init__(self, step: int, noticed_at: int) -> None:
        super().__init__(f"loss not finite at step {step}, noticed at step {noticed_at}")
        self.step, self.noticed_at = step, noticed_at


def train_one_epoch(
    model: nn.Module, loader: TrainBatches, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, loss_fn: Loss,
    device: torch.device, amp: bool, desc: str, ema: MovingAverage | None = None,
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
            if step % READ_EVERY == 0 and step < steps:
                progress.set_postfix(loss=f"{read_on_host(sums, first_bad_step, step)[0] / seen:.4f}")
            progress.update()
    loss_sum, dice_sum, seen = distributed.sum_across([*read_on_host(sums, first_bad_step, steps), seen])
    return {"loss": loss_sum / seen, "dice": dice_sum / seen}


def read_on_host(sums: torch.Tensor, first_bad_step: torch.Tensor, step: int) -> list[float]:
    """This process's loss and Dice sums so far, read with the first non-finite step of any process (one wait
    for the GPU); raises NonFiniteLoss if there was one."""
    bad = distributed.min_across(torch.where(first_bad_step > 0, first_bad_step, float("inf")))
    *sums, bad_step = torch.cat([sums, bad[None]]).tolist()
    if bad_step != float("inf"):
        raise NonFiniteLoss(int(bad_step), step)
    return sums


def checkpoint_contents(run: Run, epoch: int, valid_dice: float) -> dict:
    """What last.pt holds at the end of `epoch`: the weights and all --resume needs (best.pt: without "training")."""
    contents = run_state.checkpoint_contents(
        run.args, run.trainer.validated(), epoch, valid_dice, run.amp, run.dataset
    )
    return {**contents, "training": run_state.training_state(run.trainer, run.progress)}


@contextlib.contextmanager
def explained_stops(run: Run) -> Iterator[None]:
    """Ctrl-C (or SIGTERM), a diverged loss and a full GPU end the run with what to do next, not a traceback."""
    args, progress, processes = run.args, run.progress, run.processes
    try:
        yield
    except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP (interrupts.Interrupted)
        # torchrun passes the terminal's Ctrl-C (or a scheduler's SIGTERM) on again: a second one must not
        # cut this short. last.pt first: after SIGHUP the terminal may be gone, and printing to it fail.
        ignore_interrupts()
        saved_epoch = run.keeper.save_latest(progress.history)
        if not saved_epoch and processes.is_main and not any(run.run_dir.iterdir()):
            run.run_dir.rmdir()
        with contextlib.suppress(OSError):
            print(f"\nInterrupted by {describe_interrupt(interrupt)}.", file=sys.stderr)
            if saved_epoch:
                print(f"{display_path(run.run_dir / ckpt.LAST_NAME)} holds the end of epoch {saved_epoch}; "
                      f"continue with:\n  {run.keeper.resume_command}", file=sys.stderr)
            else:
                print("No epoch had finished, so there is nothing to resume; start the run again.", file=sys.stderr)
        sys.exit(exit_status(interrupt))
    except NonFiniteLoss as error:
        run.keeper.save_latest(progress.history)
        if not processes.is_main:
            sys.exit(1)  # every process stopped at the same step; rank 0 says why
        kept = f"The best checkpoint so far (epoch {progress.best_epoch}) is kept in {display_path(run.run_dir)}."
        if not progress.best_epoch:
            kept = "No epoch had finished, so no checkpoint was written."
            if not any(run.run_dir.iterdir()):
                run.run_dir.rmdir()
        raise PetsegError(
            f"the training loss became NaN or infinite at epoch {progress.finished_epoch + 1}, step {error.step} "
            f"(seen at step {error.noticed_at}: the loss is read every {READ_EVERY} steps): the run diverged. "
            f"Try a lower -lr (this run used {args.learning_rate:g}) or --no-amp. {kept}"
        ) from error
    except torch.cuda.OutOfMemoryError as error:
        run.keeper.save_latest(progress.history)
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
    best = run_state.check_best_checkpoint(run.run_dir, run.progress, args, resuming=False)
    run.trainer.validated().load_state_dict(best["model_state"])
    test_loader = eval_loader(
        args.data_path, "test", args.image_size, IMAGENET_MEAN, IMAGENET_STD, run.batch_per_process,
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
        "dataset": run.dataset,
        "test": test.summary(),
        "train_seconds": sum(row["seconds"] for row in progress.history),
        "args": run_state.plain_args(run.args),
    }
    with storage.write_failures_explained(run_dir, run.keeper.resume_command):  # --resume redoes the test, then this
        with atomic_write(run_dir / "results.json", "w") as file:
            json.dump(results, file, indent=2)
        run.keeper.save_final_weights()
    print(
        f"Saved {display_path(run_dir / ckpt.BEST_NAME)} and results.json, history.csv, curves.png and last.pt "
        "(the final epoch's weights) beside it."
    )


if __name__ == "__main__":
    run_script(main)
