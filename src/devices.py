"""Where and how a run computes, decided here and nowhere else: the device, its precision, the backends'
settings, and the random seeds. The rest of the code asks these functions, never the device type."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import sys

import numpy as np
import torch

from errors import PetsegError


def select_device(name: str = "auto", purpose: str = "training") -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU with a note fitting `purpose` ("training" or "prediction").
    A CUDA GPU this PyTorch build has no kernels for is refused here, before its first kernel would fail."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if name == "cpu":
            advice = ("which is very slow for training. Use a CUDA machine for the full recipe."
                      if purpose == "training" else f"which makes {purpose} slower than on a GPU, but it works.")
            print(f"warning: no CUDA or MPS device found; running on the CPU, {advice}", file=sys.stderr)
    elif name == "cuda" and not torch.cuda.is_available():
        raise PetsegError("--device cuda was asked for, but torch sees no CUDA device. Use --device auto or cpu.")
    elif name == "mps" and not torch.backends.mps.is_available():
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
    return any(
        number <= capability and (arch.startswith("compute_") or number[0] == capability[0])
        for arch in arch_list if (number := _arch_number(arch)) is not None
    )


def check_cuda_build(device: torch.device) -> torch.device:
    """`device`, unless this PyTorch build has no kernels for its GPU: then one error naming the GPU, its
    compute capability and the install that has them (or the CPU)."""
    capability = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    numbers = [number for number in map(_arch_number, arch_list) if number is not None]
    # No NVIDIA architectures listed (a ROCm build names AMD's gfx... ones): nothing to check here.
    if not numbers or build_runs_on(capability, arch_list):
        return device
    low, high = min(numbers), max(numbers)
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
    built = f"torch {torch.__version__} has kernels for compute capability {low[0]}.{low[1]} to {high[0]}.{high[1]}"
    if (5, 0) <= capability < low:
        fix = f"Install PyTorch's CUDA 12.6 build, which has them:\n  {LEGACY_CUDA_INSTALL}\nor pass"
    elif capability < low:
        fix = "PyTorch's builds start at compute capability 5.0 (its CUDA 12.6 build), so pass"
    else:
        fix = "Install a newer PyTorch, which has them:\n  pip install --upgrade torch torchvision\nor pass"
    raise PetsegError(
        f"the GPU {gpu} cannot run this PyTorch: {built}, so its first operation would fail with 'no kernel "
        f"image is available for execution on the device'. {fix} --device cpu to run on the CPU (slow, but it works)."
    )


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device runs it natively (no loss scaling needed), else float16: CUDA GPUs before
    Ampere (T4, V100, RTX 20xx) only emulate bfloat16, and cuDNN has no bfloat16 convolutions there."""
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


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation: on CUDA the fused kernel (fewer launches; with float16 loss scaling the GradScaler
    hands it the overflow flag on the device, so no wait for the GPU at every step); on the CPU the multi-tensor
    one, which torch picks only for GPUs and which halves a CPU step; elsewhere (MPS) torch's own choice."""
    return {"cuda": {"fused": True}, "cpu": {"foreach": True}}.get(device.type, {})


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN picks the fastest convolution algorithms for the run's fixed shapes; with `deterministic`, every
    operation a deterministic one (a GPU run repeats, at some speed), and one without raises rather than warns: a
    run that says it repeats must. (Training's one such, bilinear upsampling's CUDA backward, is then replaced by
    matrix products: models/upsample.py.)"""
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it is read when cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 tensor of constants (channel weights, mean, std) as (1, C, 1, 1), made once per device
    rather than copied there at every step."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def read_once(floats: torch.Tensor, ints: torch.Tensor) -> tuple[list[float], list[int]]:
    """float32 and int64 values on a device, read on the host in one copy (one wait for the GPU): the floats
    travel as their bit patterns beside the integers, so both arrive exact."""
    bits = floats.float().flatten().view(torch.int32).to(torch.int64)
    values = torch.cat([bits, ints.flatten().to(torch.int64)]).tolist()
    n_floats = bits.numel()
    return np.array(values[:n_floats], dtype=np.int32).view(np.float32).tolist(), values[n_floats:]


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
