"""The GPU path, checked on the CPU: the wheel's kernels against the GPU, precision per generation, a
training loop that waits for the GPU at most once per 25 steps and copies nothing per step from an
on-device cache, one batch fetched ahead, the GPU cache placed by free memory, MPS's known bugs
avoided, and the settings for repeatable GPU runs. CUDA's and MPS's answers are simulated."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import batches
import devices
import errors
import losses
import run_state
import train
from batches import TrainBatches, place_cache, prefetched
from cache import CachedSplit
from evaluate import evaluate
from host_syncs import HostSyncCounter
from models import NETWORKS, Network, ResNetUNet, build_model, networks_taking
from models.stats import count_saved_bytes, saved_mib_per_image
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int], archs: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)


# ----------------------------------------------------------------------------- 1. the wheel and the GPU


@pytest.mark.parametrize("name, capability", [("Tesla P100-PCIE-16GB", (6, 0)), ("Tesla V100-SXM2-16GB", (7, 0)),
                                              ("NVIDIA GeForce GTX 1080", (6, 1))])
def test_a_gpu_older_than_the_wheel_is_refused_with_the_install_that_has_its_kernels(
    monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int]
) -> None:
    fake_gpu(monkeypatch, name, capability, CUDA13_ARCHS)
    with pytest.raises(errors.PetsegError) as error:
        devices.select_device("auto")
    message = str(error.value)
    assert name in message and f"compute capability {capability[0]}.{capability[1]}" in message
    assert "7.5 to 12.0" in message and "no kernel image is available" in message
    assert devices.LEGACY_CUDA_INSTALL in message and "--index-url https://download.pytorch.org/whl/cu126" in message
    with pytest.raises(errors.PetsegError, match="cu126"):
        devices.select_device("cuda")


@pytest.mark.parametrize("capability, archs, runs", [
    ((7, 5), CUDA13_ARCHS, True), ((8, 9), CUDA13_ARCHS, True), ((9, 0), CUDA13_ARCHS, True),
    ((12, 1), CUDA13_ARCHS, True), ((6, 1), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),
    ((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], False),
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),  # PTX is compiled for newer GPUs
    ((7, 0), CUDA13_ARCHS, False), ((8, 0), ["sm_86"], False), ((9, 0), ["sm_90a"], True),
])
def test_which_builds_run_on_which_gpus(capability: tuple[int, int], archs: list[str], runs: bool) -> None:
    assert devices.build_runs_on(capability, archs) is runs


def test_a_gpu_the_wheel_supports_is_used_and_a_newer_one_is_told_to_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA H200", (9, 0), CUDA13_ARCHS)
    assert devices.select_device("auto") == torch.device("cuda", 0), "an indexed device, as tensors on it name it"
    fake_gpu(monkeypatch, "NVIDIA B200", (10, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"])
    with pytest.raises(errors.PetsegError, match="pip install --upgrade torch torchvision"):
        devices.select_device("auto")


def test_a_rocm_build_is_not_checked_against_nvidia_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "AMD Instinct MI300X", (9, 4), ["gfx90a", "gfx942", "gfx1100"])
    assert devices.select_device("auto") == torch.device("cuda", 0)


def test_devices_are_one_whatever_their_index_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.same_device(torch.device("cuda", 0), CUDA) and devices.same_device(CUDA, torch.device("cuda:0"))
    assert not devices.same_device(torch.device("cuda", 1), CUDA) and not devices.same_device(CPU, CUDA)
    assert devices.same_device(torch.device("mps", 0), torch.device("mps"))


def test_a_resumed_optimiser_takes_this_machines_kernel_and_puts_its_steps_beside_the_weights() -> None:
    saved_model = nn.Linear(4, 2)
    saved = torch.optim.AdamW(saved_model.parameters(), lr=1e-3)  # a CPU run's: step counters on the CPU
    saved_model(torch.randn(3, 4)).sum().backward()
    saved.step()
    gpu_model = nn.Linear(4, 2, device="meta")  # stands in for a GPU: another device than the CPU
    optimizer = torch.optim.AdamW(gpu_model.parameters(), lr=1e-3, fused=True)  # as train.py makes it on CUDA
    train.run_state.load_optimizer_state(optimizer, saved.state_dict())
    assert optimizer.param_groups[0]["fused"] is True
    assert optimizer.state[gpu_model.weight]["step"].device.type == "meta", "the fused kernel takes them there"


@pytest.mark.parametrize("capability, bf16, default_amp, expected", [
    ((6, 0), False, False, "float32"),  # P100: no tensor cores
    ((6, 1), False, False, "float32"),  # GTX 10xx
    ((7, 0), False, True, "float16 autocast with loss scaling"),  # V100
    ((7, 5), False, True, "float16 autocast with loss scaling"),  # T4, RTX 20xx
    ((8, 0), True, True, "bfloat16 autocast"),  # A100 and newer
    ((9, 0), True, True, "bfloat16 autocast"),
])
def test_precision_follows_the_gpu_generation(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], bf16: bool, default_amp: bool, expected: str
) -> None:
    fake_gpu(monkeypatch, "GPU", capability, CUDA13_ARCHS)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    assert devices.default_amp(CUDA) is default_amp
    assert devices.describe_precision(CUDA, amp=devices.default_amp(CUDA)) == expected
    assert not devices.default_amp(CPU) and not devices.default_amp(torch.device("mps"))


# ----------------------------------------------------------------------------- 2. the training loop


class TinyNet(nn.Module):
    """Stands in for the networks (their forward passes are checked on their own below): the loop is timed."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def synthetic_split(n: int, size: int) -> CachedSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, 2, (n, 1, size, size), dtype=torch.uint8, generator=generator)
    return CachedSplit(images, masks, [str(i) for i in range(n)])


