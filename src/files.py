"""Safe writes: a file is replaced whole or not at all, and an existing one is never silently reused."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from errors import os_error_behind
from interrupts import sigint_deferred

REPO_ROOT = Path(__file__).resolve().parents[1]


# Read once, at import: setting it to read it is process-wide, and would race with threads writing files.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", durable: bool = True) -> Iterator:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file whole.

    durable syncs the file to the disk before the rename, so that it survives a power cut too (costing a disk
    flush per file); without it the rename still leaves the old or the new file whole when the process dies."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        error.filename = str(path)  # the file the user knows of, not the temporary one beside it
        raise
    try:
        # mkstemp makes files private; give them the permissions open() would, where the file system has any.
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_UMASK)
        # Text in UTF-8 on every system (not the locale's encoding, in which a non-ASCII run name or image name
        # may not exist), with the newlines as written: csv already ends its rows in \r\n.
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as file:
            yield file
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        # An interrupt (Interrupted, from interrupts_raised) is one such error; a second one, say a torchrun
        # passing Ctrl-C on again, waits until the temporary file is gone.
        with sigint_deferred():
            with contextlib.suppress(OSError):
                os.close(fd)  # already closed unless fdopen itself failed
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        os_error = os_error_behind(error)
        if os_error is not None and os_error.filename is None and os_error.errno is not None:
            os_error.filename = str(path)  # a failed write names no file: say which
        raise


def unused_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free `stem-2.suffix`, `stem-3.suffix`, ..."""
    path = Path(path)
    numbered = (path.with_name(f"{path.stem}-{n}{path.suffix}") for n in itertools.count(2))
    return next(candidate for candidate in itertools.chain([path], numbered) if not candidate.exists())


def make_run_dir(save_dir: Path, name: str) -> Path:
    """A new folder for this run; an existing one (an earlier run's files) is never reused."""
    save_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = unused_path(save_dir / name)
        with contextlib.suppress(FileExistsError):  # another run took the name between the check and mkdir
            run_dir.mkdir()
            return run_dir
