"""The machine's own faults and the photos users bring: a full disk, folders that cannot be written, a
damaged cache, a container's memory limit, huge photos and a GPU out of memory each end in one clear
sentence, with nothing lost.

What CI cannot make is simulated: a write that fails with ENOSPC as a full disk's does, a folder made
read-only by a patched check, fake cgroup, /proc and vm_stat files. Run as root, a real tmpfs is mounted too.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.utils import draw_segmentation_masks

import cache
import checkpoint as ckpt
import errors
import evaluate
import files
import inference
import oxford_pet
import plots
import train
from errors import PetsegError
from models import model_kwargs
from oxford_pet import DatasetError, load_dataset, read_image
from test_user_facing import noise, write_run

GIB = 2**30
FAST = ["-e", "2", "-b", "8", "--image-size", "32", "--num-workers", "0", "--device", "cpu"]


def script_error(main, capsys: pytest.CaptureFixture) -> str:
    """What errors.run_script(main) prints, once it has exited 1 as a script does."""
    with pytest.raises(SystemExit) as exit_info:
        errors.run_script(main)
    assert exit_info.value.code == 1
    return capsys.readouterr().err


def raise_(error: BaseException):
    def main() -> None:
        raise error

    return main


# ----------------------------------------------------------------------------- a full disk, when root can make one


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 1 MiB file system (tmpfs), mounted when the tests run as root; skipped otherwise."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the simulated full disk covers the same code")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)]).returncode:
        pytest.skip("this machine does not let root mount a tmpfs (a container without the capability)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


class FullDisk:
    """The Nth atomic write of a file named `name` fails with ENOSPC after a few bytes, as a full disk does.
    files.atomic_write gets the patched mkstemp and fdopen; everything else it does is real."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1) -> None:
        self.name, self.nth, self.seen, self.fds = name, nth, 0, set()
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

        def mkstemp(*args, prefix: str = "", **kwargs):
            fd, path = real_mkstemp(*args, prefix=prefix, **kwargs)
            if prefix == f".{name}.":
                self.seen += 1
                if self.seen == nth:
                    self.fds.add(fd)
            return fd, path

        def fdopen(fd: int, *args, **kwargs):
            file = real_fdopen(fd, *args, **kwargs)
            return _FillsUp(file) if fd in self.fds else file

        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(files.os, "fdopen", fdopen)


class _FillsUp:
    def __init__(self, file) -> None:
        self.file, self.room = file, 100

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- operating-system errors at the top


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("ENOSPC", "the disk is full"),
        ("EDQUOT", "quota"),
        ("EROFS", "read-only file system"),
        ("EACCES", "permission denied"),
        ("ENOTDIR", "is a file, not a folder"),
        ("EEXIST", "already exists"),
    ],
)
def test_an_os_error_reaching_a_script_is_one_paragraph_naming_the_path(
    code: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    number = getattr(errno, code)
    path = tmp_path / "runs" / "best.pt"
    err = script_error(raise_(OSError(number, os.strerror(number), str(path))), capsys)
    assert err.startswith(f"error: {errors.display_path(path)}: ") and words in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert err.strip().endswith(".") and len(err.split(". ")) >= 2, "what happened, then what to do"


def test_a_bug_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(RuntimeError, match="our bug"):
        errors.run_script(raise_(RuntimeError("our bug")))


def checkpoint_contents(megabytes: int = 1) -> dict:
    return {
        "network": "unet", "model_kwargs": {}, "model_state": {"w": torch.zeros(megabytes * 2**18)}, "image_size": 32,
        "mean": [0.5] * 3, "std": [0.5] * 3, "epoch": 1, "valid_dice": 0.5,
    }


def test_torch_save_on_a_full_disk_names_the_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    FullDisk(monkeypatch, "best.pt")
    target = tmp_path / "best.pt"
    err = script_error(lambda: ckpt.save_checkpoint(target, **checkpoint_contents()), capsys)
    assert err.startswith(f"error: {errors.display_path(target)}: the disk is full") and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "the temporary file is removed"


def test_a_file_that_cannot_be_made_is_named_as_the_user_knows_it_not_by_its_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def read_only(dir: str, prefix: str, suffix: str):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}k3x9{suffix}"))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    target = tmp_path / "history.csv"

    def main() -> None:
        with files.atomic_write(target, "w") as file:
            file.write("epoch\n")

    err = script_error(main, capsys)
    assert err.startswith(f"error: {errors.display_path(target)}: it is on a read-only file system")