def count_one_epoch(
    model: nn.Module, steps: int, monkeypatch: pytest.MonkeyPatch, ema: bool = False
) -> HostSyncCounter:
    """Syncs and copies of one epoch from a cache on the device. The batches are fetched in this thread, so that
    the (thread-local) counter sees the fetching too, and the per-device constants are made afresh."""
    monkeypatch.setattr(batches, "prefetched", iter)
    devices.device_constant.cache_clear()
    loader = TrainBatches(synthetic_split(2 * steps, 24), 2, CPU, 16, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = run_state.make_scheduler(optimizer, 1e-3, 10, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    average = train.MovingAverage(model, 0.99) if ema else None
    with HostSyncCounter([SRC]) as counter:
        train.train_one_epoch(model, loader, optimizer, scheduler, scaler, losses.bce_dice, CPU, False, "t",
                              average)
    return counter


def test_the_training_loop_waits_for_the_gpu_at_most_once_per_25_steps_and_copies_nothing_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = 100
    counter = count_one_epoch(TinyNet(), steps, monkeypatch, ema=True)
    per_epoch = 1  # the epoch's totals, read with its last check for a diverged loss
    assert counter.syncs <= steps // train.READ_EVERY + per_epoch, counter.sites
    # From a cache on the training device: the pass's order and augmentation travel once, and the constants of
    # the augmentation and normalisation are made once per device; nothing travels per step.
    assert counter.transfers <= 2 + 3, counter.sites


def test_validation_reads_its_scores_once_per_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "prefetched", iter)
    valid = batches.EvalBatches(synthetic_split(20, 16), 4, CPU, IMAGENET_MEAN, IMAGENET_STD)
    with HostSyncCounter([SRC]) as counter:
        result = evaluate(TinyNet(), valid, CPU, loss_fn=losses.bce_dice)
    assert len(valid) == 5 and len(result.per_image_dice) == 20
    assert counter.syncs == 1, counter.sites


@pytest.mark.parametrize("network", networks_taking("--deep-supervision"))
def test_the_networks_train_without_waiting_for_the_gpu(network: str) -> None:
    model = build_model(network, deep_supervision=True).train()
    with HostSyncCounter([SRC]) as counter:
        logits, aux = model(torch.randn(2, 3, 32, 32))
        loss = losses.bce_dice(logits, torch.ones_like(logits))
        (loss + losses.auxiliary_loss(losses.bce_dice, aux, torch.ones_like(logits))).backward()
    assert counter.syncs == 0 and counter.transfers == 0, counter.sites


def test_a_diverged_loss_is_caught_at_the_next_read_naming_its_step(monkeypatch: pytest.MonkeyPatch) -> None:
    real_bce, calls = losses.bce, []

    def nan_at_step_7(logits, target):
        calls.append(1)
        loss = real_bce(logits, target)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(losses, "bce", nan_at_step_7)
    with pytest.raises(train.NonFiniteLoss) as error:
        count_one_epoch(TinyNet(), 60, monkeypatch)
    assert (error.value.step, error.value.noticed_at) == (7, train.READ_EVERY)


def test_the_next_batch_is_fetched_while_the_current_one_is_in_use() -> None:
    second_asked = threading.Event()

    def source():
        yield "first"
        second_asked.set()
        yield "second"

    batches_ahead = prefetched(source())
    assert next(batches_ahead) == "first"
    assert second_asked.wait(timeout=5), "batch 2 is fetched while batch 1 is trained on"
    assert list(batches_ahead) == ["second"]


def test_training_turns_cudnn_benchmark_on_for_cuda_and_off_for_repeatable_runs() -> None:
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    saved_workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        devices.configure_backends(CUDA, deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        devices.configure_backends(CUDA, deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled(), "an op without a deterministic one raises"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        devices.configure_backends(CPU, deterministic=False)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
        if saved_workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deterministic_is_a_flag_that_a_resumed_run_may_change() -> None:
    args, _ = train.parse_args(["--deterministic"])
    assert args.deterministic
    assert "deterministic" in train.run_state.RESUMABLE_FLAGS


def test_compile_with_sync_batch_norm_under_torchrun_warns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args, _ = train.parse_args(["--compile"])
    monkeypatch.setattr(train.distributed, "active", lambda: True)
    monkeypatch.setattr(train.distributed, "world_size", lambda: 4)
    run_state.warn_if_compile_breaks_at_sync_bn(args, CUDA)
    assert "161302" in capsys.readouterr().err
    run_state.warn_if_compile_breaks_at_sync_bn(train.parse_args(["--compile", "--no-sync-bn"])[0], CUDA)
    run_state.warn_if_compile_breaks_at_sync_bn(args, CPU)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 3. the cache on the GPU


GiB = 2**30


@pytest.mark.parametrize("needed, reserve, free, total, fits", [
    (1 * GiB, 5 * GiB, 7.5 * GiB, 8 * GiB, True),
    (2 * GiB, 5 * GiB, 7.5 * GiB, 8 * GiB, False),  # an 8 GB card training UNet: the cache would not leave room
    (2 * GiB, 5 * GiB, 3 * GiB, 80 * GiB, False),  # a big GPU that another job has filled
    (4 * GiB, 5 * GiB, 139 * GiB, 140 * GiB, True),
])
def test_the_gpu_cache_is_judged_on_free_memory_beside_training(
    needed: int, reserve: int, free: float, total: float, fits: bool
) -> None:
    assert batches.cache_fits_on_gpu(needed, reserve, free, total) is fits


def splits_moved_by(monkeypatch: pytest.MonkeyPatch, free: int, upload_fails: bool = False) -> list[str]:
    moved = []

    def to(self: CachedSplit, device: torch.device) -> CachedSplit:
        if upload_fails:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        moved.append(device.type)
        return self

    monkeypatch.setattr(CachedSplit, "to", to)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    splits = {"train": synthetic_split(8, 24), "valid": synthetic_split(4, 16)}
    assert place_cache(splits, CUDA, reserve=4 * GiB).keys() == splits.keys()
    return moved


def test_both_splits_go_to_the_gpu_together_only_when_they_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert splits_moved_by(monkeypatch, free=15 * GiB) == ["cuda", "cuda"]
    assert capsys.readouterr().err == ""
    assert splits_moved_by(monkeypatch, free=5 * GiB) == []
    assert "stays in the CPU's memory" in capsys.readouterr().err


def test_an_out_of_memory_upload_falls_back_to_page_locked_batches_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert splits_moved_by(monkeypatch, free=15 * GiB, upload_fails=True) == []
    assert "the upload to the GPU ran out of memory" in capsys.readouterr().err


@pytest.mark.parametrize("network", [name for name, entry in NETWORKS.items() if entry.saved_mib_per_image_256])
def test_the_stated_activation_footprint_is_what_the_networks_keep(network: str) -> None:
    full, half = (count_saved_bytes(build_model(network), 32, half) * (256 / 32) ** 2 / 2**20 for half in (False, True))
    assert (full, half) == pytest.approx(NETWORKS[network].saved_mib_per_image_256, rel=0.02)


def test_a_network_with_no_stated_footprint_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(NETWORKS, "unstated", Network(ResNetUNet))
    stated = NETWORKS["resnet34_unet"].saved_mib_per_image_256
    assert saved_mib_per_image("unstated", half_precision=False) == pytest.approx(stated[0], rel=0.02)


class Reserved(Exception):
    pass


def test_training_reserves_the_networks_footprint_for_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def loaders(args, data_path, device, processes, batch_per_process, reserve):
        raise Reserved(reserve)

    monkeypatch.setattr(train, "prepare_dataset", lambda *args, **kwargs: Path("."))
    monkeypatch.setattr(train, "check_split_overlap", lambda data_path: None)
    monkeypatch.setattr(train, "dataset_record", lambda data_path: {})
    monkeypatch.setattr(train, "make_loaders", loaders)
    reserves = []
    for network in ("unet", "resnet34_unet"):
        args, _ = train.parse_args(["-n", network, "--device", "cpu"])
        with pytest.raises(Reserved) as reserved:
            train.set_up(args, None, CPU, train.Processes())
        reserves.append(reserved.value.args[0])
    unet, resnet = reserves
    assert unet > 5 * GiB and 1.5 * GiB < resnet < unet, "batch 32 at 256 px"


# ----------------------------------------------------------------------------- 4. Apple MPS


def test_on_mps_the_cache_stays_in_cpu_memory_and_copies_block() -> None:
    splits = {"train": synthetic_split(4, 24)}
    assert place_cache(splits, torch.device("mps"), reserve=0)["train"].images.device == CPU
    assert not devices.non_blocking(torch.device("mps")) and devices.non_blocking(CUDA)


def test_autocast_is_not_entered_when_mixed_precision_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("torch 2.4 refuses MPS autocast even disabled")

    monkeypatch.setattr(torch, "autocast", refuse)
    with devices.autocast(torch.device("mps"), enabled=False):
        pass
    with pytest.raises(RuntimeError):
        devices.autocast(torch.device("mps"), enabled=True)


# ----------------------------------------------------------------------------- on a real GPU (benchmarks/gpu_check.py)


def synchronizations_in_one_epoch(split: CachedSplit, steps: int) -> list[str]:
    """The warnings of CUDA's sync debug mode during one train_one_epoch, as train.py trains on a GPU."""
    model = TinyNet().to(CUDA, memory_format=torch.channels_last)
    loader = TrainBatches(split, 2, CUDA, 16, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = run_state.make_scheduler(optimizer, 1e-3, 10, len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    args = (model, loader, optimizer, scheduler, scaler, losses.bce_dice, CUDA, True, "t")
    train.train_one_epoch(*args)  # warm-up: the allocators' first blocks, cuDNN's choices
    assert len(loader) == steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.train_one_epoch(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_on_gpu", [True, False])
def test_on_a_gpu_the_loop_waits_at_most_once_per_25_steps_from_either_cache_placement(cache_on_gpu: bool) -> None:
    steps = 100
    split = synthetic_split(2 * steps, 24)
    syncs = synchronizations_in_one_epoch(split.to(CUDA) if cache_on_gpu else split, steps)
    assert len(syncs) <= steps // train.READ_EVERY + 3, syncs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_cache_that_fits_moves_there_whole() -> None:
    placed = place_cache({"train": synthetic_split(8, 24), "valid": synthetic_split(4, 16)}, CUDA, reserve=0)
    assert all(split.images.is_cuda and split.masks.is_cuda for split in placed.values())
    assert devices.select_device("auto").type == "cuda", "this PyTorch build has kernels for this GPU"
