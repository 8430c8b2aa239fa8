"""One live process per run folder: a lock file beside the folder holds the owner's process id, and the operating
system drops the lock when that process ends, however it ends, so a killed run's lock never blocks the next."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from errors import PetsegError, display_path

if os.name == "nt":
    import msvcrt

    # Windows' locks keep other processes from reading the bytes they cover: lock one far past the process id.
    _LOCKED_BYTE = 2**30
else:
    import fcntl

# File systems that cannot lock (some network and FUSE mounts) say so with one of these.
_NO_LOCKING = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS") if hasattr(errno, name)}


def lock_path(run_dir: Path) -> Path:
    """The lock of a run folder: beside it, so that it can be taken before the folder exists and never shows
    among the run's files."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process while the block runs. Another live process holding it is a
    PetsegError naming that process's id; a lock left by a process that has ended is taken over silently."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, run_dir)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, path)


def _acquire(path: Path, run_dir: Path) -> int | None:
    """An open descriptor of the lock file, locked, with this process's id in it; None where the file system
    cannot lock (warned of)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = _try_lock(fd)
        except OSError as error:
            os.close(fd)
            if error.errno not in _NO_LOCKING:
                raise
            print(
                f"warning: the file system of {display_path(run_dir)} cannot lock files, so nothing stops a "
                "second process from training into the same run folder: make sure none does.",
                file=sys.stderr,
            )
            return None
        if not locked:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            # Between another process's lock and its writing its id, the file is empty.
            owner = f"process id {text}" if text.isdigit() else "its process id not yet written"
            raise PetsegError(
                f"{display_path(run_dir)} is being written by another live process ({owner}): two processes "
                "training into one run folder would overwrite each other's checkpoints. Wait for it to finish or "
                "stop it, then run again; or pass another --run-name to train beside it."
            )
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # the file locked is still the one at `path`
                break
        os.close(fd)  # its previous owner removed it between our open and our lock: lock the file there now
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _try_lock(fd: int) -> bool:
    """Lock the file without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # flock says EWOULDBLOCK; msvcrt EACCES
        return False
    except OSError as error:
        if error.errno == errno.EDEADLK:  # msvcrt, once its retries are up
            return False
        raise
    return True


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then unlock it. In that order on POSIX: a process that opened the file meanwhile
    then locks a file no longer there, which _acquire notices. Windows refuses to remove an open file, so there
    it goes after unlocking, unless another process has opened it by then."""
    if os.name == "nt":
        with contextlib.suppress(OSError):
            os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    os.close(fd)  # closing drops the lock
