"""Train a UNet or ResNet34-UNet from scratch on Oxford-IIIT Pet (pet vs background).

    python src/train.py                      # ResNet34-UNet, the recommended recipe
    python src/train.py -n unet -e 100 -b 16

Each run gets its own folder in saved_models/: best.pt (best valid Dice), history.csv,
curves.png and, at the end, results.json with the test scores of best.pt.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint as ckpt
from evaluate import default_num_workers, eval_loader, evaluate, format_result
from models import MODEL_NAMES, build_model
from oxford_pet import DEFAULT_DATA_PATH, IMAGENET_MEAN, IMAGENET_STD, load_dataset, prepare_dataset
from plots import plot_history
from utils import (
    REPO_ROOT,
    BCEDiceLoss,
    atomic_write,
    autocast,
    autocast_dtype,
    logits_to_mask,
    per_image_dice,
    run_script,
    seed_everything,
    select_device,
    unused_path,
)

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_dice", "valid_loss", "valid_dice", "valid_dataset_dice", "valid_iou", "seconds",
)


def positive(kind: type):
    """argparse type: a number > 0, so a bad value stops the run before anything is written."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def image_size(text: str) -> int:
    value = int(text)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be at least 32 (the encoders downsample 32x), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a segmentation model on Oxford-IIIT Pet and report its test Dice. "
        "Defaults are the recommended recipe for one CUDA GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH, help="folder holding images/ and annotations/; downloaded there on first use")
    data.add_argument("--no-download", action="store_true", help="never download: fail with instructions if the dataset is missing")
    data.add_argument("--image-size", "--image_size", type=image_size, default=256, help="images are resized to SIZE x SIZE")
    data.add_argument("--num-workers", "--num_workers", type=int, default=default_num_workers(), help="data loading processes")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="architecture")
    model.add_argument("-e", "--epochs", type=positive(int), default=200, help="training epochs")
    model.add_argument("-b", "--batch_size", "--batch-size", type=positive(int), default=32, help="images per step")
    model.add_argument("-lr", "--learning-rate", "--learning_rate", dest="learning_rate", type=positive(float), default=1e-3, help="peak AdamW learning rate of the one-cycle schedule")
    model.add_argument("--weight-decay", "--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    model.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better valid Dice; 0 never stops early")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (bf16, or fp16 with loss scaling); default: on for CUDA")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--save-dir", "--save_dir", type=Path, default=REPO_ROOT / "saved_models", help="runs are saved in a new folder here")
    run.add_argument("--run-name", default=None, help="name of the run's folder (default: NETWORK_DATE-TIME); never reused")
    return parser.parse_args(argv)


def make_run_dir(save_dir: Path, name: str) -> Path:
    """A new folder for this run; an existing one (an earlier run's files) is never reused."""
    save_dir.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = unused_path(save_dir / name)
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:  # another run took the name between the check and mkdir
            continue


def plain_args(args: argparse.Namespace) -> dict:
    """The run's flags as plain types, so a checkpoint holding them loads with weights_only=True."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def write_history(history: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as file:
        file.write(text.getvalue())


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool,
    desc: str,
) -> dict[str, float]:
    """One pass over the training set; returns the mean loss and the mean per-image Dice of its batches."""
    model.train()
    loss_sum, dice_sum, seen = 0.0, 0.0, 0
    progress = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for images, masks in progress:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = loss_fn(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(images)
        loss_sum += loss.item() * n
        dice_sum += per_image_dice(logits_to_mask(logits.detach()), masks.bool()).sum().item()
        seen += n
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / seen, "dice": dice_sum / seen}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = select_device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    seed_everything(args.seed)
    data_path = prepare_dataset(args.data_path, download=not args.no_download)

    train_set = load_dataset(data_path, "train", args.image_size)
    if len(train_set) < args.batch_size:
        raise ckpt.PetsegError(f"-b/--batch_size {args.batch_size} is larger than the {len(train_set)} training images.")
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # a last batch of one image would make BatchNorm's statistics useless
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    loader_args = (IMAGENET_MEAN, IMAGENET_STD, args.batch_size, args.num_workers, device)
    valid_loader = eval_loader(data_path, "valid", args.image_size, *loader_args)

    model = build_model(args.network).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.epochs * len(train_loader), pct_start=0.1
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp and autocast_dtype(device) == torch.float16)
    loss_fn = BCEDiceLoss()

    run_dir = make_run_dir(args.save_dir, args.run_name or f"{args.network}_{datetime.now():%Y%m%d-%H%M%S}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.network} ({n_params / 1e6:.1f}M parameters) on {device}"
        f"{' with ' + str(autocast_dtype(device)).removeprefix('torch.') + ' autocast' if amp else ''}; "
        f"{len(train_set)} train / {len(valid_loader.dataset)} valid images at {args.image_size}px; run folder {run_dir}"
    )

    history: list[dict] = []
    best_dice, best_epoch = -1.0, 0
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            model, train_loader, optimizer, scheduler, scaler, loss_fn, device, amp, f"epoch {epoch}/{args.epochs}"
        )
        valid = evaluate(model, valid_loader, device, amp=amp, loss_fn=loss_fn, desc="valid")
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train["loss"],
            "train_dice": train["dice"],
            "valid_loss": valid.loss,
            "valid_dice": valid.dice,
            "valid_dataset_dice": valid.dataset_dice,
            "valid_iou": valid.dataset_iou,
            "seconds": time.perf_counter() - epoch_start,
        }
        history.append(row)
        write_history(history, run_dir / "history.csv")
        plot_history(history, run_dir / "curves.png", title=f"{args.network} - {run_dir.name}")

        improved = valid.dice > best_dice
        if improved:
            best_dice, best_epoch = valid.dice, epoch
            ckpt.save_checkpoint(
                run_dir / ckpt.BEST_NAME,
                network=args.network,
                model_kwargs={},
                model_state=model.state_dict(),
                image_size=args.image_size,
                mean=list(IMAGENET_MEAN),
                std=list(IMAGENET_STD),
                epoch=epoch,
                valid_dice=valid.dice,
                amp=amp,
                args=plain_args(args),
            )
        tqdm.write(
            f"epoch {epoch:3d}/{args.epochs}  lr {lr:.2e}  train loss {train['loss']:.4f} dice {train['dice']:.4f}  "
            f"valid loss {valid.loss:.4f} dice {valid.dice:.4f}  {row['seconds']:.1f}s{'  *best' if improved else ''}"
        )
        if args.patience and epoch - best_epoch >= args.patience:
            print(f"Stopping early: no better valid Dice for {args.patience} epochs.")
            break

    checkpoint = ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME)
    model.load_state_dict(checkpoint["model_state"])
    test_loader = eval_loader(data_path, "test", args.image_size, *loader_args, original_masks=True)
    test = evaluate(model, test_loader, device, amp=amp, loss_fn=loss_fn, desc="test")
    print(f"Best valid Dice {best_dice:.4f} at epoch {best_epoch}; test set ({len(test_loader.dataset)} images) with that checkpoint:")
    print(format_result("test", test))
    results = {
        "network": args.network,
        "checkpoint": ckpt.BEST_NAME,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "valid_dice": best_dice,
        "test": test.summary(),
        "train_seconds": time.perf_counter() - started,
        "args": plain_args(args),
    }
    with atomic_write(run_dir / "results.json", "w") as file:
        json.dump(results, file, indent=2)
    print(f"Saved {run_dir / ckpt.BEST_NAME} and results.json, history.csv, curves.png beside it.")


if __name__ == "__main__":
    run_script(main)
