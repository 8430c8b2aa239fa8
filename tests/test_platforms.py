"""Right on every machine: Apple MPS (no float64), pre-Ampere CUDA (no native bf16), Windows (no /proc,
no sysconf, spawn), resuming on another machine, runs sharing a cache, and one training augmentation.

What this CPU machine lacks is simulated: the capability query, the missing OS call, the start method.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import batches
import cache
import checkpoint as ckpt
import devices
import errors
import losses
import run_state
import train
import utils
from augment import crop_source_size
from batches import TrainBatches
from cache import load_or_build
from conftest import SRC, TOY_RUN, augment_batch, train_with_ctrl_c_in_epoch_2
from evaluate import evaluate
from models import build_model
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD, load_dataset

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- Apple MPS: no float64


class NoFloat64(TorchFunctionMode):
    """Fails any operation that makes a float64 tensor, as MPS does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise TypeError(f"{func.__name__} made a float64 tensor, which MPS does not have")
        return result


def test_metrics_loss_augmentation_and_evaluation_never_use_float64(synthetic_pets: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 1, 32, 32, generator=generator) > 0.5
    gt = torch.rand(4, 1, 32, 32, generator=generator) > 0.5
    images = torch.randint(0, 256, (4, 3, 45, 45), dtype=torch.uint8, generator=generator)
    masks = (torch.rand(4, 1, 45, 45, generator=generator) > 0.5).to(torch.uint8)
    model = build_model("resnet34_unet")
    loader = torch.utils.data.DataLoader(load_dataset(synthetic_pets, "valid", image_size=32), batch_size=3)
    expected = utils.per_image_dice(pred, gt)
    with NoFloat64():
        dice = utils.per_image_dice(pred, gt)
        losses.bce_dice(torch.randn(4, 1, 32, 32), gt.float())
        augment_batch(images, masks, 32, IMAGENET_MEAN, IMAGENET_STD, generator)
        evaluate(model, loader, CPU, loss_fn=losses.bce_dice)
    assert torch.equal(dice, expected)
    intersection, total = (pred & gt).flatten(1).sum(1), pred.flatten(1).sum(1) + gt.flatten(1).sum(1)
    exact = (2 * intersection).double() / total.double()
    assert torch.allclose(dice.double(), exact, rtol=1e-7, atol=0), "integer counts, one float32 rounding"


# ----------------------------------------------------------------------------- CUDA before Ampere: bf16 is emulated


def emulating_bf16(including_emulation: bool = True) -> bool:
    """torch.cuda.is_bf16_supported on a T4 or V100: True only through emulation."""
    return including_emulation


def test_gpus_without_native_bf16_get_fp16_with_loss_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulating_bf16)
    assert devices.autocast_dtype(cuda) == torch.float16
    assert devices.needs_loss_scaling(cuda, amp=True)
    assert devices.describe_precision(cuda, amp=True) == "float16 autocast with loss scaling"

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert devices.autocast_dtype(cuda) == torch.bfloat16
    assert not devices.needs_loss_scaling(cuda, amp=True)
    assert devices.describe_precision(cuda, amp=True) == "bfloat16 autocast"
    assert devices.describe_precision(cuda, amp=False) == "float32"


# ----------------------------------------------------------------------------- Windows: no /proc, no sysconf


def test_memory_that_cannot_be_measured_is_a_note_and_a_safe_choice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.delattr(os, "sysconf")
    assert cache.available_memory_bytes() is None
    assert cache.cache_fits_in_memory(2 * 2**30)
    assert "cannot be measured" in capsys.readouterr().err
    assert not cache.cache_fits_in_memory(64 * 2**30), "a cache too big for a small machine is not risked"


def test_training_runs_where_memory_cannot_be_measured(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(cache, "available_memory_bytes", lambda: None)
    train.main(["--data_path", str(synthetic_pets), "-e", "1", *TOY_RUN, "--save-dir", str(tmp_path),
                "--run-name", "r"])
    assert (tmp_path / "r" / "results.json").exists()
    assert "cannot be measured" in capsys.readouterr().err


# ----------------------------------------------------------------------------- spawn (macOS, Windows)

SPAWNED = """
    import multiprocessing
    import sys

    sys.path[:0] = [{src!r}]

    if __name__ == "__main__":
        multiprocessing.set_start_method("spawn")
        import cache
        import inference
        import oxford_pet
        import train

        train.main(["--data_path", {data!r}, "-e", "1", "-n", "resnet18_unet", "-b", "8", "--image-size", "32",
                    "--num-workers", "2", "--device", "cpu", "--no-cache", "--save-dir", {runs!r},
                    "--run-name", "per-image"])
        cache.load_or_build(oxford_pet.load_dataset({data!r}, "valid", 32), 32, {cache!r}, num_workers=2)
        inference.main(["-m", {runs!r} + "/per-image", "--input", {photos!r}, "--output", {masks!r},
                        "--num-workers", "2", "--device", "cpu"])
"""


def test_every_loader_works_with_the_spawn_start_method(synthetic_pets: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40 + index, 30), (200, 120, 40)).save(photos / f"photo{index}.jpg")
    script = tmp_path / "spawned.py"
    script.write_text(textwrap.dedent(SPAWNED.format(
        src=str(SRC), data=str(synthetic_pets), runs=str(tmp_path / "runs"), cache=str(tmp_path / "cache"),
        photos=str(photos), masks=str(tmp_path / "masks"),
    )))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Test Dice:") == 1
    assert (tmp_path / "runs" / "per-image" / "results.json").exists()
    assert any((tmp_path / "cache").glob("*.names.json"))
    assert sorted(path.name for path in (tmp_path / "masks").glob("*_mask.png")) == [
        f"photo{index}_mask.png" for index in range(3)
    ]


