"""Decode once: each split's images and masks resized once and kept as uint8 .npy files (decoding every epoch
leaves the GPU waiting). Rebuilt by itself when the size or a source file (name, size, mtime) changes or a file
of it is damaged; kept in memory for the run where it cannot be saved (docs/speed.md#decode-once)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from errors import describe_os_error, display_path
from files import REPO_ROOT, atomic_write
from oxford_pet import OxfordPetSegmentation, image_path, trimap_path

CACHE_FORMAT = 2  # 2: the names file also holds each array's CRC-32
DEFAULT_CACHE_DIR = Path(os.environ.get("PETSEG_CACHE_DIR", REPO_ROOT / "dataset" / "cache"))


@dataclass
class CachedSplit:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    masks: torch.Tensor  # uint8 (N, 1, S, S), values 0/1
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.masks.nbytes

    def to(self, device: torch.device) -> CachedSplit:
        return CachedSplit(self.images.to(device), self.masks.to(device), self.names)


def cache_bytes(n_images: int, size: int) -> int:
    return n_images * 4 * size * size


# Where free memory cannot be measured, a cache up to this size is still used: any machine that trains has it.
UNMEASURED_MEMORY_CACHE_LIMIT = 4 * 2**30
PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number; anything this big is no limit.
CGROUP_V1_NO_LIMIT = 2**60


def _read_text(path: Path) -> str | None:
    try:
        with open(path) as file:  # open(), not Path.read_text: tests fake a system without /proc through it
            return file.read()
    except OSError:
        return None


def _mem_available() -> int | None:
    """Linux's MemAvailable: what the kernel can hand out now, page cache it can drop included."""
    lines = (_read_text(PROC / "meminfo") or "").splitlines()
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)


def _cgroup_left(folder: Path, limit_file: str, usage_file: str, reclaimable_keys: tuple[str, ...]) -> int | None:
    """One cgroup's limit less its usage, page cache it can drop not counted as used; None when it has no limit."""
    limit_text, usage_text = _read_text(folder / limit_file), _read_text(folder / usage_file)
    if limit_text is None or usage_text is None or limit_text.strip() == "max":
        return None
    limit = int(limit_text)
    if limit >= CGROUP_V1_NO_LIMIT:
        return None
    stat = dict(line.split() for line in (_read_text(folder / "memory.stat") or "").splitlines() if " " in line)
    reclaimable = next((int(stat[key]) for key in reclaimable_keys if key in stat), 0)
    return max(0, limit - max(0, int(usage_text) - reclaimable))


def _cgroup_memory_left() -> int | None:
    """What this process's memory cgroups (a container's, a SLURM job's) still allow: the least over its
    cgroup and those above it, v2 or v1; None where none sets a limit."""
    lefts = []
    for line in (_read_text(PROC / "self" / "cgroup") or "").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            mount, files = CGROUP_ROOT, ("memory.max", "memory.current", ("inactive_file",))
        elif "memory" in controllers.split(","):
            mount, files = CGROUP_ROOT / "memory", (
                "memory.limit_in_bytes", "memory.usage_in_bytes", ("total_inactive_file", "inactive_file")
            )
        else:
            continue
        # Inside a container the cgroup's own folder is usually mounted as the root, and the path is not there.
        folder = mount / path.lstrip("/")
        folders = [folder, *folder.parents[: len(folder.relative_to(mount).parts)]] if folder.is_dir() else [mount]
        lefts += [left for left in (_cgroup_left(here, *files) for here in folders) if left is not None]
    return min(lefts) if lefts else None


def _macos_available() -> int | None:
    """Free plus inactive pages (what macOS hands out without swapping), from vm_stat; None if it cannot run."""
    try:
        output = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = re.search(r"page size of (\d+) bytes", output)
    counts = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)\.", output, flags=re.MULTILINE))
    if page is None or len(counts) < 2:
        return None
    return int(page.group(1)) * sum(int(count) for count in counts.values())


def available_memory_bytes() -> int | None:
    """Memory this process may still take: on Linux the smaller of MemAvailable and what its cgroup's limit
    leaves (a container's, a SLURM job's); on macOS free plus inactive memory; None where it cannot be
    measured (Windows, or macOS without vm_stat)."""
    if sys.platform == "darwin":
        return _macos_available()
    known = [left for left in (_mem_available(), _cgroup_memory_left()) if left is not None]
    if known:
        return min(known)
    try:  # other Unixes, or a Linux without MemAvailable: free pages alone, which leaves out the page cache
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def cache_fits_in_memory(needed: int) -> bool:
    """Whether a cache of `needed` bytes takes at most half the free memory; says why when it is not used."""
    available = available_memory_bytes()
    if available is None:
        fits = needed <= UNMEASURED_MEMORY_CACHE_LIMIT
        choice = "using it" if fits else "decoding every epoch instead"
        print(
            f"note: free memory cannot be measured on this system; the decode-once cache needs "
            f"{needed / 2**30:.1f} GiB, so {choice} (pass --no-cache if memory runs short).",
            file=sys.stderr,
        )
        return fits
    if needed > available // 2:
        print(
            f"warning: the cache needs {needed / 2**30:.1f} GiB, more than half the free memory "
            f"({available / 2**30:.1f} GiB, within this container's or job's memory limit if it has one); "
            "decoding every epoch instead.",
            file=sys.stderr,
        )
        return False
    return True


