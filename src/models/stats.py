"""Size and compute of a model: parameter count and FLOPs measured by torch's FLOP counter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils import auxiliary_loss


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
