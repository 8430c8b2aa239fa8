"""The lab's metric: Dice of binary masks, per image (`dice_score` is the lab's headline number)."""

from __future__ import annotations

import torch


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """Binary prediction: sigmoid(logit) > 0.5, computed as logit > 0 so no rounding can move it."""
    return logits > 0


def _check_binary(mask: torch.Tensor, name: str) -> torch.Tensor:
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1 values); got values outside {{0, 1}}. "
            "Threshold logits first, e.g. utils.logits_to_mask(logits)."
        )
    return mask.bool()


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
