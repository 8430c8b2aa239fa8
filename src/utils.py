"""Shared pieces: the Dice score, the training loss, device and precision choice, safe file writes."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import random
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


class PetsegError(Exception):
    """An error the user can fix: scripts print its message, without a traceback, and exit 1."""


def run_script(main: Callable[[], object]) -> None:
    """Run a script's main(); a PetsegError, or an operating-system error (disk full, read-only, permission
    denied, ...), becomes a one-paragraph message and exit code 1. Other errors are our bugs: they keep
    their traceback."""
    try:
        main()
    except PetsegError as error:
        print(f"error: {_without_worker_traceback(error)}", file=sys.stderr)
        sys.exit(1)
    except (OSError, RuntimeError) as error:
        os_error = os_error_behind(error)
        if os_error is None or os_error.errno not in _OS_ERROR_CODES:
            raise  # not one of the machine's faults we can explain: maybe our bug, so its traceback stays
        print(f"error: {describe_os_error(os_error)}", file=sys.stderr)
        sys.exit(1)


def _without_worker_traceback(error: Exception) -> str:
    """A DataLoader worker re-raises the error with its traceback prepended; the user needs only the message."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in message and marker in message:
        message = message.rsplit(marker, 1)[1].strip()
    return message


def os_error_behind(error: BaseException) -> OSError | None:
    """The operating-system error an exception is, or that torch.save turned into its own RuntimeError
    ("enforce fail at inline_container.cc ... unexpected pos"): else None."""
    if isinstance(error, OSError):
        return error if error.errno is not None else _from_worker(error)
    if isinstance(error, RuntimeError) and "inline_container" in str(error) and isinstance(error.__context__, OSError):
        return error.__context__
    return None


# How an OSError's last line reads, e.g. "OSError: [Errno 28] No space left on device: '/data/x.npy'".
_OS_ERROR_LINE = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?\s*$")


def _from_worker(error: OSError) -> OSError | None:
    """A DataLoader worker's OSError, which torch re-raises in the main process by its type and its text alone:
    its errno and path read back from that text; None for an OSError that never had an errno."""
    found = _OS_ERROR_LINE.search(str(error))
    if "Original Traceback" not in str(error) or found is None:
        return None
    return OSError(int(found[1]), found[2], found[3]) if found[3] is not None else OSError(int(found[1]), found[2])


# errno: (what happened, in plain words; what to do). Windows lacks some codes, so they are looked up by name.
_OS_ERRORS = {
    "ENOSPC": ("the disk is full (no space left on device)", "Free some space on it, or write to another disk."),
    "EDQUOT": ("your disk quota is used up", "Delete files you no longer need, or write to another disk."),
    "EROFS": ("it is on a read-only file system: nothing can be written there", "Choose a folder on a writable disk."),
    "EACCES": ("permission denied", "Choose a path you may use, or ask its owner to change its permissions."),
    "EPERM": ("the operation is not permitted", "Choose a path you may use, or ask its owner to change it."),
    "ENOTDIR": ("a part of the path is a file, not a folder", "Choose another path, or move that file away."),
    "EEXIST": ("it already exists and is in the way (e.g. a file where a folder should be)",
               "Choose another path, or move it away."),
    "EISDIR": ("it is a folder, where a file was expected", "Pass the path of a file."),
    "ENOENT": ("no such file or folder", "Check the path."),
    "ENAMETOOLONG": ("the path is too long for the file system", "Choose a shorter path or name."),
    "EMFILE": ("too many files are open", "Raise the limit (e.g. `ulimit -n 4096`) or pass fewer --num-workers."),
    "ENFILE": ("the system has too many files open", "Close other programs, or pass fewer --num-workers."),
    "EIO": ("the disk could not read or write it (input/output error)", "The disk or network drive may be failing: "
            "copy what you need to another one and check it."),
    "ENOMEM": ("the system ran out of memory", "Close other programs, or pass a smaller -b or fewer --num-workers."),
}
_OS_ERROR_CODES = {getattr(errno, name): text for name, text in _OS_ERRORS.items() if hasattr(errno, name)}


def describe_os_error(error: OSError) -> str:
    """One paragraph for the user: the path, what happened in plain words, what to do."""
    paths = [path for path in (error.filename, error.filename2) if isinstance(path, (str, os.PathLike))]
    where = " -> ".join(display_path(Path(path)) for path in paths) or "a file"
    if error.errno not in _OS_ERROR_CODES:
        detail = error.strerror or _without_worker_traceback(error) or type(error).__name__
        return f"{where}: {detail} (an error of the operating system)."
    happened, advice = _OS_ERROR_CODES[error.errno]
    return f"{where}: {happened}. {advice}"


