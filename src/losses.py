"""Training losses by name: a new loss is one function (logits, 0/1 target) -> scalar, and one entry in LOSSES.

    python src/train.py --loss dice

Every loss takes float logits (N, 1, H, W) and a float {0, 1} target of the same shape and returns a
scalar; train.py adds the deep-supervision term (auxiliary_loss) with the same loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.upsample import resize_bilinear

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the logits: pixel accuracy, so large pets weigh more."""
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def soft_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per image, averaged: overlap, insensitive to how big the pet is."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.flatten(1)
    # The +1 keeps images without a pet from dividing by zero and lets them score 1 when predicted empty.
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return (1 - dice).mean()


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice, the recipe: pixel accuracy and overlap together."""
    return bce(logits, target) + soft_dice(logits, target)


# --loss NAME: what train.py, the benchmarks and the tools train with. Add an entry to add a loss.
LOSSES: dict[str, Loss] = {"bce+dice": bce_dice, "bce": bce, "dice": soft_dice}
DEFAULT_LOSS = "bce+dice"


def describe_losses() -> str:
    """Each registered loss with the first line of its docstring, for --loss's help."""
    return "; ".join(f"{name}: {(loss.__doc__ or '').strip().splitlines()[0]}" for name, loss in LOSSES.items())


def build_loss(name: str) -> Loss:
    """The loss registered as `name`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    return LOSSES[name]


def auxiliary_loss(
    loss_fn: Loss, aux_logits: list[torch.Tensor], target: torch.Tensor
) -> torch.Tensor | float:
    """Deep supervision: the loss of each coarser decoder stage's logits, upsampled to the target's size,
    weighted 1/2 for the finest and halving per stage down (0 when there are none)."""
    total = 0.0
    for depth, logits in enumerate(reversed(aux_logits), start=1):
        upsampled = resize_bilinear(logits.float(), target.shape[-2:])
        total = total + 0.5**depth * loss_fn(upsampled, target)
    return total
