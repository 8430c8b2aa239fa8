"""Size and compute of a model: parameter count and FLOPs measured by torch's FLOP counter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from losses import auxiliary_loss
from models import NETWORKS, build_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, image_size: int, backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) for one image: forward only, or forward + BCE loss + backward
    (with deep supervision in training mode, the auxiliary heads' losses too, as train.py adds them).

    Runs on the model's device; build the model under `torch.device("meta")` to count without
    doing the arithmetic.
    """
    device = next(model.parameters()).device
    x = torch.randn(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        outputs = model(x)
        if backward:
            logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, [])
            target = torch.zeros_like(logits)
            loss = F.binary_cross_entropy_with_logits(logits, target)
            (loss + auxiliary_loss(F.binary_cross_entropy_with_logits, aux_logits, target)).backward()
    return counter.get_total_flops()


def count_saved_bytes(model: nn.Module, image_size: int, half_precision: bool = False) -> int:
    """Bytes of the tensors a training forward pass keeps for the backward pass, per image: batch 4 minus
    batch 2 (so the weights, kept once, drop out), on the CPU, under bfloat16 autocast if half_precision."""

    def saved(batch: int) -> int:
        storages: dict[int, int] = {}

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        images = torch.randn(batch, 3, image_size, image_size)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half_precision):
                model.train()(images)
        return sum(storages.values())

    return (saved(4) - saved(2)) // 2


# Where a network's entry has no figure, it is measured at this size and scaled by the pixels, as the figures are.
MEASURED_SIZE = 64
# The gradients of those activations, cuDNN workspaces and the augmentation's temporaries come on top.
WORKSPACE_FACTOR = 1.5
# Weights, their gradients and AdamW's two moments, in float32.
BYTES_PER_PARAMETER = 16


def saved_mib_per_image(network: str, half_precision: bool) -> float:
    """MiB a training step keeps for the backward pass per image at 256², with the network's default options:
    its registry entry's figure (a GPU measures the whole footprint: benchmarks/gpu_check.py prints it)."""
    figure = NETWORKS[network].saved_mib_per_image_256
    if figure is not None:
        return figure[half_precision]
    # No figure: measure, on the CPU as the figures were, rather than guess. A guess too low lets the GPU cache
    # crowd out training; one too high needlessly keeps the cache off the GPU. It costs a few forward passes.
    saved = count_saved_bytes(build_model(network), MEASURED_SIZE, half_precision)
    return saved * (256 / MEASURED_SIZE) ** 2 / 2**20


def training_bytes(network: str, image_size: int, batch_size: int, half_precision: bool, parameters: int) -> int:
    """An estimate of the GPU memory a training step takes: what the GPU-resident cache must leave free."""
    per_image = saved_mib_per_image(network, half_precision) * 2**20 * (image_size / 256) ** 2 * WORKSPACE_FACTOR
    return int(per_image * batch_size + parameters * BYTES_PER_PARAMETER)
