"""Bilinear resizing that stays repeatable under --deterministic.

CUDA's backward of F.interpolate(mode="bilinear") adds into the input's gradient with atomics, in an
order that changes from run to run, and PyTorch has no deterministic version of it (with deterministic
algorithms required it raises). Bilinear resizing is linear and separable, so it is also two matrix
products, W_h @ x @ W_w^T, whose backward is matrix products too: deterministic on cuBLAS with the
fixed workspace devices.configure_backends sets. That path is taken only while deterministic
algorithms are on; otherwise F.interpolate runs, which is faster and uses less memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolation_matrix(in_size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(out_size, in_size) weights of bilinear resizing along one axis with align_corners=False: row i
    mixes the two source pixels around (i + 0.5) * in/out - 0.5, computed as PyTorch's kernels do."""
    scale = in_size / out_size
    source = ((torch.arange(out_size, device=device, dtype=dtype) + 0.5) * scale - 0.5).clamp(min=0)
    lower = source.floor().clamp(max=in_size - 1)
    upper_weight = (source - lower).clamp(0, 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    columns = torch.arange(in_size, device=device, dtype=dtype)
    # At the last source pixel lower and upper coincide, and the two weights add up to 1 there.
    lower_part = (1 - upper_weight)[:, None] * (columns == lower[:, None])
    return lower_part + upper_weight[:, None] * (columns == upper[:, None])


def resize_bilinear(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """F.interpolate(x, size=size, mode="bilinear", align_corners=False) for (N, C, H, W) tensors; while
    torch.are_deterministic_algorithms_enabled(), the same numbers (to float32 rounding) from matrix
    products, whose gradient is deterministic on CUDA as well."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if torch.is_autocast_enabled(x.device.type):
        # Autocast would round the weights to 16 bits; F.interpolate computes in float32 and so does this.
        with torch.autocast(x.device.type, enabled=False):
            return resize_bilinear(x, size)
    # Half precision is resized in float32, as F.interpolate computes it; float64 stays float64.
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = interpolation_matrix(x.shape[-2], size[0], x.device, dtype)
    columns = interpolation_matrix(x.shape[-1], size[1], x.device, dtype)
    resized = (rows @ x.to(dtype) @ columns.T).to(x.dtype)
    # The products return a plain contiguous tensor: keep a channels-last input's layout for the convolutions.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        resized = resized.contiguous(memory_format=torch.channels_last)
    return resized
