"""Evaluate a model on a split: loss, per-image Dice (the headline), dataset-wide Dice and IoU.

    python src/evaluate.py -m saved_models/RUN/best.pt --split valid
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint as ckpt
from oxford_pet import DEFAULT_DATA_PATH, SPLITS, OxfordPetSegmentation, build_transform, prepare_dataset
from utils import autocast, logits_to_mask, per_image_dice, run_script, select_device


@dataclass
class EvalResult:
    loss: float
    dice: float  # mean over images of each image's Dice: the lab's number
    dataset_dice: float  # Dice of all pixels pooled, so big pets weigh more
    dataset_iou: float
    per_image_dice: list[float] = field(repr=False)

    def summary(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "per_image_dice"}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: bool = False,
    loss_fn: nn.Module | None = None,
    desc: str = "eval",
) -> EvalResult:
    """Run the model over a loader of (image, mask) batches; the loss is NaN when no loss_fn is given."""
    model.eval()
    loss_sum, intersection, pred_total, gt_total, union = 0.0, 0, 0, 0, 0
    dices = []
    for images, masks in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        if loss_fn is not None:
            loss_sum += loss_fn(logits, masks).item() * len(images)
        pred, gt = logits_to_mask(logits), masks.bool()
        dices.append(per_image_dice(pred, gt).cpu())
        intersection += (pred & gt).sum().item()
        union += (pred | gt).sum().item()
        pred_total += pred.sum().item()
        gt_total += gt.sum().item()
    per_image = torch.cat(dices)
    return EvalResult(
        loss=loss_sum / len(per_image) if loss_fn is not None else float("nan"),
        dice=per_image.mean().item(),
        dataset_dice=2 * intersection / (pred_total + gt_total) if pred_total + gt_total else 1.0,
        dataset_iou=intersection / union if union else 1.0,
        per_image_dice=per_image.tolist(),
    )


def default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def eval_loader(
    data_path: Path,
    split: str,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    skip_bad: bool = False,
) -> DataLoader:
    """A split resized and normalised for evaluation, in file order."""
    transform = build_transform(False, image_size, tuple(mean), tuple(std))
    dataset = OxfordPetSegmentation(data_path, split, transform, skip_bad=skip_bad)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )


def checkpoint_loader(
    data_path: Path, split: str, checkpoint: dict, batch_size: int, num_workers: int, device: torch.device
) -> DataLoader:
    """A split prepared exactly as the checkpoint's run evaluated it (same size and normalisation)."""
    return eval_loader(
        data_path, split, checkpoint["image_size"], checkpoint["mean"], checkpoint["std"], batch_size, num_workers, device
    )


def format_result(split: str, result: EvalResult) -> str:
    """The lines train.py and inference.py both print, so their numbers can be compared by eye."""
    name = split.capitalize()
    return (
        f"{name} Dice: {result.dice:.4f}  (mean of per-image Dice, images at the checkpoint's size)\n"
        f"{name} dataset-wide Dice: {result.dataset_dice:.4f}  IoU: {result.dataset_iou:.4f}  (pixels pooled)"
    )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by evaluate.py and inference.py."""
    parser.add_argument("-m", "--model", type=Path, required=True, help="checkpoint .pt file, or a run folder (uses its best.pt)")
    parser.add_argument("--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH, help="dataset folder holding images/ and annotations/ (default: %(default)s)")
    parser.add_argument("-n", "--network", default=None, help="optional: must match the checkpoint's network")
    parser.add_argument("-b", "--batch_size", "--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default: cuda, then mps, then cpu")
    parser.add_argument("--num-workers", "--num_workers", type=int, default=default_num_workers(), help="data loading processes (default: %(default)s)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (default: as the checkpoint's run used it)")


def load_for_eval(args: argparse.Namespace) -> tuple[dict, nn.Module, torch.device, bool]:
    """Checkpoint, model on the device, device and precision, from add_eval_args' flags."""
    path = ckpt.resolve_checkpoint_path(args.model)
    checkpoint = ckpt.load_checkpoint(path)
    ckpt.check_network(checkpoint, path, args.network)
    device = select_device(args.device)
    model = ckpt.model_from_checkpoint(checkpoint).to(device)
    amp = args.amp if args.amp is not None else bool(checkpoint.get("amp", False)) and device.type == "cuda"
    return checkpoint, model, device, amp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a petseg checkpoint on one split of Oxford-IIIT Pet.")
    add_eval_args(parser)
    parser.add_argument("--split", default="test", choices=SPLITS, help="which split (default: %(default)s)")
    args = parser.parse_args(argv)
    checkpoint, model, device, amp = load_for_eval(args)
    data_path = prepare_dataset(args.data_path)
    loader = checkpoint_loader(data_path, args.split, checkpoint, args.batch_size, args.num_workers, device)
    result = evaluate(model, loader, device, amp=amp, desc=args.split)
    print(f"{checkpoint['network']} epoch {checkpoint['epoch']} on {args.split} ({len(loader.dataset)} images)")
    print(format_result(args.split, result))


if __name__ == "__main__":
    run_script(main)
