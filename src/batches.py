"""Model-ready batches made on the training device, from the decode-once cache or decoded per image: the same
uint8 images, one generator and one batched augmentation, so for a seed both sources give the same batches."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

import distributed
from augment import AUGMENTATIONS, DEFAULT_AUGMENTATION, Augmentation, crop_source_size
from cache import CachedSplit, cache_bytes, cache_fits_in_memory, load_or_build
from devices import non_blocking, same_device
from distributed import Processes
from evaluate import ordered_loader
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD, load_dataset, normalize

UInt8Batch = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")
# Left free on the GPU beyond the cache and the training footprint: cuDNN workspaces, the allocator's slack.
GPU_HEADROOM = 0.1


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`, copied only from elsewhere (from page-locked memory, without waiting, on CUDA)."""
    if same_device(tensor.device, device):
        return tensor
    if tensor.device.type == "cpu" and non_blocking(device):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=non_blocking(device))


def cache_fits_on_gpu(needed: int, reserve: int, free: int, total: int) -> bool:
    """Whether `needed` bytes of cache fit in a GPU's `free` memory beside `reserve` bytes for training and
    GPU_HEADROOM of its `total`."""
    return needed + reserve + GPU_HEADROOM * total <= free


def place_cache(splits: dict[str, CachedSplit], device: torch.device, reserve: int) -> dict[str, CachedSplit]:
    """The cached splits on a CUDA GPU when all fit beside `reserve` bytes for training, else left in the CPU's
    memory (batches copied page-locked). On MPS they stay there too: some releases returned zero rows from
    index_select on tensors over 2**31 elements, and aborted on tensors over 4 GiB."""
    if device.type != "cuda":
        return splits
    needed = sum(split.nbytes for split in splits.values())
    free, total = torch.cuda.mem_get_info(device)
    why = f"{free / 2**30:.1f} GiB of the GPU's memory are free and training needs about {reserve / 2**30:.1f}"
    if cache_fits_on_gpu(needed, reserve, free, total):
        try:
            return {name: split.to(device) for name, split in splits.items()}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            why = "the upload to the GPU ran out of memory"
    print(
        f"note: the decode-once cache ({needed / 2**30:.1f} GiB) stays in the CPU's memory and each batch is "
        f"copied to the GPU, page-locked: {why}.",
        file=sys.stderr,
    )
    return splits


def prefetched(batches: Iterator[T]) -> Iterator[T]:
    """`batches`, fetched one ahead by a thread of their own: batch k+1 is gathered on the CPU (and its copy to
    the GPU queued) while the training loop queues step k."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="petseg-prefetch") as fetcher:
        pending = fetcher.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = fetcher.submit(next, batches, None)
            yield batch


class _CachedSource:
    """uint8 batches cut out of a cached split where it lives (place_cache decides): on the training device
    (no copy per batch), or on the CPU, gathered into page-locked memory there and copied over."""

    def __init__(self, split: CachedSplit, device: torch.device) -> None:
        self.images, self.masks = split.images, split.masks
        self.device = device
        # index_select of pinned storage returns pageable memory, whose copy makes the host wait; so the batch
        # itself is gathered into pinned memory, whose copy is queued without waiting (on the stream the
        # training kernels use: what overlaps with them is the gather on the CPU, in the prefetch thread).
        self.pin = self.images.device.type == "cpu" and device.type == "cuda"

    def gather(self, storage: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty(
            (len(index), *storage.shape[1:]), dtype=storage.dtype, device=storage.device, pin_memory=self.pin
        )
        # index_select copies whole images; plain indexing is several times slower on uint8.
        return torch.index_select(storage, 0, index, out=out)

    def batches(self, batch_indexes: Sequence[torch.Tensor]) -> Iterator[UInt8Batch]:
        # The whole pass's order travels to the storage's device once, not a batch at a time.
        order = to_device(torch.cat(list(batch_indexes)), self.images.device)
        for index in order.split([len(index) for index in batch_indexes]):
            images, masks = self.gather(self.images, index), self.gather(self.masks, index)
            yield to_device(images, self.device), to_device(masks, self.device)


class _DecodedSource:
    """uint8 batches decoded per image by DataLoader workers, in the order asked for."""

    def __init__(self, dataset: Dataset, device: torch.device, num_workers: int, seed: int) -> None:
        self.device = device
        # The loader's batch_sampler: a list it keeps, refilled in place before each pass.
        self.order: list[list[int]] = []
        self.loader = DataLoader(
            dataset, batch_sampler=self.order, num_workers=num_workers, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator for the workers' seeds: the batches' generator must draw the same
            # numbers as with the cache, and the global RNG must not move.
            generator=torch.Generator().manual_seed(seed),
        )

    def batches(self, batch_indexes: Sequence[torch.Tensor]) -> Iterator[UInt8Batch]:
        self.order[:] = [index.tolist() for index in batch_indexes]
        # The loader's iterator is made here, in the caller's thread, which forks its workers (or restarts
        # them) there: the prefetch thread only asks for the next batch.
        loaded = iter(self.loader)
        return ((to_device(images, self.device), to_device(masks, self.device)) for images, masks in loaded)


class TrainBatches:
    """Shuffled, augmented training batches on `device`, like a DataLoader with drop_last, from a cached split or
    a dataset of uint8 pairs at `augmentation`'s crop source size. One generator, seeded by `seed` and saved in
    last.pt, draws the order and the augmentation; processes training together draw in step for the global batch
    of world_size x `batch_size` images and each takes its share, so together they see the batches one would."""

    def __init__(
        self, source: CachedSplit | Dataset, batch_size: int, device: torch.device, image_size: int,
        mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0, num_workers: int = 0, rank: int = 0,
        world_size: int = 1, augmentation: Augmentation = DEFAULT_AUGMENTATION,
    ) -> None:
        # Only the count is kept: a cache moved to the GPU must not stay in the CPU's memory too.
        self.n_images = len(source)
        self.cached = isinstance(source, CachedSplit)
        self.batch_size, self.image_size, self.device = batch_size * world_size, image_size, device
        self.share = slice(rank * batch_size, (rank + 1) * batch_size)
        self.mean, self.std = list(mean), list(std)
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)
        self.source = (
            _CachedSource(source, device) if self.cached else _DecodedSource(source, device, num_workers, seed)
        )

    def __len__(self) -> int:
        return self.n_images // self.batch_size  # a last batch of one image would make BatchNorm useless

    @property
    def cache_device(self) -> torch.device:
        """Where the batches are cut from: the cache's device, or the CPU when images are decoded per epoch."""
        return self.source.images.device if self.cached else torch.device("cpu")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n_images, generator=self.generator)
        batch_indexes = order[: len(self) * self.batch_size].split(self.batch_size)
        if not batch_indexes:
            return
        # The pass's augmentation is drawn up front, batch after batch: the numbers drawing before each batch
        # would give, as nothing else draws from the generator. It travels to the device in one copy.
        drawn = [self.augmentation.sample(self.batch_size, self.generator)[self.share] for _ in batch_indexes]
        packed = to_device(torch.cat([choices.pack() for choices in drawn]), self.device)
        packed = packed.split(self.share.stop - self.share.start)
        local = self.source.batches([index[self.share] for index in batch_indexes])
        for (images, masks), choices, on_device in zip(prefetched(local), drawn, packed, strict=True):
            images, masks = self.augmentation.apply(images, masks, choices.unpack(on_device), self.image_size)
            yield normalize(images, self.mean, self.std), masks


class EvalBatches:
    """A cached eval split in order, every image once (or this process's `share` of them), normalised
    on `device`: what the per-image eval transform gives, without decoding."""

    def __init__(
        self, split: CachedSplit, batch_size: int, device: torch.device, mean: tuple[float, ...],
        std: tuple[float, ...], share: range | None = None,
    ) -> None:
        self.indexes = torch.arange(len(split)) if share is None else torch.tensor(share, dtype=torch.int64)
        self.batch_size = batch_size
        self.mean, self.std = list(mean), list(std)
        self.source = _CachedSource(split, device)

    def __len__(self) -> int:
        return math.ceil(len(self.indexes) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, masks in self.source.batches(self.indexes.split(self.batch_size)):
            images = v2.functional.to_dtype(images, torch.float32, scale=True)
            yield normalize(images, self.mean, self.std), masks.float()


def make_loaders(
    args: argparse.Namespace, data_path: Path, device: torch.device, processes: Processes, batch_per_process: int,
    reserve: int = 0,
) -> tuple[TrainBatches, EvalBatches | DataLoader, int]:
    """Train and valid batches, and the number of valid images: from the decode-once cache unless --no-cache or
    it would not fit in memory. Each process gets its share of every training batch and of the valid images."""
    augmentation = AUGMENTATIONS[args.augment]
    sizes = {"train": crop_source_size(args.image_size, augmentation), "valid": args.image_size}
    datasets = {
        split: load_dataset(data_path, split, args.image_size, args.skip_bad, sizes["train"])
        for split in ("train", "valid")
    }
    valid_share = processes.shard(len(datasets["valid"]))
    needed = sum(cache_bytes(len(datasets[split]), size) for split, size in sizes.items()) * processes.local_world_size
    # Rank 0 decides for all: processes that disagreed would wait for each other in different places.
    use_cache = distributed.broadcast(not args.no_cache and processes.is_main and cache_fits_in_memory(needed))
    if use_cache:
        cached = distributed.first_on_each_machine(processes, lambda: {
            split: load_or_build(data, sizes[split], args.cache_dir, args.num_workers)
            for split, data in datasets.items()
        })
        cached = place_cache(cached, device, reserve)
        train_source = cached["train"]
        valid_loader = EvalBatches(cached["valid"], batch_per_process, device, IMAGENET_MEAN, IMAGENET_STD, valid_share)
    else:
        train_source = datasets["train"]
        valid_images = Subset(datasets["valid"], valid_share)
        valid_loader = ordered_loader(valid_images, batch_per_process, args.num_workers, device)
    train_loader = TrainBatches(
        train_source, batch_per_process, device, args.image_size, IMAGENET_MEAN, IMAGENET_STD, args.seed,
        args.num_workers, processes.rank, processes.world_size, augmentation,
    )
    return train_loader, valid_loader, len(datasets["valid"])