# ----------------------------------------------------------------------------- metrics


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """Binary prediction: sigmoid(logit) > 0.5, computed as logit > 0 so no rounding can move it."""
    return logits > 0


def _check_binary(mask: torch.Tensor, name: str) -> torch.Tensor:
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name} must be a binary mask (bool or 0/1 values); got values outside {{0, 1}}. "
                "Threshold logits first, e.g. utils.logits_to_mask(logits)."
            )
        mask = mask.bool()
    return mask


def per_image_dice(pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Dice 2|P∩G| / (|P|+|G|) of each image in a batch (first dimension); 1 where both are empty."""
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred_mask shape {tuple(pred_mask.shape)} != gt_mask shape {tuple(gt_mask.shape)}")
    pred = _check_binary(pred_mask, "pred_mask").flatten(1)
    gt = _check_binary(gt_mask, "gt_mask").flatten(1)
    # Pixels are counted in integers (exact) and divided in float32: Apple's MPS has no float64.
    intersection = (pred & gt).sum(dim=1)
    total = pred.sum(dim=1) + gt.sum(dim=1)
    dice = (2 * intersection).float() / total.clamp(min=1).float()
    return torch.where(total > 0, dice, torch.ones_like(dice))


def dice_score(pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> float:
    """Mean per-image Dice of a batch of binary masks shaped (N, ...): the lab's headline metric."""
    return per_image_dice(pred_mask, gt_mask).mean().item()


# ----------------------------------------------------------------------------- loss


class BCEDiceLoss(nn.Module):
    """BCE-with-logits (pixel accuracy) plus soft Dice (overlap, insensitive to how big the pet is),
    each with a weight: (1, 1) is the recipe; (1, 0) and (0, 1) are BCE and soft Dice alone."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits).flatten(1)
        target = target.flatten(1)
        # The +1 keeps images without a pet from dividing by zero and lets them score 1 when predicted empty.
        soft_dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        return self.bce_weight * bce + self.dice_weight * (1 - soft_dice).mean()


LOSS_WEIGHTS = {"bce+dice": (1.0, 1.0), "bce": (1.0, 0.0), "dice": (0.0, 1.0)}  # (BCE, soft Dice)


def auxiliary_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], aux_logits: list[torch.Tensor], target: torch.Tensor
) -> torch.Tensor | float:
    """Deep supervision: the loss of each coarser decoder stage's logits, upsampled to the target's size,
    weighted 1/2 for the finest and halving per stage down (0 when there are none)."""
    total = 0.0
    for depth, logits in enumerate(reversed(aux_logits), start=1):
        upsampled = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        total = total + 0.5**depth * loss_fn(upsampled, target)
    return total


# ----------------------------------------------------------------------------- devices and precision


def select_device(name: str = "auto", purpose: str = "training") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU with a note fitting `purpose` ("training" or "prediction").
    A CUDA GPU this PyTorch build has no kernels for is refused here, before its first kernel would fail."""
    if name == "auto":
        if torch.cuda.is_available():
            return check_cuda_build(torch.device("cuda", torch.cuda.current_device()))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if purpose == "training":
            advice = "which is very slow for training. Use a CUDA machine for the full recipe."
        else:
            advice = f"which makes {purpose} slower than on a GPU, but it works."
        print(f"warning: no CUDA or MPS device found; running on the CPU, {advice}", file=sys.stderr)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PetsegError("--device cuda was asked for, but torch sees no CUDA device. Use --device auto or cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PetsegError("--device mps was asked for, but this torch has no MPS device. Use --device auto or cpu.")
    return check_cuda_build(torch.device("cuda", torch.cuda.current_device())) if name == "cuda" else torch.device(name)


# PyTorch's CUDA 12.6 build has kernels for compute capability 5.0 to 9.0; 2.14 is the last release to ship it.
LEGACY_CUDA_INSTALL = 'pip install "torch<2.15" "torchvision<0.30" --index-url https://download.pytorch.org/whl/cu126'


def _arch_number(arch: str) -> tuple[int, int] | None:
    """'sm_86' or 'compute_90' (or 'sm_90a') as (8, 6) or (9, 0)."""
    digits = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)[a-z]?", arch)
    return (int(digits[1]), int(digits[2])) if digits else None


def build_runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with these architectures has kernels for a GPU of this compute capability: a
    binary for sm_XY runs on X.Y and later minors of major X; PTX (compute_XY) is compiled for X.Y and later."""
    for arch in arch_list:
        number = _arch_number(arch)
        if number is None:
            continue
        if arch.startswith("sm_") and number[0] == capability[0] and number[1] <= capability[1]:
            return True
        if arch.startswith("compute_") and number <= capability:
            return True
    return False


def check_cuda_build(device: torch.device) -> torch.device:
    """`device`, unless this PyTorch build has no kernels for its GPU: then one error naming the GPU, its
    compute capability and the install that has them (or the CPU)."""
    capability = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    numbers = [number for number in map(_arch_number, arch_list) if number is not None]
    # No NVIDIA architectures listed (a ROCm build names AMD's gfx... ones): nothing to check here.
    if not numbers or build_runs_on(capability, arch_list):
        return device
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    built = f"torch {torch.__version__} has kernels for compute capability {min(numbers)[0]}.{min(numbers)[1]} to " \
        f"{max(numbers)[0]}.{max(numbers)[1]}"
    if (5, 0) <= capability < min(numbers):
        fix = f"Install PyTorch's CUDA 12.6 build, which has them:\n  {LEGACY_CUDA_INSTALL}\nor pass"
    elif capability < min(numbers):
        fix = "PyTorch's builds start at compute capability 5.0 (its CUDA 12.6 build), so pass"
    else:
        fix = "Install a newer PyTorch, which has them:\n  pip install --upgrade torch torchvision\nor pass"
    raise PetsegError(
        f"the GPU {gpu} cannot run this PyTorch: {built}, so its first operation would fail with 'no kernel "
        f"image is available for execution on the device'. {fix} --device cpu to run on the CPU (slow, but it works)."
    )


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device runs it natively (no loss scaling needed), else float16.

    CUDA GPUs before Ampere (T4, V100, RTX 20xx) only emulate bfloat16, and cuDNN has no bfloat16
    convolutions there, so they get float16 with loss scaling.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16


def default_amp(device: torch.device) -> bool:
    """Mixed precision by default on CUDA GPUs with tensor cores (compute capability 7.0, Volta, and later);
    P100s and GTX 10xx have none, so half precision would only add rounding there. Off elsewhere."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def needs_loss_scaling(device: torch.device, amp: bool) -> bool:
    """float16 gradients underflow without loss scaling (a GradScaler); bfloat16 and float32 ones do not."""
    return amp and autocast_dtype(device) == torch.float16


def describe_precision(device: torch.device, amp: bool) -> str:
    """How the run computes, for the start-up line."""
    if not amp:
        return "float32"
    dtype = str(autocast_dtype(device)).removeprefix("torch.")
    return f"{dtype} autocast{' with loss scaling' if needs_loss_scaling(device, amp) else ''}"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass when enabled. When not, torch.autocast is not entered at all:
    some releases refuse it on MPS even disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: torch.device("cuda") means the current GPU, which tensors call cuda:0."""
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def non_blocking(device: torch.device) -> bool:
    """Whether copies to `device` may be asynchronous: on CUDA, from page-locked memory. Not on MPS, where
    asynchronous copies from pageable memory have read memory already freed in some releases."""
    return device.type == "cuda"


def fused_optimizer(device: torch.device) -> bool:
    """AdamW's fused kernel on CUDA: fewer launches, and with float16 loss scaling no wait for the GPU at
    every step (the GradScaler hands it the overflow flag on the device). Elsewhere the default one."""
    return device.type == "cuda"


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest convolution algorithms for the run's fixed shapes (cudnn.benchmark); with
    `deterministic`, every operation that has a deterministic algorithm uses it (and warns where none exists),
    so that a GPU run is repeatable, at some speed."""
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it is read when cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 tensor of constants (channel weights, mean, std) as (1, C, 1, 1), made once per device
    rather than copied there at every step."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every global random state (python, numpy, torch, CUDA), as types torch.load(weights_only=True) accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    # Restored for the GPUs both machines have: a run may resume on a machine with fewer, or none.
    for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM, which train.py treats alike) until the block ends, so a checkpoint
    being written is finished first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- files


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once, at import: setting it to read it is process-wide, and would race with threads writing files.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file whole."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        error.filename = str(path)  # the file the user knows of, not the temporary one beside it
        raise
    try:
        # mkstemp makes files private; give them the permissions open() would, where the file system has any.
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.close(fd)  # already closed unless fdopen itself failed
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        os_error = os_error_behind(error)
        if os_error is not None and os_error.filename is None and os_error.errno is not None:
            os_error.filename = str(path)  # a failed write names no file: say which
        raise


def unused_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free `stem-2.suffix`, `stem-3.suffix`, ..."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def display_path(path: Path) -> str:
    """`path` as a user would type it: relative to the working directory when that is shorter, else absolute."""
    path = Path(path)
    absolute = path.resolve() if os.path.exists(path) else path.absolute()  # os.path.exists never raises
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # Windows: another drive has no relative path
        return str(absolute)
    return relative if len(relative) < len(str(absolute)) else str(absolute)