def fingerprint(dataset: OxfordPetSegmentation, size: int) -> str:
    """Changes whenever anything the cached arrays were made from changes."""
    digest = hashlib.sha256(f"{CACHE_FORMAT} {dataset.data_path.resolve()} {dataset.split} {size}".encode())
    for name in dataset.names:
        for path in (image_path(dataset.data_path, name), trimap_path(dataset.data_path, name)):
            stat = path.stat()
            digest.update(f"{name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _damage(index: object, arrays: dict[str, np.ndarray], names: list[str]) -> str:
    """What is wrong with a cache whose arrays could be read, of the right shape ("" when nothing): its names file
    against the split, each array against its CRC-32 (a second or so for the full dataset's)."""
    if not isinstance(index, dict) or index.get("names") != names or not isinstance(index.get("crc32"), dict):
        return "its names file does not match the dataset's split"
    # The first array that fails, so that a damaged images file spares reading the masks' CRC.
    failed = next((kind for kind, array in arrays.items() if _crc32(array) != index["crc32"].get(kind)), None)
    return "" if failed is None else f"its {failed} fail their CRC-32 check"


def _read_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A cache file's array, its header checked against the expected shape before any data is read (a damaged
    header could otherwise have numpy allocate terabytes)."""
    mapped = np.load(path, mmap_mode="r")
    if mapped.shape != shape or mapped.dtype != np.uint8:
        raise ValueError(f"{path.name} holds {mapped.dtype} {mapped.shape}, not uint8 {shape}")
    array = np.array(mapped)
    del mapped  # Windows keeps a mapped file open, so that another run could not replace it
    return array


def _load(files: dict[str, Path], shapes: dict[str, tuple[int, ...]], names: list[str]) -> CachedSplit | None:
    """The cache these files hold, or None when there is none to use: not built yet, half-built, removed
    as stale by a run of another fingerprint while this one was about to read it, or damaged (said in a note)."""
    try:
        index = json.loads(files["names"].read_text())  # written last: once it is there, the arrays are complete
        arrays = {kind: _read_array(files[kind], shapes[kind]) for kind in ("images", "masks")}
    except FileNotFoundError:
        return None
    # Cut short, overwritten, a garbled header: numpy's and json's parsers fail in many ways, each meaning damage.
    except Exception as error:  # noqa: BLE001
        problem = f"it cannot be read: {type(error).__name__}: {error}"
    else:
        problem = _damage(index, arrays, names)
        if not problem:
            return CachedSplit(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["masks"]), list(names))
    print(f"note: the decode-once cache {display_path(files['names'])} is damaged ({problem}); rebuilding it.",
          file=sys.stderr)
    return None


def _save(files: dict[str, Path], arrays: dict[str, np.ndarray], names: list[str], saved: list[Path]) -> None:
    """Save the arrays, then the names file; `saved` collects each array file once this call has put it in place."""
    files["images"].parent.mkdir(parents=True, exist_ok=True)
    for kind, array in arrays.items():
        with atomic_write(files[kind]) as file:
            np.save(file, array)
        saved.append(files[kind])
    # The names file goes last: the cache counts as complete only once it is there.
    with atomic_write(files["names"], "w") as file:
        json.dump({"names": names, "crc32": {kind: _crc32(array) for kind, array in arrays.items()}}, file)


def load_or_build(
    dataset: OxfordPetSegmentation, size: int, cache_dir: Path = DEFAULT_CACHE_DIR, num_workers: int = 0
) -> CachedSplit:
    """The split's cached arrays at size x size, decoding and resizing every pair once if needed. Where
    they cannot be saved (a read-only or full disk) they are kept in memory for this run, with a note."""
    cache_dir = Path(cache_dir)
    prefix = f"{hashlib.sha256(str(dataset.data_path.resolve()).encode()).hexdigest()[:8]}-{dataset.split}-{size}"
    base = f"{prefix}-{fingerprint(dataset, size)}"
    files = {kind: cache_dir / f"{base}.{kind}.npy" for kind in ("images", "masks")}
    files["names"] = cache_dir / f"{base}.names.json"
    n = len(dataset)
    shapes = {"images": (n, 3, size, size), "masks": (n, 1, size, size)}
    cached = _load(files, shapes, dataset.names)
    if cached is not None:
        return cached

    arrays = {kind: np.empty(shape, dtype=np.uint8) for kind, shape in shapes.items()}
    resized = copy.copy(dataset)  # its pairs squashed to size x size, still uint8: what the cache stores
    # The same resize the per-image eval transform applies, so cached and uncached tensors are equal.
    resized.transform = v2.Resize((size, size), antialias=True)
    # Its own generator: building must not draw from the global RNG, or a run's random stream
    # (and so its weights) would depend on whether the cache already existed.
    loader = DataLoader(resized, batch_size=16, num_workers=num_workers, generator=torch.Generator())
    progress = tqdm(loader, desc=f"caching {dataset.split} at {size}px", unit="batch", dynamic_ncols=True)
    for i, (images, masks) in enumerate(progress):
        rows = slice(i * loader.batch_size, i * loader.batch_size + len(images))
        arrays["images"][rows], arrays["masks"][rows] = images.numpy(), masks.numpy()
    saved: list[Path] = []
    try:
        _save(files, arrays, dataset.names, saved)
    except OSError as error:
        for path in saved:  # what this call saved before the failure is no use alone; another run's files stay
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        print(
            f"note: the decode-once cache cannot be saved ({describe_os_error(error)}) The decoded images are kept "
            "in memory for this run only; pass a --cache-dir (or PETSEG_CACHE_DIR) on a writable disk to keep them.",
            file=sys.stderr,
        )
    else:
        for stale in cache_dir.glob(f"{prefix}-*"):
            if not stale.name.startswith(base):
                # Another run may have removed it first, or (on Windows) still be reading it: both are fine.
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    stale.unlink()
    return CachedSplit(torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["masks"]), list(dataset.names))

