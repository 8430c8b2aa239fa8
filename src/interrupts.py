"""Ctrl-C, SIGTERM and SIGHUP: one exception that says which signal came, held while a file is written, and
ended with the exit status a shell expects (128 + the signal's number)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# SIGTERM comes from a cluster's scheduler or `kill`; SIGHUP when the terminal goes (a dropped ssh session).
# Windows has no SIGHUP.
INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_DESCRIPTIONS = {"SIGINT": "Ctrl-C (SIGINT)", "SIGHUP": "SIGHUP (the terminal closed)"}


class Interrupted(KeyboardInterrupt):
    """A signal that stops the script. A KeyboardInterrupt, so that whatever handles Ctrl-C (our scripts, and
    PyTorch's DataLoader workers, which then leave quietly) handles SIGTERM and SIGHUP alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signal_number(interrupt: BaseException) -> int:
    """The signal behind an interrupt: Interrupted's own, else SIGINT (Python's default Ctrl-C handler)."""
    return getattr(interrupt, "signum", int(signal.SIGINT))


def exit_status(interrupt: BaseException | int) -> int:
    """The exit status of a script an interrupt (or a signal number) stopped: 128 + the signal's number, as
    shells report a process the signal ended: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (interrupt if isinstance(interrupt, int) else signal_number(interrupt))


def describe(interrupt: BaseException) -> str:
    """The interrupt in words, e.g. "Ctrl-C (SIGINT)" or "SIGTERM"."""
    name = signal.Signals(signal_number(interrupt)).name
    return _DESCRIPTIONS.get(name, name)


def _catchable() -> list[int]:
    """The interrupts that may get a handler here: none off the main thread (Python allows handlers only there),
    and none the process was started ignoring: `nohup` ignores SIGHUP, and a shell's `&` SIGINT, on purpose."""
    if threading.current_thread() is not threading.main_thread():
        return []
    return [signum for signum in INTERRUPTS if signal.getsignal(signum) is not signal.SIG_IGN]


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _handled_by(handler: object) -> Iterator[None]:
    """`handler` for every catchable interrupt inside the block; the previous handlers put back after it."""
    previous = {signum: signal.signal(signum, handler) for signum in _catchable()}
    try:
        yield
    finally:
        for signum, saved in previous.items():
            signal.signal(signum, saved)


def interrupts_raised() -> contextlib.AbstractContextManager:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted inside the block: from a script's first line, so that
    every `finally` runs and atomic_write removes its temporary file for all three. Without it SIGTERM and
    SIGHUP end the process on the spot, leaving a .tmp file of up to a checkpoint's size behind."""
    return _handled_by(_raise_interrupted)


def ignore_interrupts() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from here on: for the message about the first one, which a second
    must not cut short (torchrun passes the terminal's Ctrl-C on to its processes again)."""
    for signum in _catchable():
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, so that a file being written is finished (or
    removed) first; then raise Interrupted for the first that came."""
    received: list[int] = []
    with _handled_by(lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise Interrupted(received[0])
