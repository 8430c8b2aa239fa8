"""Decode once: each split's images and masks resized once and kept as uint8 .npy files, then
served in whole batches straight from memory (on the GPU when training there).

JPEG decoding costs milliseconds of a CPU core per photo while the models need far less GPU time,
so decoding every image every epoch leaves the GPU waiting. The cache is rebuilt by itself when
the image size or any source file (name, size or modification time) changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from augment import augment_batch
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


def cache_bytes(n_images: int, size: int) -> int:
    return n_images * 4 * size * size


def available_memory_bytes() -> int:
    """Memory the OS can hand out now, page cache included (Linux's MemAvailable); total memory elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def load_or_build(
    dataset: OxfordPetSegmentation, size: int, cache_dir: Path = DEFAULT_CACHE_DIR, num_workers: int = 0
) -> CachedSplit:
    """The split's cached arrays at size x size, decoding and resizing every pair once if needed."""
    cache_dir = Path(cache_dir)
    prefix = f"{hashlib.sha256(str(dataset.data_path.resolve()).encode()).hexdigest()[:8]}-{dataset.split}-{size}"
    base = cache_dir / f"{prefix}-{fingerprint(dataset, size)}"
    files = {kind: base.with_name(f"{base.name}.{kind}.npy") for kind in ("images", "masks")}
    names_file = base.with_name(f"{base.name}.names.json")
    if names_file.exists() and all(path.exists() for path in files.values()):
        return CachedSplit(
            torch.from_numpy(np.load(files["images"])),
            torch.from_numpy(np.load(files["masks"])),
            json.loads(names_file.read_text()),
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    masks = np.empty((n, 1, size, size), dtype=np.uint8)
    # Its own generator: building must not draw from the global RNG, or a run's random stream
    # (and so its weights) would depend on whether the cache already existed.
    loader = DataLoader(_Resized(dataset, size), batch_size=16, num_workers=num_workers, generator=torch.Generator())
    start = 0
    for image_batch, mask_batch in tqdm(loader, desc=f"caching {dataset.split} at {size}px", unit="batch", dynamic_ncols=True):
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
            stale.unlink()
    return CachedSplit(torch.from_numpy(images), torch.from_numpy(masks), list(dataset.names))


def fits_on_device(split: CachedSplit, device: torch.device, share: float = 0.25) -> bool:
    if device.type != "cuda":
        return True  # the CPU holds it already; Apple's MPS shares the CPU's memory
    return cache_bytes(len(split), split.images.shape[-1]) <= share * torch.cuda.get_device_properties(device).total_memory


class CachedBatches:
    """Model-ready batches of a cached split, made on `device`: augmented (train) or only
    normalised (eval). Iterates like a DataLoader; `generator` drives shuffling and augmentation."""

    def __init__(
        self,
        split: CachedSplit,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.dataset = split
        self.batch_size = batch_size
        self.device = device
        self.mean, self.std = list(mean), list(std)
        self.train_size = train_size  # None: an eval split, in order, every image once
        self.generator = torch.Generator().manual_seed(seed)
        # Kept whole on the accelerator when it takes a small share of its memory: then no batch is
        # ever copied. Otherwise batches travel from pinned memory, overlapping with compute.
        storage = device if fits_on_device(split, device) else torch.device("cpu")
        self.images, self.masks = split.images.to(storage), split.masks.to(storage)
        if storage != device and device.type == "cuda":
            self.images, self.masks = self.images.pin_memory(), self.masks.pin_memory()

    def __len__(self) -> int:
        if self.train_size is not None:
            return len(self.dataset) // self.batch_size  # drop the last partial batch, as the DataLoader does
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.train_size is not None else torch.arange(n)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size].to(self.images.device)
            # index_select copies whole images; plain indexing is several times slower on uint8.
            images = self.images.index_select(0, index).to(self.device, non_blocking=True)
            masks = self.masks.index_select(0, index).to(self.device, non_blocking=True)
            if self.train_size is not None:
                yield augment_batch(images, masks, self.train_size, self.mean, self.std, self.generator)
            else:
                images = v2.functional.to_dtype(images, torch.float32, scale=True)
                yield v2.functional.normalize(images, self.mean, self.std), masks.float()
