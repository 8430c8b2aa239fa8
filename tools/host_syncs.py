"""Count, on any device, the calls of our own code that would make the CPU wait for a GPU, and the
copies it makes onto the training device.

On a GPU, torch.cuda.set_sync_debug_mode("warn") reports every sync as it happens; on the CPU
nothing waits, so this counts the calls that would: reading a value on the host (.item(), .tolist(),
float(), int(), bool(), formatting, .numpy(), .cpu()) and explicit transfers (.to() or .cuda() with a
device, torch.tensor / torch.as_tensor with a device). Only calls made from files under `roots`
(the project's src/) count: torch's own (the optimiser's step counters live on the CPU) do not. A
CPU test can so hold the training loop to a budget of syncs and transfers per step, for the calls it
sees: it does not see indexing with a boolean mask, nonzero, masked_select or unique (whose result's
size the host must wait for), nor calls made in another thread (torch function modes are per
thread), nor waits inside torch (nn.SyncBatchNorm's, say). On a GPU,
torch.cuda.set_sync_debug_mode("warn") sees all of them (benchmarks/gpu_check.py).

    with HostSyncCounter([SRC]) as counter:
        train_one_epoch(...)
    counter.syncs, counter.transfers, counter.sites  # totals, and where each came from
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "numpy", "cpu"}
TENSOR_FROM_DATA = {"tensor", "as_tensor"}


def _is_transfer(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "cuda":
        return True
    if name == "to":
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        return device is not None
    if name in TENSOR_FROM_DATA:
        return kwargs.get("device") is not None
    return False


class HostSyncCounter(TorchFunctionMode):
    """A torch function mode counting host reads (`syncs`) and explicit device copies (`transfers`)
    made from files under `roots`; `sites` counts both by "file:line kind"."""

    def __init__(self, roots: list[Path]) -> None:
        super().__init__()
        self.roots = [str(Path(root).resolve()) for root in roots]
        self.syncs = 0
        self.transfers = 0
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = "sync" if name in READS else "transfer" if _is_transfer(name, args, kwargs) else None
        if kind is not None:
            caller = sys._getframe(1)
            filename = str(Path(caller.f_code.co_filename).resolve())
            if any(filename.startswith(root) for root in self.roots):
                if kind == "sync":
                    self.syncs += 1
                else:
                    self.transfers += 1
                self.sites[f"{Path(filename).name}:{caller.f_lineno} {name} ({kind})"] += 1
        return func(*args, **kwargs)
