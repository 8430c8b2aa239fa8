"""Run a command until a deadline. At the deadline it gets Ctrl-C first, so that a training run keeps
its last finished epoch and says how to resume; whatever has not stopped after a grace period is killed."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

GRACE_SECONDS = 20.0


def _signal(process: subprocess.Popen, signum: int, whole_group: bool) -> None:
    try:
        if whole_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:  # it has gone already
        pass


def _die_with_parent() -> None:
    """In the child, before it runs the command: Linux kills it when its parent dies, however that dies (a
    SIGKILL too), so that no stage goes on holding the GPU after gpu_check is gone."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


def stop(process: subprocess.Popen, whole_group: bool, grace: float = GRACE_SECONDS) -> None:
    """Ctrl-C, then after `grace` seconds a kill: the process alone, or its whole process group."""
    _signal(process, signal.SIGINT, whole_group)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Even when the process has stopped, its group may hold children it left behind.
    if whole_group or process.poll() is None:
        _signal(process, signal.SIGKILL, whole_group)
    process.wait()


def run_until(
    command: list[str],
    deadline: float,
    output: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    own_group: bool = False,
    grace: float = GRACE_SECONDS,
    every: Callable[[], object] | None = None,
) -> int | None:
    """The command's exit code, or None when `deadline` (a time.monotonic() value) came first and it
    was stopped. Its stdout and stderr are appended to `output`. With own_group it runs in a process
    group of its own, and everything it started is stopped with it; `every` is called every few
    seconds while it runs. Interrupted itself (Ctrl-C, SIGTERM made one), this stops the command
    quickly before passing the interruption on: no child outlives the caller."""
    with open(output, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=own_group,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    stop(process, own_group, grace)
                    return None
                try:
                    return process.wait(timeout=min(left, 5.0))
                except subprocess.TimeoutExpired:
                    if every is not None:
                        every()
        except BaseException:
            stop(process, own_group, grace=min(grace, 5.0))
            raise