def test_a_real_full_disk_reads_the_same(small_tmpfs: Path, capsys: pytest.CaptureFixture) -> None:
    target = small_tmpfs / "best.pt"
    err = script_error(lambda: ckpt.save_checkpoint(target, **checkpoint_contents(4)), capsys)
    assert err.startswith(f"error: {errors.display_path(target)}: the disk is full") and "Traceback" not in err
    assert not list(small_tmpfs.iterdir())


# ----------------------------------------------------------------------------- checks before training


def parse_train(argv: list[str]) -> SimpleNamespace:
    return train.parse_args(argv)[0]


def flag_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def deny_writes_to(monkeypatch: pytest.MonkeyPatch, folder: Path, read_only: bool) -> None:
    """os.access says `folder` cannot be written, and statvfs says whether its file system is read-only:
    what root, whom chmod does not stop, cannot otherwise see in CI."""
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder and real_access(path, mode))

    def statvfs(path):
        if Path(path) != folder or not read_only:
            return real_statvfs(path)
        return SimpleNamespace(f_flag=os.ST_RDONLY)

    monkeypatch.setattr(os, "statvfs", statvfs)


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "not yours"])
def test_a_save_dir_that_cannot_be_written_is_a_flag_error_before_anything_is_written(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("not a folder\n")
    (tmp_path / "locked").mkdir()
    save_dir = {
        "a file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "runs",
        "read-only": tmp_path / "locked" / "runs", "not yours": tmp_path / "locked" / "runs",
    }[kind]
    if kind in ("read-only", "not yours"):
        deny_writes_to(monkeypatch, tmp_path / "locked", read_only=kind == "read-only")
    before = sorted(tmp_path.rglob("*"))
    err = flag_error(["--save-dir", str(save_dir)], capsys)
    expected = {"a file": "is a file, not a folder", "under a file": "is a file, not a folder",
                "read-only": "read-only file system", "not yours": "permission denied"}[kind]
    assert f"--save-dir {save_dir}" in err and expected in err
    assert sorted(tmp_path.rglob("*")) == before, "nothing is written"


@pytest.fixture
def read_only_tmpfs(small_tmpfs: Path) -> Path:
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    return small_tmpfs


def test_a_really_read_only_save_dir_is_a_flag_error(read_only_tmpfs: Path, capsys: pytest.CaptureFixture) -> None:
    assert "read-only file system" in flag_error(["--save-dir", str(read_only_tmpfs / "runs")], capsys)


def test_a_cache_dir_that_is_a_file_is_a_flag_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "cache").write_text("")
    err = flag_error(["--save-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert f"--cache-dir {tmp_path / 'cache'} is a file" in err and "--no-cache" in err
    assert parse_train(["--save-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), "--no-cache"])


def test_free_space_for_the_checkpoints_is_weighed_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import storage

    sizes = storage.checkpoint_sizes("resnet34_unet", model_kwargs("resnet34_unet", parse_train([])), ema=False)
    usage = namedtuple("usage", "total used free")
    argv = ["--save-dir", str(tmp_path / "runs")]

    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(0, 0, sizes.first_epoch() - 1))
    err = flag_error(argv, capsys)
    assert "need" in err and "best.pt" in err and "last.pt" in err and not (tmp_path / "runs").exists()

    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(0, 0, sizes.first_epoch()))
    parse_train(argv)
    assert "warning:" in capsys.readouterr().err, "room for the first checkpoints only"

    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage(0, 0, sizes.replacing()))
    parse_train(argv)
    assert "warning" not in capsys.readouterr().err
    with_ema = storage.checkpoint_sizes("resnet34_unet", model_kwargs("resnet34_unet", parse_train([])), ema=True)
    assert with_ema.last == sizes.last + sizes.best, "--ema keeps the raw weights in last.pt too"


# ----------------------------------------------------------------------------- a disk that fills mid-run


def instant_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Epochs of one optimiser step without images (so AdamW has its moments to save) and a valid Dice that
    rises each epoch: what is saved is real, and takes no time to compute."""
    scores = iter([0.5, 0.6, 0.7])

    def one_step(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer, *args, **kwargs) -> dict:
        optimizer.zero_grad()
        sum(parameter.sum() for parameter in model.parameters()).backward()
        optimizer.step()
        return {"loss": 1.0, "dice": 0.5}

    monkeypatch.setattr(train, "train_one_epoch", one_step)
    monkeypatch.setattr(
        train, "evaluate",
        lambda *args, **kwargs: SimpleNamespace(loss=1.0, dice=next(scores), dataset_dice=0.5, dataset_iou=0.5),
    )


def test_a_disk_that_fills_mid_run_says_which_checkpoints_are_whole_and_how_to_resume(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import storage

    instant_epochs(monkeypatch)
    FullDisk(monkeypatch, ckpt.LAST_NAME, nth=2)  # epoch 2's last.pt
    argv = ["--data_path", str(synthetic_pets), *FAST, "--no-cache", "--save-dir", str(tmp_path), "--run-name", "r"]
    with pytest.raises(PetsegError) as error:
        train.main(argv)
    run_dir = tmp_path / "r"
    message = str(error.value)
    assert message.startswith(f"{errors.display_path(run_dir / 'last.pt')}: the disk is full")
    assert f"{errors.display_path(run_dir / 'best.pt')} (epoch 2, valid Dice 0.6000)" in message
    assert f"{errors.display_path(run_dir / 'last.pt')} (the end of epoch 1)" in message
    assert message.endswith(f"--resume {errors.display_path(run_dir)}")
    assert not [path.name for path in run_dir.iterdir() if path.name.endswith(".tmp")], "no temporary file is left"
    last = ckpt.load_checkpoint(run_dir / ckpt.LAST_NAME)
    assert last["epoch"] == 1 and "training" in last, "the run can resume from it"
    # The space check's estimate is what the run wrote, give or take the headers it allows for.
    sizes = storage.checkpoint_sizes("resnet34_unet", model_kwargs("resnet34_unet", parse_train([])), ema=False)
    for path, estimate in ((run_dir / ckpt.BEST_NAME, sizes.best), (run_dir / ckpt.LAST_NAME, sizes.last)):
        assert estimate <= path.stat().st_size <= estimate + storage.OTHER_FILES_BYTES / 2
    # The command it prints continues the run, and is checked in turn against the run folder's disk.
    resume_flags = message.rsplit("train.py ", 1)[1].split()
    assert parse_train(resume_flags).resume == run_dir / ckpt.LAST_NAME
    deny_writes_to(monkeypatch, run_dir, read_only=True)
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(resume_flags)
    assert exit_info.value.code == 2 and "the run folder of --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the decode-once cache


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_shape(path: Path) -> None:
    np.save(path, np.zeros((1, 3, 8, 8), dtype=np.uint8))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-len(data) // 3] ^= 0xFF  # inside the array, past the header: same size, same shape
    path.write_bytes(bytes(data))


def garbled_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b")", b" ", 1))  # the header's shape tuple left open: numpy's parser fails


def huge_header_shape(path: Path) -> None:
    data = path.read_bytes()
    start, end = data.index(b"{"), data.index(b"\n")
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999, 1, 32, 32), }"
    path.write_bytes(data[:start] + header.ljust(end - start) + data[end:])  # numpy would ask for 100 TiB


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [("images", cut_short), ("masks", other_shape), ("images", flip_a_byte), ("masks", flip_a_byte),
     ("names", cut_short), ("images", garbled_header), ("masks", huge_header_shape)],
)
def test_a_damaged_cache_file_is_rebuilt_with_a_note(
    damaged: str, damage, synthetic_pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = load_dataset(synthetic_pets, "valid", image_size=32)
    first = cache.load_or_build(dataset, 32, tmp_path)
    suffix = ".names.json" if damaged == "names" else f".{damaged}.npy"
    damage(next(tmp_path.glob(f"*{suffix}")))
    capsys.readouterr()
    again = cache.load_or_build(dataset, 32, tmp_path)
    assert "damaged" in capsys.readouterr().err
    assert torch.equal(again.images, first.images) and torch.equal(again.masks, first.masks)
    cache.load_or_build(dataset, 32, tmp_path)
    assert "damaged" not in capsys.readouterr().err, "the rebuilt cache is whole"


@pytest.mark.parametrize("fault", ["under a file", "disk full"])
def test_a_cache_that_cannot_be_saved_is_kept_in_memory_with_a_note(
    fault: str, synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    dataset = load_dataset(synthetic_pets, "valid", image_size=32)
    expected = cache.load_or_build(dataset, 32, tmp_path / "good")
    (tmp_path / "file").write_text("")
    cache_dir = tmp_path / "file" / "cache" if fault == "under a file" else tmp_path / "full"
    if fault == "disk full":
        FullDisk(monkeypatch, next((tmp_path / "good").glob("*.masks.npy")).name)
    capsys.readouterr()
    kept = cache.load_or_build(dataset, 32, cache_dir)
    err = capsys.readouterr().err
    assert "cannot be saved" in err and "in memory for this run" in err
    assert torch.equal(kept.images, expected.images) and kept.names == expected.names
    assert not (cache_dir.exists() and any(cache_dir.iterdir())), "no half-saved cache or temporary file is left"


# ----------------------------------------------------------------------------- memory a container allows

CGROUP_V1_UNLIMITED = "9223372036854771712"


@pytest.mark.parametrize(
    ("membership", "files", "available_gib"),
    [
        ("0::/\n", {"memory.max": 2 * GIB, "memory.current": 1.5 * GIB, "memory.stat": "inactive_file 536870912"}, 1),
        ("0::/\n", {"memory.max": "max", "memory.current": 1 * GIB}, 16),
        ("0::/slurm/job_1/step_0\n", {"slurm/job_1/memory.max": 4 * GIB, "slurm/job_1/memory.current": 3 * GIB,
                                      "slurm/job_1/step_0/memory.max": "max",
                                      "slurm/job_1/step_0/memory.current": 2 * GIB}, 1),
        ("4:memory:/docker/abc\n3:cpu:/docker/abc\n",
         {"memory/memory.limit_in_bytes": 3 * GIB, "memory/memory.usage_in_bytes": 1 * GIB}, 2),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": CGROUP_V1_UNLIMITED,
                          "memory/memory.usage_in_bytes": 1 * GIB}, 16),
        ("0::/\n", {"memory.max": 64 * GIB, "memory.current": 1 * GIB}, 16),
    ],
    ids=["v2-container", "v2-no-limit", "v2-slurm-job", "v1-docker", "v1-no-limit", "limit-above-free"],
)
def test_the_memory_check_reads_the_cgroup_limit(
    membership: str, files: dict, available_gib: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {32 * 2**20} kB\nMemAvailable: {16 * 2**20} kB\n")
    (proc / "self" / "cgroup").write_text(membership)
    for name, value in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(f"{value if isinstance(value, str) else int(value)}\n")
    monkeypatch.setattr(cache, "PROC", proc)
    monkeypatch.setattr(cache, "CGROUP_ROOT", cgroup)
    assert cache.available_memory_bytes() == available_gib * GIB
    assert cache.cache_fits_in_memory(int(0.4 * available_gib * GIB))
    assert not cache.cache_fits_in_memory(int(0.6 * available_gib * GIB))
    assert "more than half the free memory" in capsys.readouterr().err


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               65536.
Pages active:                            400000.
Pages inactive:                          131072.
Pages speculative:                         1000.
"""


def test_on_macos_free_memory_is_what_vm_stat_says_not_the_total(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(cache.sys, "platform", "darwin")
    monkeypatch.setattr(
        cache.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, stdout=VM_STAT)
    )
    assert cache.available_memory_bytes() == (65536 + 131072) * 16384  # 3 GiB: free and inactive pages

    def no_vm_stat(*args, **kwargs):
        raise FileNotFoundError("vm_stat")

    monkeypatch.setattr(cache.subprocess, "run", no_vm_stat)
    assert cache.available_memory_bytes() is None
    assert not cache.cache_fits_in_memory(8 * GIB), "unmeasured, a big cache is not risked"
    assert "cannot be measured" in capsys.readouterr().err


# ----------------------------------------------------------------------------- users' photos


def max_pool_erode(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The outline's erosion before it was made linear: one (2 width + 1)² max-pool."""
    return -F.max_pool2d(-mask[None, None].float(), 2 * width + 1, stride=1, padding=width)[0, 0] > 0


def whole_image_overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """prediction_overlay as it was: drawn on the whole photo at once, in float."""
    width = max(1, round(min(mask.shape) / 150))
    inner, innermost = max_pool_erode(mask, width), max_pool_erode(mask, 2 * width)
    tinted = draw_segmentation_masks(image, mask, alpha=0.4, colors=plots.PREDICTION_COLOR)
    outline = torch.stack([mask & ~inner, inner & ~innermost])
    return draw_segmentation_masks(tinted, outline, alpha=1.0, colors=list(plots.OUTLINE_COLORS))


def small_masks(height: int, width: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Empty, full, speckled, and blobs of pet that reach the border: what an erosion may meet."""
    coarse = torch.randn(1, 1, max(2, height // 6), max(2, width // 6), generator=generator)
    blobs = F.interpolate(coarse, size=(height, width), mode="bilinear")[0, 0] > 0
    speckled = torch.rand(height, width, generator=generator) < 0.8
    return [torch.zeros(height, width, dtype=torch.bool), torch.ones(height, width, dtype=torch.bool), speckled, blobs]


def test_the_faster_outline_and_overlay_equal_the_old_ones_on_small_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "STRIP_PIXELS", 1000)  # several strips even on these small images
    generator = torch.Generator().manual_seed(0)
    for height, width in [(1, 1), (1, 9), (9, 1), (13, 17), (40, 31), (64, 90)]:
        for mask in small_masks(height, width, generator):
            for erosion in {0, 1, 2, 3, 5, 8, height // 2, max(height, width) + 1}:  # up to wider than the image
                expected = max_pool_erode(mask, erosion)
                assert torch.equal(plots._erode(mask, erosion), expected), (height, width, erosion)
    for height, width in [(9, 1), (40, 31), (161, 120), (300, 451)]:  # outlines 1, 2 and 3 pixels wide
        for mask in small_masks(height, width, generator):
            image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
            assert torch.equal(plots.prediction_overlay(image, mask), whole_image_overlay(image, mask)), (height, width)


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation makes."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor):
                self.bytes = max(self.bytes, value.numel() * value.element_size())
        return result


def test_the_overlay_makes_no_copy_of_the_photo_bigger_than_the_photo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plots, "STRIP_PIXELS", 2**14)
    photo = torch.from_numpy(noise(600, 800)).permute(2, 0, 1)
    rows, columns = torch.meshgrid(torch.arange(600), torch.arange(800), indexing="ij")
    mask = (rows - 300) ** 2 + (columns - 400) ** 2 < 250**2
    with LargestTensor() as largest:
        plots.prediction_overlay(photo, mask)
    assert largest.bytes <= photo.numel(), "a float copy of a 48-megapixel photo alone would take 576 MB"


def test_photo_workers_hand_over_the_model_input_and_the_size_not_the_photo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run(tmp_path / "run")
    photos, output = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    shapes = {"big.png": (90, 120), "small.png": (40, 30), "wide.jpg": (50, 200)}
    for name, (height, width) in shapes.items():
        Image.fromarray(noise(height, width)).save(photos / name)
    handed_over = []
    real_loader = inference.DataLoader

    def recording_loader(*args, **kwargs):
        for batch in real_loader(*args, **kwargs):
            handed_over.append(batch)
            yield batch

    monkeypatch.setattr(inference, "DataLoader", recording_loader)
    inference.main(["-m", str(run_dir), "--input", str(photos), "--output", str(output), "-b", "2",
                    "--num-workers", "0", "--device", "cpu"])
    inputs, sizes = handed_over[0]
    assert inputs.shape == (2, 3, 32, 32) and sizes.tolist() == [list(shapes["big.png"]), list(shapes["small.png"])]
    for name, (height, width) in shapes.items():
        stem = Path(name).stem
        with Image.open(output / f"{stem}_mask.png") as mask_file, Image.open(output / f"{stem}_overlay.png") as drawn:
            assert mask_file.size == (width, height)
            mask = torch.from_numpy(np.array(mask_file) == 255)
            overlay = torch.from_numpy(np.array(drawn)).permute(2, 0, 1)
        assert torch.equal(overlay, plots.prediction_overlay(read_image(photos / name), mask))


def test_a_decompression_bomb_is_a_clear_error_and_the_limit_can_be_lifted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = tmp_path / "huge.png"
    Image.fromarray(noise(100, 120)).save(photo)
    monkeypatch.setattr(oxford_pet.Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice this
    with pytest.raises(DatasetError, match=r"12,000 pixels.*PETSEG_MAX_IMAGE_PIXELS=12000") as error:
        read_image(photo)
    assert str(error.value).startswith(f"{photo}: ")
    with pytest.raises(PetsegError, match="PETSEG_MAX_IMAGE_PIXELS"):
        inference.main(["-m", str(write_run(tmp_path / "run")), "--input", str(photo), "--output",
                        str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists(), "refused before anything is written"
    monkeypatch.setenv("PETSEG_MAX_IMAGE_PIXELS", "12000")
    assert read_image(photo).shape == (3, 100, 120)
    monkeypatch.setenv("PETSEG_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DatasetError, match="PETSEG_MAX_IMAGE_PIXELS='lots' is not a number"):
        read_image(photo)


def test_the_dataset_images_share_the_pixel_limit(synthetic_pets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oxford_pet.Image, "MAX_IMAGE_PIXELS", 10)
    name = oxford_pet.split_names(synthetic_pets, "train")[-1]
    with pytest.raises(DatasetError, match=f"{name}.jpg: the image is too big to open safely"):
        oxford_pet.load_sample(synthetic_pets, name)


# ----------------------------------------------------------------------------- a GPU out of memory


def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["photos", "test split", "evaluate.py"])
def test_a_gpu_out_of_memory_while_predicting_says_which_batch_size_to_try(
    where: str, synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run(tmp_path / "run")
    monkeypatch.setattr(evaluate, "predict_logits", out_of_memory)
    monkeypatch.setattr(inference, "predict_logits", out_of_memory)
    flags = ["-m", str(run_dir), "-b", "8", "--num-workers", "0", "--device", "cpu"]
    if where == "photos":
        (tmp_path / "photos").mkdir()
        Image.fromarray(noise(40, 60)).save(tmp_path / "photos" / "cat.png")
        flags += ["--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")]
    else:
        flags += ["--data_path", str(synthetic_pets)]
    main = evaluate.main if where == "evaluate.py" else inference.main
    with pytest.raises(PetsegError, match=r"ran out of memory predicting with -b 8\. Try a smaller -b \(e\.g\. -b 4\)"):
        main(flags)


# ----------------------------------------------------------------------------- the error path's own faults


def test_a_path_under_a_folder_that_cannot_be_searched_is_shown_not_a_second_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unsearchable(self: Path, *args, **kwargs) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))  # as Path.exists does, Python < 3.14

    monkeypatch.setattr(Path, "exists", unsearchable)
    assert errors.display_path(Path("/root/private/runs")).endswith("runs")
    message = errors.describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/root/private/runs"))
    assert "runs: permission denied" in message


def test_a_write_failing_without_an_errno_keeps_its_message(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot write mode RGBA as JPEG"):
        with files.atomic_write(tmp_path / "out.jpg"):
            raise OSError("cannot write mode RGBA as JPEG")  # how Pillow's encoders fail
    assert list(tmp_path.iterdir()) == []


def test_a_file_system_without_permissions_still_gets_the_file_and_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_permissions(*args, **kwargs) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")  # vfat, exFAT, some network drives

    monkeypatch.setattr(os, "chmod", no_permissions)
    with files.atomic_write(tmp_path / "best.pt") as file:
        file.write(b"weights")
    assert [path.name for path in tmp_path.iterdir()] == ["best.pt"]


def test_an_os_error_we_cannot_explain_keeps_its_traceback() -> None:
    def unexplained() -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported", "/data/x")

    with pytest.raises(OSError, match="not supported"):
        errors.run_script(unexplained)


def test_a_failed_save_leaves_the_complete_cache_another_run_saved(
    synthetic_pets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    dataset = load_dataset(synthetic_pets, "valid", image_size=32)
    cache.load_or_build(dataset, 32, tmp_path)  # another run, finished first
    files = sorted(tmp_path.iterdir())

    def disk_full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(cache, "_load", lambda *args: None)  # this run looked before the other had finished
        patch.setattr(cache.np, "save", disk_full)
        cache.load_or_build(dataset, 32, tmp_path)
    assert "cannot be saved" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == files
    cache.load_or_build(dataset, 32, tmp_path)
    assert "caching" not in capsys.readouterr().err, "the other run's cache is still whole and used"


def test_an_image_over_the_limit_found_while_decoding_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = tmp_path / "frames.png"
    Image.new("L", (8, 8)).save(photo)  # gray: decoding converts it

    def bomb_at_decoding(self, *args, **kwargs):
        raise Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit of 178956970 pixels, ...")

    monkeypatch.setattr(Image.Image, "convert", bomb_at_decoding)  # as a GIF's or TIFF's later frame can
    with pytest.raises(DatasetError, match="frames.png: the image is too big to open safely"):
        read_image(photo)


class FullDiskPairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/cache/pairs.npy")


def test_an_os_error_in_a_loader_worker_is_explained_with_its_path(capsys: pytest.CaptureFixture) -> None:
    def load_in_a_worker() -> None:
        next(iter(torch.utils.data.DataLoader(FullDiskPairs(), num_workers=1)))

    with pytest.raises(SystemExit) as exit_info:
        errors.run_script(load_in_a_worker)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "pairs.npy: the disk is full" in err and "Traceback" not in err
