"""Data-parallel training over the processes torchrun starts (`torchrun --standalone --nproc_per_node=4
src/train.py`): the process group, who does what, and reductions that count every image exactly once. Without
torchrun's RANK and WORLD_SIZE (a plain `python src/train.py`) all of this is a no-op."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cli import shell_command
from devices import select_device
from errors import PetsegError

# Long enough for one process to download the dataset (800 MB) or build the decode-once cache while
# the others wait; a process left alone by a crashed peer still gives up rather than hanging for good.
TIMEOUT = timedelta(minutes=30)
T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the ones training together (one, unless started by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False  # started by torchrun, even as its only process

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, shows progress bars and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This process's contiguous share of n items; the shares cover each item exactly once."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def resume_command(self, script: str, run: str) -> str:
        """The command that continues a run with the same processes, quoted for the user's shell."""
        arguments = [script, "--resume", run]
        if not self.launched:
            return shell_command(["python", *arguments])
        if self.local_world_size == self.world_size:
            return shell_command(["torchrun", "--standalone", f"--nproc_per_node={self.world_size}", *arguments])
        return f"the torchrun command that started the run, with {shell_command(arguments)}"


def from_environment() -> Processes:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Processes()
    return Processes(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
        launched=True,
    )


def start(processes: Processes, device_name: str) -> torch.device:
    """The device this process trains on, after joining the process group when torchrun started it:
    NCCL with one GPU per process (cuda:LOCAL_RANK), Gloo on CPUs."""
    device = select_device(device_name)
    if not processes.launched:
        return device
    if device.type == "mps":
        raise PetsegError(
            "torchrun trains on CUDA GPUs or CPUs; a Mac's one GPU needs no torchrun: use python src/train.py."
        )
    if device.type == "cuda":
        if processes.local_rank >= torch.cuda.device_count():
            raise PetsegError(
                f"torchrun started {processes.local_world_size} processes on this machine, but it has "
                f"{torch.cuda.device_count()} GPU(s): pass --nproc_per_node={torch.cuda.device_count()} or fewer."
            )
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def stop(wait_for_others: bool = False) -> None:
    """Close the process group. After a run that ended well, wait_for_others first lets every process
    arrive here, so that none closes its connections while another still reads from them (which can
    abort that one in Gloo); after an error, processes must not wait for ones that will never come."""
    if active():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def first_on_each_machine(processes: Processes, work: Callable[[], T]) -> T:
    """work() on each machine's local rank 0 while the machine's other processes wait, then on them,
    which finds it done: a download or a cache is made once per machine, not raced for."""
    if processes.local_rank == 0:
        result = work()
    barrier()
    if processes.local_rank != 0:
        result = work()
    return result


def _reduced(tensor: torch.Tensor, minimum: bool = False) -> torch.Tensor:
    """A copy of `tensor` summed (or its minimum taken) element-wise over all processes."""
    result = tensor.clone()
    dist.all_reduce(result, op=dist.ReduceOp.MIN if minimum else dist.ReduceOp.SUM)
    return result


def sum_across(values: Sequence[float]) -> list[float]:
    """Each value summed over all processes, in float64 so that pixel counts stay exact."""
    if not active():
        return list(values)
    # NCCL takes its tensors on this process's GPU, Gloo on the CPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return _reduced(torch.tensor(list(values), dtype=torch.float64, device=device)).tolist()


def min_across(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over all processes of a tensor on this process's device; queued on the
    device like any other operation, so it does not make the host wait."""
    return _reduced(tensor, minimum=True) if active() else tensor


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def concat_across(items: list[Any]) -> list[Any]:
    """Every process's list, concatenated in rank order: with contiguous shards, the original order."""
    if not active():
        return items
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast(value: Any) -> Any:
    """Rank 0's value, on every process (small values: every process sends its own)."""
    return concat_across([value])[0]


class _SumAcross(torch.autograd.Function):
    """A sum over processes that gradients flow back through: each process's statistics depend on
    every process's images, so each image's gradient gathers the contributions of all."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return _reduced(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _reduced(grad)


class _GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with the batch statistics of every process's images: nn.SyncBatchNorm's job on
    CPUs (Gloo), where it refuses to run. Same parameters and buffers as nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # In float32 whatever autocast made x: E[x²] - E[x]² needs the precision.
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        total = _SumAcross.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        channels, n = x.shape[1], total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)  # unbiased, as nn.BatchNorm2d keeps it
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def _to_global_batch_norm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        replacement = _GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        replacement.load_state_dict(module.state_dict())
        return replacement.to(next(chain(module.parameters(), module.buffers()), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, _to_global_batch_norm(child))
    return module


def wrap(model: nn.Module, device: torch.device, sync_batch_norm: bool) -> nn.Module:
    """The model as it trains: under torchrun, DistributedDataParallel (gradients averaged over
    processes), with BatchNorm statistics over all processes' images when sync_batch_norm."""
    if not active():
        return model
    if sync_batch_norm and dist.get_world_size() > 1:
        convert = nn.SyncBatchNorm.convert_sync_batchnorm if device.type == "cuda" else _to_global_batch_norm
        model = convert(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's wrappers: its state_dict has no `_orig_mod.` or
    `module.` prefix and loads into build_model's."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def quiet_unless(talks: bool) -> Iterator[None]:
    """Silence a process that is not rank 0: one log and one set of progress bars per run.
    Its errors still reach the terminal, through run_script, once the block is left."""
    if talks:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield
