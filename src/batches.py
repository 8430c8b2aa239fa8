"""Model-ready batches made on the training device, from the decode-once cache or decoded per image.

Both sources hold the same uint8 images (squashed once, see oxford_pet.build_transform), one
generator shuffles them, and the one batched augmentation (augment.py) runs on the training device:
for the same seed, cached and per-image training see the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from augment import apply_augmentation, sample_augmentation
from cache import CachedSplit, fits_on_device
from oxford_pet import DEFAULT_AUGMENTATION, Augmentation

UInt8Batch = tuple[torch.Tensor, torch.Tensor]


class _CachedSource:
    """uint8 batches cut out of a cached split: kept whole on the device when it takes a small share of
    its memory (no copy per batch), else gathered on the CPU into page-locked memory and copied over."""

    def __init__(self, split: CachedSplit, device: torch.device) -> None:
        storage = device if fits_on_device(split, device) else torch.device("cpu")
        self.images, self.masks = split.images.to(storage), split.masks.to(storage)
        self.device = device
        # index_select of pinned storage returns pageable memory, whose copy blocks; so the batch
        # itself is gathered into pinned memory, and only its copy overlaps with compute.
        self.pin = storage.type == "cpu" and device.type == "cuda"

    def gather(self, storage: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The indexed images of `storage`, where it lives (in pinned memory when it is the CPU's for a GPU)."""
        out = torch.empty(
            (len(index), *storage.shape[1:]), dtype=storage.dtype, device=storage.device, pin_memory=self.pin
        )
        # index_select copies whole images; plain indexing is several times slower on uint8.
        return torch.index_select(storage, 0, index.to(storage.device), out=out)

    def batches(self, batch_indexes: Sequence[torch.Tensor]) -> Iterator[UInt8Batch]:
        for index in batch_indexes:
            images, masks = self.gather(self.images, index), self.gather(self.masks, index)
            yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)


class _BatchOrder:
    """A DataLoader batch_sampler whose batches are set before each pass."""

    def __init__(self) -> None:
        self.batch_indexes: Sequence[torch.Tensor] = []

    def __iter__(self) -> Iterator[list[int]]:
        return (index.tolist() for index in self.batch_indexes)

    def __len__(self) -> int:
        return len(self.batch_indexes)


class _DecodedSource:
    """uint8 batches decoded per image by DataLoader workers, in the order asked for."""

    def __init__(self, dataset: Dataset, device: torch.device, num_workers: int, seed: int) -> None:
        self.device = device
        self.order = _BatchOrder()
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.order,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
            # Its own generator for the workers' seeds: the batches' generator must draw the same
            # numbers as with the cache, and the global RNG must not move.
            generator=torch.Generator().manual_seed(seed),
        )

    def batches(self, batch_indexes: Sequence[torch.Tensor]) -> Iterator[UInt8Batch]:
        self.order.batch_indexes = batch_indexes
        for images, masks in self.loader:
            yield images.to(self.device, non_blocking=True), masks.to(self.device, non_blocking=True)


class TrainBatches:
    """Shuffled, augmented training batches on `device`; iterates like a DataLoader with drop_last.

    `source` is a cached split or a dataset of uint8 pairs (build_transform(train=True)), at the crop
    source size of `augmentation`, the ranges the batches are augmented with. `generator`
    drives shuffling and augmentation; saving its state in last.pt makes a resumed run exact.
    Processes training together (rank of world_size) hold the same generator and draw in step for
    the whole global batch of `batch_size` images, each taking its own share: together they see
    exactly the batches one process would.
    """

    def __init__(
        self,
        source: CachedSplit | Dataset,
        batch_size: int,
        device: torch.device,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augmentation: Augmentation = DEFAULT_AUGMENTATION,
    ) -> None:
        # Only the count is kept: a cache moved to the GPU must not stay in the CPU's memory too.
        self.n_images = len(source)
        self.cached = isinstance(source, CachedSplit)
        self.batch_size, self.image_size = batch_size, image_size
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.mean, self.std = list(mean), list(std)
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)
        if self.cached:
            self.source = _CachedSource(source, device)
        else:
            self.source = _DecodedSource(source, device, num_workers, seed)

    def __len__(self) -> int:
        return self.n_images // self.batch_size  # a last batch of one image would make BatchNorm useless

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n_images, generator=self.generator)
        batch_indexes = order[: len(self) * self.batch_size].split(self.batch_size)
        local = self.source.batches([index[self.share] for index in batch_indexes])
        for images, masks in local:
            choices = sample_augmentation(self.batch_size, self.generator, self.augmentation)[self.share]
            yield apply_augmentation(images, masks, choices, self.image_size, self.mean, self.std)


class EvalBatches:
    """A cached eval split in order, every image once (or this process's `share` of them), normalised
    on `device`: what the per-image eval transform gives, without decoding."""

    def __init__(
        self,
        split: CachedSplit,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        share: range | None = None,
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
            yield v2.functional.normalize(images, self.mean, self.std), masks.float()
