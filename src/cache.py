"""Decode once: each split's images and masks resized once and kept as uint8 .npy files, then
served in whole batches straight from memory (batches.py; on the GPU when training there).

JPEG decoding costs milliseconds of a CPU core per photo while the models need far less GPU time,
so decoding every image every epoch leaves the GPU waiting. The cache is rebuilt by itself when
the image size or any source file (name, size or modification time) changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from oxford_pet import OxfordPetSegmentation, image_path, trimap_path
from utils import REPO_ROOT, atomic_write

CACHE_FORMAT = 1
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
        """The split with its arrays on `device`."""
        return CachedSplit(self.images.to(device), self.masks.to(device), self.names)


def cache_bytes(n_images: int, size: int) -> int:
    return n_images * 4 * size * size


# Where free memory cannot be measured, a cache up to this size is still used: any machine that trains has it.
UNMEASURED_MEMORY_CACHE_LIMIT = 4 * 2**30


def available_memory_bytes() -> int | None:
    """Memory the OS can hand out now, page cache included (Linux's MemAvailable); total memory where
    only that is known (macOS); None where neither can be read (Windows has neither /proc nor sysconf)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
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
            f"({available / 2**30:.1f} GiB); decoding every epoch instead.",
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


class _Resized(Dataset):
    """A split's pairs squashed to size x size, still uint8: what the cache stores."""

    def __init__(self, dataset: OxfordPetSegmentation, size: int) -> None:
        self.dataset = dataset
        # The same resize the per-image eval transform applies, so cached and uncached tensors are equal.
        self.resize = v2.Resize((size, size), antialias=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.resize(*self.dataset.load_pair(index))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _load(files: dict[str, Path], names_file: Path) -> CachedSplit | None:
    """The cache these files hold, or None when it is incomplete: not built yet, half-built, or
    removed as stale by a run of another fingerprint while this one was about to read it."""
    try:
        names = json.loads(names_file.read_text())  # written last: once it is there, the arrays are complete
        images, masks = (torch.from_numpy(np.load(files[kind])) for kind in ("images", "masks"))
    except FileNotFoundError:
        return None
    return CachedSplit(images, masks, names)


def load_or_build(
    dataset: OxfordPetSegmentation, size: int, cache_dir: Path = DEFAULT_CACHE_DIR, num_workers: int = 0
) -> CachedSplit:
    """The split's cached arrays at size x size, decoding and resizing every pair once if needed."""
    cache_dir = Path(cache_dir)
    prefix = f"{hashlib.sha256(str(dataset.data_path.resolve()).encode()).hexdigest()[:8]}-{dataset.split}-{size}"
    base = cache_dir / f"{prefix}-{fingerprint(dataset, size)}"
    files = {kind: base.with_name(f"{base.name}.{kind}.npy") for kind in ("images", "masks")}
    names_file = base.with_name(f"{base.name}.names.json")
    cached = _load(files, names_file)
    if cached is not None:
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    masks = np.empty((n, 1, size, size), dtype=np.uint8)
    # Its own generator: building must not draw from the global RNG, or a run's random stream
    # (and so its weights) would depend on whether the cache already existed.
    loader = DataLoader(_Resized(dataset, size), batch_size=16, num_workers=num_workers, generator=torch.Generator())
    start = 0
    for image_batch, mask_batch in tqdm(
        loader, desc=f"caching {dataset.split} at {size}px", unit="batch", dynamic_ncols=True
    ):
        images[start : start + len(image_batch)] = image_batch.numpy()
        masks[start : start + len(mask_batch)] = mask_batch.numpy()
        start += len(image_batch)
    for kind, array in (("images", images), ("masks", masks)):
        with atomic_write(files[kind]) as file:
            np.save(file, array)
    # The names file goes last: the cache counts as complete only once it is there.
    with atomic_write(names_file, "w") as file:
        json.dump(dataset.names, file)
    for stale in cache_dir.glob(f"{prefix}-*"):
        if not stale.name.startswith(base.name):
            # Another run may have removed it first, or (on Windows) still be reading it: both are fine.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                stale.unlink()
    return CachedSplit(torch.from_numpy(images), torch.from_numpy(masks), list(dataset.names))
