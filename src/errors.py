"""What the user is told when something goes wrong: our own errors (PetsegError) and the machine's
(a full disk, a read-only folder, ...), each one paragraph naming the path and what to do, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from interrupts import describe, exit_status, ignore_interrupts, interrupts_raised


class PetsegError(Exception):
    """An error the user can fix: scripts print its message, without a traceback, and exit 1."""


def run_script(main: Callable[[], object]) -> None:
    """Run a script's main(); a PetsegError, or an operating-system error (disk full, read-only, permission
    denied, ...), becomes a one-paragraph message and exit code 1. Other errors are our bugs: they keep
    their traceback. SIGINT, SIGTERM and SIGHUP, wherever they come, end it with one line and the exit
    status a shell expects (130, 143, 129), after every `finally` and atomic_write's cleanup has run."""
    # A character the terminal cannot show (an ASCII-only locale, PYTHONIOENCODING=ascii, a Windows console's code
    # page; in a run name or a path) is printed as an escape such as \xfc, not a UnicodeEncodeError ending the script
    # maybe before its results are written.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # not None (pythonw), nor a stream someone replaced
            stream.reconfigure(errors="backslashreplace")
    with interrupts_raised():
        try:
            main()
        except KeyboardInterrupt as interrupt:
            ignore_interrupts()  # a second signal must not cut the message short
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone; the exit status is what counts
                print(f"\nInterrupted by {describe(interrupt)}.", file=sys.stderr)
            sys.exit(exit_status(interrupt))
        except PetsegError as error:
            print(f"error: {_without_worker_traceback(error)}", file=sys.stderr)
            sys.exit(1)
        except (OSError, RuntimeError) as error:
            os_error = os_error_behind(error)
            if os_error is None or os_error.errno not in _OS_ERROR_CODES:
                raise  # not one of the machine's faults we can explain: maybe our bug, so its traceback stays
            print(f"error: {describe_os_error(os_error)}", file=sys.stderr)
            sys.exit(1)


def _without_worker_traceback(error: Exception) -> str:
    """A DataLoader worker re-raises the error with its traceback prepended; the user needs only the message."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in message and marker in message:
        message = message.rsplit(marker, 1)[1].strip()
    return message


def os_error_behind(error: BaseException) -> OSError | None:
    """The operating-system error an exception is, or that torch.save turned into its own RuntimeError
    ("enforce fail at inline_container.cc ... unexpected pos"): else None."""
    if isinstance(error, OSError):
        return error if error.errno is not None else _from_worker(error)
    if isinstance(error, RuntimeError) and "inline_container" in str(error) and isinstance(error.__context__, OSError):
        return error.__context__
    return None


# How an OSError's last line reads, e.g. "OSError: [Errno 28] No space left on device: '/data/x.npy'".
_OS_ERROR_LINE = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?\s*$")


def _from_worker(error: OSError) -> OSError | None:
    """A DataLoader worker's OSError, which torch re-raises in the main process by its type and its text alone:
    its errno and path read back from that text; None for an OSError that never had an errno."""
    found = _OS_ERROR_LINE.search(str(error))
    if "Original Traceback" not in str(error) or found is None:
        return None
    return OSError(int(found[1]), found[2], found[3])  # found[3], the path, is None where the line names none


# errno: (what happened, in plain words; what to do). Windows lacks some codes, so they are looked up by name.
_OS_ERRORS = {
    "ENOSPC": ("the disk is full (no space left on device)", "Free some space on it, or write to another disk."),
    "EDQUOT": ("your disk quota is used up", "Delete files you no longer need, or write to another disk."),
    "EROFS": ("it is on a read-only file system: nothing can be written there", "Choose a folder on a writable disk."),
    "EACCES": ("permission denied", "Choose a path you may use, or ask its owner to change its permissions."),
    "EPERM": ("the operation is not permitted", "Choose a path you may use, or ask its owner to change it."),
    "ENOTDIR": ("a part of the path is a file, not a folder", "Choose another path, or move that file away."),
    "EEXIST": ("it already exists and is in the way (e.g. a file where a folder should be)",
               "Choose another path, or move it away."),
    "EISDIR": ("it is a folder, where a file was expected", "Pass the path of a file."),
    "ENOENT": ("no such file or folder", "Check the path."),
    "ENAMETOOLONG": ("the path is too long for the file system", "Choose a shorter path or name."),
    "EMFILE": ("too many files are open", "Raise the limit (e.g. `ulimit -n 4096`) or pass fewer --num-workers."),
    "ENFILE": ("the system has too many files open", "Close other programs, or pass fewer --num-workers."),
    "EIO": ("the disk could not read or write it (input/output error)", "The disk or network drive may be failing: "
            "copy what you need to another one and check it."),
    "ENOMEM": ("the system ran out of memory", "Close other programs, or pass a smaller -b or fewer --num-workers."),
}
_OS_ERROR_CODES = {getattr(errno, name): text for name, text in _OS_ERRORS.items() if hasattr(errno, name)}


def describe_os_error(error: OSError) -> str:
    """One paragraph for the user: the path, what happened in plain words, what to do."""
    paths = [path for path in (error.filename, error.filename2) if isinstance(path, (str, os.PathLike))]
    where = " -> ".join(display_path(Path(path)) for path in paths) or "a file"
    if error.errno not in _OS_ERROR_CODES:
        detail = error.strerror or _without_worker_traceback(error) or type(error).__name__
        return f"{where}: {detail} (an error of the operating system)."
    happened, advice = _OS_ERROR_CODES[error.errno]
    return f"{where}: {happened}. {advice}"


def display_path(path: Path) -> str:
    """`path` as a user would type it: relative to the working directory when that is shorter, else absolute."""
    path = Path(path)
    absolute = path.resolve() if os.path.exists(path) else path.absolute()  # os.path.exists never raises
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # Windows: another drive has no relative path
        return str(absolute)
    return relative if len(relative) < len(str(absolute)) else str(absolute)
