"""How fast train.py trains: train.train_one_epoch itself (its scheduler, scaler and its own syncs),
timed over the cached loader's batches and over one ready batch repeated (compute only), under the
setups a GPU offers (bf16, or fp16 with loss scaling; eager or torch.compile; cudnn.benchmark on or
off); the memory each image of a batch takes; and what 200 epochs of the full split would take.

benchmarks/throughput.py prints these rows; nothing here knows about reports.
"""

from __future__ import annotations

import contextlib
import time
from argparse import Namespace
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

import devices
import losses
import run_state
import train
from batches import TrainBatches
from cache import CachedSplit
from models import build_model, model_kwargs
from models.stats import count_flops
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD
from train_flags import build_parser

# The official split under the lab's rule, and the recipe's epochs: what a projection is of.
FULL_TRAIN_IMAGES, FULL_VALID_IMAGES, RECIPE_EPOCHS = 3312, 368, 200
# What a dense bf16 matrix product reaches on an H200, the yardstick for the models' arithmetic.
H200_BF16_TFLOPS = 790.0
# Issue targets for 200 epochs of the full split at 256², batch 32, on one H100/H200.
TARGET_MINUTES = {"resnet34_unet": 3.0, "unet": 15.0}
FED_TARGET = 0.95  # loader-fed at least this share of compute-only
FLOP_COUNT_MIN_SIZE = 64
NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)

Batch = tuple[torch.Tensor, torch.Tensor]


