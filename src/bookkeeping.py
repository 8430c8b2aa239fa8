"""What a run keeps after each epoch, without holding training up: history.csv every epoch, best.pt when the valid
Dice improves, last.pt and curves.png after epoch 1, then every --save-every seconds, at the end and at every stop
(docs/training.md has the why). The checkpoints are written one at a time, each atomic and fsync'd, by a thread of
their own from a host copy (HostCopy) taken at each epoch's end; a failed write is raised in the training thread at
its next call (storage.write_failures_explained); interrupts wait while a write is handed over or the last one
finishes (interrupts.sigint_deferred)."""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import checkpoint as ckpt
import storage
from devices import non_blocking
from files import atomic_write
from interrupts import sigint_deferred
from plots import plot_learning_curves_or_warn

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_dice", "valid_loss", "valid_dice", "valid_dataset_dice", "valid_iou", "seconds",
)
DEFAULT_SAVE_EVERY = 60.0  # seconds between writes of last.pt and curves.png
clock = time.monotonic  # the clock the intervals are measured by (a test sets its own)


def write_history(history: list[dict], path: Path) -> None:
    with atomic_write(path, "w") as file:
        writer = csv.DictWriter(file, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)


class HostCopy:
    """A copy in host memory of a checkpoint's contents, into buffers made once and reused: page-locked where
    the copy from the device can be asynchronous (CUDA), so that taking it queues a copy and returns."""

    def __init__(self, device: torch.device) -> None:
        self.pinned = non_blocking(device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.contents: dict[str, Any] | None = None
        self.epoch = 0
        self._copied: torch.cuda.Event | None = None

    def take(self, contents: dict[str, Any], epoch: int) -> None:
        self.contents, self.epoch = self._copy(contents, ""), epoch
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def ready(self) -> dict[str, Any]:
        """The contents, once their copy from the device has landed (waits for it on CUDA)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self.contents

    def _copy(self, value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty_like(value, device="cpu", pin_memory=self.pinned and value.device.type == "cuda")
                self.buffers[key] = buffer
            return buffer.copy_(value.detach(), non_blocking=self.pinned)
        if isinstance(value, dict):
            return {name: self._copy(item, f"{key}/{name}") for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, f"{key}/{index}") for index, item in enumerate(value))
        return value  # plain values: numbers, strings, and lists of them rebuilt above


class Bookkeeper(contextlib.AbstractContextManager):
    """Rank 0's files of one run (other processes keep none, `writes` False): call after_epoch at the end of
    each epoch, and save_latest at the end of the run and before any stop; use it as a context manager, so
    that its writer is done before the run ends. A failed write names `resume_command`; curves.png is titled
    `title`."""

    def __init__(
        self, run_dir: Path, device: torch.device, save_every: float, writes: bool, resume_command: str, title: str,
        saved_epoch: int = 0,
    ) -> None:
        self.run_dir, self.save_every, self.writes = run_dir, save_every, writes
        self.resume_command, self.title = resume_command, title
        self.host = HostCopy(device)
        self.saved_epoch = saved_epoch  # the epoch last.pt holds, set by the writer once it is written
        self._queued_last = saved_epoch  # the epoch of the latest last.pt handed to the writer (training thread's)
        self._last_saved_at = clock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="petseg-checkpoints")
        self._pending: Future | None = None

    def __exit__(self, *exc_info: object) -> None:
        self._writer.shutdown(wait=True)

    def after_epoch(
        self, epoch: int, history: list[dict], improved: bool, contents: Callable[[], dict[str, Any]]
    ) -> None:
        """`contents()` gives what last.pt would hold now (best.pt holds the same without its "training")."""
        if not self.writes:
            return
        with sigint_deferred(), storage.write_failures_explained(self.run_dir, self.resume_command):
            write_history(history, self.run_dir / "history.csv")
            # One write at a time, and the host copy free again: training waits here only for a write that
            # outlasted the epoch. Every epoch is copied, so that a stop writes the latest one.
            self.wait()
            self.host.take(contents(), epoch)
            due = self._queued_last == 0 or clock() - self._last_saved_at >= self.save_every
            if improved or due:
                self._submit(best=improved, last=due)
            if due:
                self._draw(history)  # curves.png on last.pt's clock

    def save_latest(self, history: list[dict]) -> int:
        """At the end and before any stop: last.pt from the latest host copy if it is newer than the file, every
        write waited for, the figure drawn; returns the epoch last.pt holds."""
        if not self.writes:
            return self.saved_epoch
        with sigint_deferred(), storage.write_failures_explained(self.run_dir, self.resume_command):
            self.wait()
            if self.host.epoch > self.saved_epoch:
                self._submit(best=False, last=True)
                self.wait()
            self._draw(history)
        return self.saved_epoch

    def save_final_weights(self) -> None:
        """A finished run cannot be resumed: last.pt keeps the final weights without the optimiser's moments that
        made up two thirds of it, taken from the host copy it was written from (else read back from the file)."""
        if not self.writes:
            return
        self.wait()
        same = self.host.epoch and self.host.epoch == self.saved_epoch
        contents = self.host.ready() if same else ckpt.load_checkpoint(self.run_dir / ckpt.LAST_NAME)
        ckpt.save_checkpoint(self.run_dir / ckpt.LAST_NAME, **{k: v for k, v in contents.items() if k != "training"})

    def _draw(self, history: list[dict]) -> None:
        if history:  # none when stopped before the first epoch ended
            plot_learning_curves_or_warn([(self.run_dir.name, history)], self.run_dir / "curves.png", self.title)

    def wait(self) -> None:
        """Wait for the write in progress; its error, if it failed, is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _submit(self, best: bool, last: bool) -> None:
        epoch = self.host.epoch
        if last:
            self._last_saved_at, self._queued_last = clock(), epoch
        self._pending = self._writer.submit(self._write, best, last, epoch)

    def _write(self, best: bool, last: bool, epoch: int) -> None:
        contents = self.host.ready()
        weights = {key: value for key, value in contents.items() if key != "training"}
        # best before last: a crash between the two resumes from the older last.pt, which redoes these epochs.
        if best:
            ckpt.save_checkpoint(self.run_dir / ckpt.BEST_NAME, **weights)
        if last:
            ckpt.save_checkpoint(self.run_dir / ckpt.LAST_NAME, **contents)
            self.saved_epoch = max(self.saved_epoch, epoch)  # read by the training thread after wait()
