"""Where a run writes: its folders checked before it starts, the free space weighed against its
checkpoints, and a disk that fills mid-run reported with what is kept and how to continue."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import checkpoint as ckpt
from errors import PetsegError, describe_os_error, display_path, os_error_behind
from models import build_model, model_kwargs

# history.csv, curves.png and the checkpoints' own headers and plain values, which the tensors' bytes leave out.
OTHER_FILES_BYTES = 4 * 2**20


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else the closest folder above it that does (where it would be made)."""
    path = Path(path).absolute()
    while not os.path.exists(path) and path != path.parent:  # os.path.exists: False, not an error, when unsearchable
        path = path.parent
    return path


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made if missing), as words that follow its name; None when
    they can. Nothing is written to find out."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        if existing == Path(folder).absolute():
            return "is a file, not a folder"
        return f"cannot be made: {display_path(existing)} is a file, not a folder"
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    if hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"is on a read-only file system ({display_path(existing)} cannot be written)"
    return f"cannot be written: permission denied on {display_path(existing)}"


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class CheckpointSizes:
    """Bytes of a run's two checkpoints."""

    best: int  # the weights
    last: int  # the weights, AdamW's two moments of each, and with --ema the raw weights as well

    def first_epoch(self) -> int:
        """Both written once, with nothing old beside them."""
        return self.best + self.last + OTHER_FILES_BYTES

    def replacing(self) -> int:
        """The peak from epoch 2 on: best.pt, the old last.pt and the new one written beside it before the rename."""
        return self.best + 2 * self.last + OTHER_FILES_BYTES


class _ShapesOnly(TorchFunctionMode):
    """Skips the random initialisers, which on the meta device cost most of a second the first time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.normal_, torch.Tensor.uniform_):
            return args[0]
        return func(*args, **(kwargs or {}))


def checkpoint_sizes(network: str, model_kwargs: dict, ema: bool) -> CheckpointSizes:
    """What best.pt and last.pt will take, from the network's shapes alone (built on the meta device: no memory,
    a few milliseconds)."""
    with torch.device("meta"), _ShapesOnly():
        model = build_model(network, **model_kwargs)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    moments = 2 * sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return CheckpointSizes(best=weights, last=weights * (2 if ema else 1) + moments)


def check_before_training(parser: argparse.ArgumentParser, args: argparse.Namespace, talks: bool = True) -> None:
    """Flag errors, with nothing written, for a run folder or --cache-dir that cannot be a folder to write
    in, or a run folder whose disk cannot hold the first checkpoints; a warning (when `talks`) where it holds
    them but not their replacements. An unwritable --cache-dir is no error: the run keeps the cache in memory."""
    resuming = args.resume is not None
    run_folder = args.resume.parent if resuming else args.save_dir
    flag = f"the run folder of --resume, {run_folder}," if resuming else f"--save-dir {run_folder}"
    problem = folder_problem(run_folder)
    if problem is not None:
        instead = ("resume from a copy of the run folder on a disk you can write" if resuming
                   else "pass a --save-dir you can write in (a folder, made if missing)")
        parser.error(f"{flag} {problem}. Fix that, or {instead}; nothing was written.")
    if not args.no_cache and not nearest_existing(args.cache_dir).is_dir():
        parser.error(
            f"--cache-dir {args.cache_dir} {folder_problem(args.cache_dir)}. Pass a folder (it is made if "
            "missing), or --no-cache."
        )
    sizes = checkpoint_sizes(args.network, model_kwargs(args.network, args), bool(args.ema))
    free = shutil.disk_usage(nearest_existing(run_folder)).free
    # A resumed run's checkpoints are there already: it needs room for one more written beside them.
    needed_now = sizes.last + OTHER_FILES_BYTES if resuming else sizes.first_epoch()
    needed_later = needed_now if resuming else sizes.replacing()
    parts = f"best.pt {size_text(sizes.best)}, last.pt with the optimiser's state {size_text(sizes.last)}"
    if free < needed_now:
        instead = ("copy the run folder to a disk with room and resume from there" if resuming
                   else "pass a --save-dir on another disk")
        parser.error(
            f"{flag} has {size_text(free)} free on its disk, but this run's checkpoints need {size_text(needed_now)} "
            f"({parts}). Free some space there, or {instead}; nothing was written."
        )
    if free < needed_later and talks:
        print(
            f"warning: {flag} has {size_text(free)} free on its disk; this run's checkpoints ({parts}) take "
            f"{size_text(needed_later)} from epoch 2 on, when each new one is written beside the old one before "
            "replacing it. The run may stop with the disk full; the checkpoints written until then stay whole, and "
            "it can be resumed once there is room.",
            file=sys.stderr,
        )


def describe_kept_checkpoints(run_dir: Path, resume_command: str) -> str:
    """Which of the run's checkpoints are whole and what they hold, and how to go on from them."""
    kept, resumable = [], False
    for name in (ckpt.BEST_NAME, ckpt.LAST_NAME):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            checkpoint = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError:
            kept.append(f"{display_path(path)} is damaged")
            continue
        epoch = checkpoint["epoch"]
        if name == ckpt.BEST_NAME:
            kept.append(f"{display_path(path)} (epoch {epoch}, valid Dice {checkpoint['valid_dice']:.4f})")
        else:
            kept.append(f"{display_path(path)} (the end of epoch {epoch})")
            resumable = "training" in checkpoint
    whole = f"Kept whole: {', '.join(kept)}. " if kept else ""
    if not resumable:
        return f"{whole}No last.pt to resume from was written yet: free some space, then start the run again."
    return f"{whole}Once there is room, continue the run with:\n  {resume_command}"


@contextlib.contextmanager
def write_failures_explained(run_dir: Path, resume_command: str) -> Iterator[None]:
    """A failed write of the run's files (disk full, quota, ...) becomes one message: what failed, which
    checkpoints are whole, and the command that continues the run. The failed file's temporary copy is
    already gone (files.atomic_write)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        os_error = os_error_behind(error)
        if os_error is None:
            raise
        raise PetsegError(
            f"{describe_os_error(os_error)}\nThe run stopped. {describe_kept_checkpoints(run_dir, resume_command)}"
        ) from error