class RepeatedBatch:
    """A stand-in loader: one ready, augmented batch on the device, `steps` times (compute only)."""

    def __init__(self, batch: Batch, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return iter([self.batch] * self.steps)


class FirstBatches:
    """The first `count` batches of a loader: the warm-up before a timed epoch."""

    def __init__(self, loader: TrainBatches | RepeatedBatch, count: int) -> None:
        self.loader, self.count = loader, count

    def __len__(self) -> int:
        return min(self.count, len(self.loader))

    def __iter__(self) -> Iterator[Batch]:
        return islice(iter(self.loader), len(self))


@dataclass(frozen=True)
class Setup:
    """One way of training: mixed precision as train.py's --amp (bf16 where the device runs it
    natively), or fp16 with loss scaling forced as on GPUs without bf16; torch.compile or eager;
    cudnn.benchmark on or off."""

    amp: bool
    force_fp16: bool = False
    compiled: bool = False
    cudnn_benchmark: bool = True

    def precision(self, device: torch.device) -> str:
        with configured(self):
            return devices.describe_precision(device, self.amp) + (" (forced)" if self.force_fp16 else "")


@contextlib.contextmanager
def configured(setup: Setup) -> Iterator[None]:
    """fp16 forced through devices.autocast_dtype, the one place that picks the autocast dtype (loss
    scaling follows it), and cudnn.benchmark as the setup says; both restored afterwards."""
    previous = devices.autocast_dtype, torch.backends.cudnn.benchmark
    if setup.force_fp16:
        devices.autocast_dtype = lambda device: torch.float16
    torch.backends.cudnn.benchmark = setup.cudnn_benchmark
    try:
        yield
    finally:
        devices.autocast_dtype, torch.backends.cudnn.benchmark = previous


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Training:
    """What train.py trains with (its run_state.Trainer: the model as it trains, AdamW, the schedule, the
    scaler), and the loss, device and precision it hands train_one_epoch."""

    trainer: run_state.Trainer
    loss_fn: nn.Module
    device: torch.device
    amp: bool

    def epoch(self, loader: TrainBatches | RepeatedBatch | FirstBatches) -> None:
        trainer = self.trainer
        train.train_one_epoch(
            trainer.model, loader, trainer.optimizer, trainer.scheduler, trainer.scaler, self.loss_fn, self.device,
            self.amp, "timing", trainer.ema,
        )


def default_flags(name: str) -> Namespace:
    """train.py's flags as a run with only `-n NAME` has them."""
    return build_parser().parse_args(["-n", name])


def default_model(name: str, device: torch.device) -> nn.Module:
    """The network as train.py builds it with its default flags: channels-last on CUDA."""
    model = build_model(name, **model_kwargs(name, default_flags(name))).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def make_training(name: str, device: torch.device, setup: Setup, loader: Sized) -> Training:
    """run_state.make_trainer's model, optimiser, schedule (a default-length run of len(loader) steps an epoch)
    and scaler, for train.py's default flags with the setup's precision and torch.compile. Call inside
    configured(setup)."""
    flags = default_flags(name)
    flags.compile = setup.compiled
    model = build_model(name, **model_kwargs(name, flags)).to(device)
    trainer = run_state.make_trainer(flags, model, loader, device, setup.amp, device.type == "cuda", resume_from=None)
    return Training(trainer, losses.build_loss(flags.loss), device, setup.amp)


def time_epoch(training: Training, loader: TrainBatches | RepeatedBatch, warmup_steps: int) -> tuple[float, float]:
    """Seconds per step of one epoch over `loader`, after a warm-up of its first `warmup_steps`
    batches (cudnn's autotuning, compiling, the allocator's first requests; none needed on a CPU);
    and the warm-up's seconds."""
    start = time.perf_counter()
    if warmup_steps:
        training.epoch(FirstBatches(loader, warmup_steps))
        synchronize(training.device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    training.epoch(loader)
    synchronize(training.device)
    return (time.perf_counter() - start) / len(loader), warmup


def tiled(split: CachedSplit, n_images: int) -> CachedSplit:
    """n_images cycling through the split: an epoch of as many steps as asked, whatever the split's size."""
    index = torch.arange(n_images) % len(split)
    return CachedSplit(split.images[index], split.masks[index], [split.names[i] for i in index.tolist()])


def cache_placements(split: CachedSplit, device: torch.device) -> dict[str, CachedSplit]:
    """The split where batches.place_cache may keep it: moved to the GPU, or left in CPU memory (batches.py
    then gathers each batch into page-locked memory and copies it). On the CPU the two are one."""
    if device.type != "cuda":
        return {"CPU memory (on the CPU, device and page-locked memory are one)": split}
    return {"GPU memory": split.to(device), "page-locked CPU memory": split}


def training_rows(
    name: str, split: CachedSplit, device: torch.device, batch_size: int, image_size: int, steps: int,
    warmup_steps: int, setup: Setup, placements: int,
) -> Iterator[dict]:
    """Rows of one setup: compute only, then fed by the cached loader from the first `placements`
    cache placements. `split` is the crop-source cache, tiled to steps x batch_size images."""
    with configured(setup):
        caches = dict(list(cache_placements(tiled(split, steps * batch_size), device).items())[:placements])
        first_loader = TrainBatches(next(iter(caches.values())), batch_size, device, image_size, *NORMALISATION)
        training = make_training(name, device, setup, first_loader)
        batch = next(iter(first_loader))
        compute, warmup = time_epoch(training, RepeatedBatch(batch, steps), warmup_steps)
        note = f"first {warmup_steps} steps (compiling) took {warmup:.0f} s" if setup.compiled else ""
        row = {"model": name, "setup": setup}
        yield {**row, "cache": "", "feed": "one ready batch (compute only)", "note": note, "step_seconds": compute,
               "ratio": None}
        del first_loader, batch
        for place, cache in caches.items():
            loader = TrainBatches(cache, batch_size, device, image_size, *NORMALISATION)
            fed, _ = time_epoch(training, loader, warmup_steps)
            yield {**row, "cache": place, "feed": "cached loader", "note": "", "step_seconds": fed,
                   "ratio": compute / fed}
            del loader


def peak_memory(name: str, device: torch.device, batch_size: int, image_size: int, steps: int = 3) -> dict:
    """Peak CUDA memory of a few mixed-precision training steps at this batch, and what is left of it per image
    once the model, its gradients and AdamW's two moments (4x the parameters' bytes) are taken off."""
    torch.cuda.empty_cache()
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    setup = Setup(amp=True)
    with configured(setup):
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        masks = (torch.rand(batch_size, 1, image_size, image_size, device=device) > 0.5).float()
        batches = RepeatedBatch((images, masks), steps)
        training = make_training(name, device, setup, batches)
        training.epoch(batches)
        synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    fixed = 4 * sum(p.numel() * p.element_size() for p in training.trainer.model.parameters())
    return {"model": name, "batch": batch_size, "peak": peak, "fixed": fixed, "per_image": (peak - fixed) / batch_size}


def train_flops_per_image(name: str, image_size: int) -> float:
    """FLOPs of one training step per image (forward, loss, backward), counted on the meta device.
    Below FLOP_COUNT_MIN_SIZE they are counted there and scaled by the area: one image's deepest
    stage would be 1x1, where BatchNorm cannot train, and convolutions cost in proportion to pixels."""
    counted = max(image_size, FLOP_COUNT_MIN_SIZE)
    with torch.device("meta"):
        model = build_model(name, **model_kwargs(name, default_flags(name))).train()
        return count_flops(model, counted, backward=True) * (image_size / counted) ** 2


def projected_seconds(step_seconds: float, batch_size: int, eval_images_per_second: float) -> float:
    """RECIPE_EPOCHS epochs of the full split at the measured speed: the training steps, plus a
    validation pass timed as inference (checkpoint writes and the test pass not included)."""
    per_epoch = FULL_TRAIN_IMAGES // batch_size * step_seconds + FULL_VALID_IMAGES / eval_images_per_second
    return RECIPE_EPOCHS * per_epoch