# ----------------------------------------------------------------------------- resuming on another machine


def interrupted_run(synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-epoch run stopped by Ctrl-C in epoch 2: its last.pt holds the end of epoch 1."""
    argv = ["--data_path", str(synthetic_pets), "-e", "2", *TOY_RUN, "--save-dir", str(tmp_path), "--run-name", "r"]
    assert train_with_ctrl_c_in_epoch_2(monkeypatch, argv) == 130
    return tmp_path / "r"


def rewrite_last(run_dir: Path, change) -> None:
    """Edit last.pt as another machine would have written it."""
    last = ckpt.load_checkpoint(run_dir / ckpt.LAST_NAME)
    change(last)
    ckpt.save_checkpoint(run_dir / ckpt.LAST_NAME, **last)


FP16_SCALER = {
    "scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7
}


def test_a_run_from_a_cuda_machine_resumes_on_the_cpu(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = interrupted_run(synthetic_pets, tmp_path, monkeypatch)

    def as_saved_on_two_bf16_gpus(last: dict) -> None:
        last["args"].update(device="cuda", amp=True, channels_last=True)
        last["training"]["scaler"] = {}  # bf16: the scaler was off
        last["training"]["rng"]["cuda"] = [torch.get_rng_state()[:16].clone(), torch.get_rng_state()[:16].clone()]

    rewrite_last(run_dir, as_saved_on_two_bf16_gpus)
    train.main(["--resume", str(run_dir), "--device", "cpu", "--no-channels-last"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 2


def test_resuming_on_a_training_set_of_another_size_is_refused(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = interrupted_run(synthetic_pets, tmp_path, monkeypatch)
    fewer = shutil.copytree(synthetic_pets, tmp_path / "fewer")
    lines = (fewer / "annotations" / "trainval.txt").read_text().splitlines()
    (fewer / "annotations" / "trainval.txt").write_text("\n".join(lines[:-5]) + "\n")
    with pytest.raises(errors.PetsegError, match="it trained on 54 images and now gets 49"):
        train.main(["--resume", str(run_dir), "--data_path", str(fewer)])


def test_the_loss_scale_carries_over_only_between_fp16_runs() -> None:
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    run_state.restore_scaler(fp16, {})  # from a bf16 or fp32 run: the scaler starts afresh
    assert fp16.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    run_state.restore_scaler(fp16, FP16_SCALER)
    assert fp16.get_scale() == 1024.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    run_state.restore_scaler(off, FP16_SCALER)  # an fp16 run resumed with bf16
    assert not off.is_enabled()


def test_cuda_random_states_are_restored_for_the_gpus_this_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    restored = []

    def set_rng_state(state: torch.Tensor, device: int | str = "cuda") -> None:
        if device not in (0, "cuda", "cuda:0"):
            raise RuntimeError(f"CUDA error: invalid device ordinal {device}")
        restored.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    states = {**devices.rng_states(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}  # saved on two GPUs
    devices.restore_rng_states(states)
    assert restored == [0]


# ----------------------------------------------------------------------------- runs sharing a cache folder


def test_a_cache_removed_by_another_run_while_loading_is_rebuilt(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = load_dataset(synthetic_pets, "valid", image_size=32)
    first = load_or_build(dataset, 32, tmp_path)
    real_load = cache.np.load

    def another_run_cleans_up_first(path, *args, **kwargs):
        for stale in tmp_path.glob("*.npy"):
            stale.unlink()  # another run of another fingerprint removed these as stale
        monkeypatch.setattr(cache.np, "load", real_load)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(cache.np, "load", another_run_cleans_up_first)
    again = load_or_build(dataset, 32, tmp_path)
    assert torch.equal(again.images, first.images) and again.names == first.names


def test_clean_up_tolerates_files_another_run_removed_or_holds_open(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = shutil.copytree(synthetic_pets, tmp_path / "pets")
    cache_dir = tmp_path / "cache"
    dataset = load_dataset(data, "valid", image_size=32)
    load_or_build(dataset, 32, cache_dir)
    old_files = sorted(cache_dir.iterdir())
    trimap = data / "annotations" / "trimaps" / f"{dataset.names[0]}.png"
    stat = trimap.stat()
    real_unlink = Path.unlink

    def held_open_on_windows(path: Path, missing_ok: bool = False) -> None:
        if path in old_files[:1]:
            raise PermissionError(f"[WinError 32] {path} is being used by another process")
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", held_open_on_windows)
    os.utime(trimap, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new fingerprint
    rebuilt = load_or_build(dataset, 32, cache_dir)
    assert rebuilt.names == dataset.names
    assert old_files[0].exists() and not any(path.exists() for path in old_files[1:])


# ----------------------------------------------------------------------------- one augmentation


def test_cached_and_per_image_training_see_the_same_batches(synthetic_pets: Path, tmp_path: Path) -> None:
    dataset = load_dataset(synthetic_pets, "train", image_size=32)
    split = load_or_build(dataset, crop_source_size(32), tmp_path)
    kwargs = {"batch_size": 8, "device": CPU, "image_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "seed": 5}
    cached, per_image = TrainBatches(split, **kwargs), TrainBatches(dataset, **kwargs, num_workers=2)
    assert len(cached) == len(per_image) == len(dataset) // 8
    for _ in range(2):  # two epochs: the order and the draws go on alike
        for (image_a, mask_a), (image_b, mask_b) in zip(cached, per_image, strict=True):
            assert image_a.shape == (8, 3, 32, 32)
            assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
    other_seed = TrainBatches(split, **{**kwargs, "seed": 6})
    assert not torch.equal(next(iter(other_seed))[0], next(iter(TrainBatches(split, **kwargs)))[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: page-locked memory is CUDA's")
def test_a_cache_kept_on_the_cpu_for_a_gpu_copies_batches_from_pinned_memory(
    synthetic_pets: Path, tmp_path: Path
) -> None:
    split = load_or_build(load_dataset(synthetic_pets, "valid", image_size=32), 32, tmp_path)
    source = batches._CachedSource(split, torch.device("cuda"))  # left on the CPU, as place_cache does for a big one
    assert not source.images.is_pinned(), "nothing is pinned for nothing"
    index = torch.tensor([3, 1])
    staged = source.gather(source.images, index)
    assert staged.is_pinned(), "only a copy from page-locked memory overlaps with compute"
    images, _ = next(source.batches([index]))
    assert images.is_cuda and torch.equal(images.cpu(), split.images[index])


# ----------------------------------------------------------------------------- mixed precision, short schedules


def test_mixed_precision_run_with_channels_last_trains_and_saves(
    synthetic_pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train.main([
        "--data_path", str(synthetic_pets), "-e", "2", *TOY_RUN, "--amp", "--channels-last",
        "--save-dir", str(tmp_path), "--run-name", "amp",
    ])
    out = capsys.readouterr().out
    assert "bfloat16 autocast, channels-last" in out
    run_dir = tmp_path / "amp"
    best = ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME)
    assert best["amp"] is True and best["args"]["channels_last"] is True
    assert all(tensor.dtype != torch.bfloat16 for tensor in best["model_state"].values()), "weights stay float32"
    assert all(torch.isfinite(tensor).all() for tensor in best["model_state"].values() if tensor.is_floating_point())
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["test"]["dice"] <= 1
    last = ckpt.load_checkpoint(run_dir / ckpt.LAST_NAME)
    assert "training" not in last, "a finished run keeps last.pt's weights, not the optimiser state"
    assert last["epoch"] == 2


@pytest.mark.parametrize("epochs, batch", [(2, 4), (1, 21)])
def test_schedules_too_short_to_warm_up_train_with_a_warning(
    epochs: int, batch: int, synthetic_pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = shutil.copytree(synthetic_pets, tmp_path / "pets")
    lines = (data / "annotations" / "trainval.txt").read_text().splitlines()
    (data / "annotations" / "trainval.txt").write_text("\n".join(lines[:24]) + "\n")  # 21 train, 3 valid
    train.main([
        "--data_path", str(data), "-e", str(epochs), *TOY_RUN, "-b", str(batch), "--save-dir", str(tmp_path),
        "--run-name", "short",
    ])
    assert "too few for a good model" in capsys.readouterr().err
    with open(tmp_path / "short" / "history.csv") as file:
        learning_rates = [float(line.split(",")[1]) for line in file.readlines()[1:]]
    assert learning_rates[0] > 1e-3 / 26, "the first step must not run at a near-zero learning rate"
