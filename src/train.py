"""Train a UNet or ResNet34-UNet from scratch on Oxford-IIIT Pet (pet vs background).

    python src/train.py                      # ResNet34-UNet, the recommended recipe
    python src/train.py -n unet -e 100 -b 16
    python src/train.py --resume saved_models/RUN   # continue an interrupted run

Each run gets its own folder in saved_models/: best.pt (best valid Dice), last.pt (the latest
epoch, for --resume), history.csv, curves.png and, at the end, results.json with the test
scores of best.pt. Every file is replaced atomically, so a crash leaves the previous one whole.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
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
from cache import DEFAULT_CACHE_DIR, CachedBatches, available_memory_bytes, cache_bytes, load_or_build
from oxford_pet import (
    DEFAULT_DATA_PATH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_source_size,
    load_dataset,
    prepare_dataset,
)
from plots import plot_learning_curves
from utils import (
    REPO_ROOT,
    BCEDiceLoss,
    PetsegError,
    atomic_write,
    autocast,
    autocast_dtype,
    logits_to_mask,
    per_image_dice,
    restore_rng_states,
    rng_states,
    run_script,
    seed_everything,
    select_device,
    sigint_deferred,
    unused_path,
)

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_dice", "valid_loss", "valid_dice", "valid_dataset_dice", "valid_iou", "seconds",
)
# Flags that describe the machine rather than the experiment: --resume may change them.
RESUMABLE_FLAGS = ("data_path", "no_download", "skip_bad", "no_cache", "cache_dir", "device", "num_workers", "resume")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a segmentation model on Oxford-IIIT Pet and report its test Dice. "
        "Defaults are the recommended recipe for one CUDA GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH, help="folder holding images/ and annotations/; the default one is downloaded on first use")
    data.add_argument("--no-download", action="store_true", help="never download: fail with instructions if the dataset is missing")
    data.add_argument("--skip-bad", action="store_true", help="check every image and trimap first and leave out unusable ones (listed in one warning) instead of stopping")
    data.add_argument("--image-size", "--image_size", type=image_size, default=256, help="images are resized to SIZE x SIZE")
    data.add_argument("--num-workers", "--num_workers", type=int, default=default_num_workers(), help="data loading processes")
    data.add_argument("--no-cache", action="store_true", help="decode every image every epoch instead of once (slower; the cache is used only when it fits in memory anyway)")
    data.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the decoded, resized images are kept (environment variable PETSEG_CACHE_DIR changes the default)")

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
    run.add_argument("--resume", type=Path, default=None, help="continue a run from its last.pt (or its folder) with everything restored; only the data and machine flags may change")
    return parser


def plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def plain_args(args: argparse.Namespace) -> dict:
    """The run's flags as plain types, so a checkpoint holding them loads with weights_only=True."""
    return {key: plain(value) for key, value in vars(args).items()}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """The flags, and for --resume the checkpoint to continue from (its flags merged in)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resume_from = None
    if args.resume is not None:
        resume_from = ckpt.load_checkpoint(args.resume, name_in_folder=ckpt.LAST_NAME)
        if "training" not in resume_from:
            raise ckpt.CheckpointError(
                f"{args.resume} holds weights only (a best.pt?); --resume needs the run's last.pt or its folder."
            )
        saved = resume_from["args"]
        for key, value in vars(args).items():
            changed = value != parser.get_default(key)
            if key not in RESUMABLE_FLAGS and changed and plain(value) != saved.get(key):
                parser.error(
                    f"--{key.replace('_', '-')} {plain(value)} differs from the resumed run's {saved.get(key)}; "
                    "a resumed run keeps its recipe. Start a new run to change it."
                )
        overrides = {
            key: plain(getattr(args, key)) for key in RESUMABLE_FLAGS if getattr(args, key) != parser.get_default(key)
        }
        merged = {**saved, **overrides}
        paths = {key: Path(merged[key]) for key in ("data_path", "save_dir", "cache_dir")}
        args = argparse.Namespace(**{**merged, **paths})
        args.resume = ckpt.resolve_checkpoint_path(merged["resume"], ckpt.LAST_NAME)
        if (args.resume.parent / "results.json").exists():
            raise PetsegError(f"{args.resume.parent} has finished (see its results.json); there is nothing to resume.")
    if args.data_path != DEFAULT_DATA_PATH and not args.data_path.is_dir():
        parser.error(
            f"--data_path {args.data_path} is not a folder. Point it at the folder holding images/ and "
            f"annotations/, or leave it out to use (and on first use download) {DEFAULT_DATA_PATH}."
        )
    return args, resume_from


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


def write_history(history: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as file:
        file.write(text.getvalue())


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


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
    for step, (images, masks) in enumerate(progress, start=1):
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = loss_fn(logits, masks)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(step, loss_value)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(images)
        loss_sum += loss_value * n
        dice_sum += per_image_dice(logits_to_mask(logits.detach()), masks.bool()).sum().item()
        seen += n
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / seen, "dice": dice_sum / seen}


def make_loaders(args: argparse.Namespace, data_path: Path, device: torch.device) -> tuple:
    """Train and valid batches: from the decode-once cache unless --no-cache, or it would not fit in memory."""
    datasets = {split: load_dataset(data_path, split, args.image_size, skip_bad=args.skip_bad) for split in ("train", "valid")}
    sizes = {"train": crop_source_size(args.image_size), "valid": args.image_size}
    needed = sum(cache_bytes(len(dataset), sizes[split]) for split, dataset in datasets.items())
    use_cache = not args.no_cache and needed <= available_memory_bytes() // 2
    if not args.no_cache and not use_cache:
        print(f"warning: the cache needs {needed / 2**30:.1f} GiB, more than half the free memory; decoding every epoch instead.", file=sys.stderr)
    if use_cache:
        cached = {split: load_or_build(dataset, sizes[split], args.cache_dir, args.num_workers) for split, dataset in datasets.items()}
        batches = (args.batch_size, device, IMAGENET_MEAN, IMAGENET_STD)
        return (
            CachedBatches(cached["train"], *batches, train_size=args.image_size, seed=args.seed),
            CachedBatches(cached["valid"], *batches),
        )
    train_loader = DataLoader(
        datasets["train"],
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # a last batch of one image would make BatchNorm's statistics useless
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    valid_loader = DataLoader(
        datasets["valid"],
        args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # evaluating must not draw from the global RNG that augmentation uses
    )
    return train_loader, valid_loader


def resume_command(run_dir: Path) -> str:
    return f"python {os.path.relpath(Path(__file__))} --resume {run_dir}"


def main(argv: list[str] | None = None) -> None:
    args, resume_from = parse_args(argv)
    device = select_device(args.device)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    seed_everything(args.seed)
    data_path = prepare_dataset(args.data_path, download=not args.no_download, skip_bad=args.skip_bad)

    train_loader, valid_loader = make_loaders(args, data_path, device)
    if len(train_loader) == 0:
        raise PetsegError(f"-b/--batch_size {args.batch_size} is larger than the {len(train_loader.dataset)} training images.")

    model = build_model(args.network).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # the layout tensor-core convolutions run natively
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.epochs * len(train_loader), pct_start=0.1
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp and autocast_dtype(device) == torch.float16)
    loss_fn = BCEDiceLoss()

    history: list[dict] = []
    best_dice, best_epoch, start_epoch = -1.0, 0, 1
    if resume_from is None:
        run_dir = make_run_dir(args.save_dir, args.run_name or f"{args.network}_{datetime.now():%Y%m%d-%H%M%S}")
    else:
        run_dir = args.resume.parent
        state = resume_from["training"]
        model.load_state_dict(resume_from["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        train_loader.generator.set_state(state["loader_generator"])
        restore_rng_states(state["rng"])
        history, best_dice, best_epoch = state["history"], state["best_dice"], state["best_epoch"]
        start_epoch = resume_from["epoch"] + 1
        print(f"Resuming {run_dir} after epoch {resume_from['epoch']} (best valid Dice {best_dice:.4f} at epoch {best_epoch})")

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.network} ({n_params / 1e6:.1f}M parameters) on {device}"
        f"{' with ' + str(autocast_dtype(device)).removeprefix('torch.') + ' autocast' if amp else ''}; "
        f"{len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid images at {args.image_size}px"
        f"{'' if isinstance(train_loader, CachedBatches) else ', decoded every epoch'}; run folder {run_dir}"
    )

    def checkpoint_contents(epoch: int, valid_dice: float) -> dict:
        return {
            "network": args.network,
            "model_kwargs": {},
            "model_state": model.state_dict(),
            "image_size": args.image_size,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "epoch": epoch,
            "valid_dice": valid_dice,
            "amp": amp,
            "args": plain_args(args),
        }

    finished_epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            if args.patience and epoch - 1 - best_epoch >= args.patience:
                print(f"Stopping early: no better valid Dice for {args.patience} epochs.")
                break
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(
                model, train_loader, optimizer, scheduler, scaler, loss_fn, device, amp, f"epoch {epoch}/{args.epochs}"
            )
            valid = evaluate(model, valid_loader, device, amp=amp, loss_fn=loss_fn, desc="valid")
            history.append({
                "epoch": epoch,
                "lr": lr,
                "train_loss": train["loss"],
                "train_dice": train["dice"],
                "valid_loss": valid.loss,
                "valid_dice": valid.dice,
                "valid_dataset_dice": valid.dataset_dice,
                "valid_iou": valid.dataset_iou,
                "seconds": time.perf_counter() - epoch_start,
            })
            improved = valid.dice > best_dice
            if improved:
                best_dice, best_epoch = valid.dice, epoch
            tqdm.write(
                f"epoch {epoch:3d}/{args.epochs}  lr {lr:.2e}  train loss {train['loss']:.4f} dice {train['dice']:.4f}  "
                f"valid loss {valid.loss:.4f} dice {valid.dice:.4f}  {history[-1]['seconds']:.1f}s{'  *best' if improved else ''}"
            )
            with sigint_deferred():
                write_history(history, run_dir / "history.csv")
                plot_learning_curves([(run_dir.name, history)], run_dir / "curves.png", title=f"{args.network}: train (dashed) and valid (solid)")
                # best before last: a crash between the two resumes from the older last.pt, which redoes this epoch.
                if improved:
                    ckpt.save_checkpoint(run_dir / ckpt.BEST_NAME, **checkpoint_contents(epoch, valid.dice))
                training_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "loader_generator": train_loader.generator.get_state(),
                    "rng": rng_states(),
                    "history": history,
                    "best_dice": best_dice,
                    "best_epoch": best_epoch,
                }
                ckpt.save_checkpoint(run_dir / ckpt.LAST_NAME, **checkpoint_contents(epoch, valid.dice), training=training_state)
                finished_epoch = epoch
        checkpoint = ckpt.load_checkpoint(run_dir / ckpt.BEST_NAME)
        model.load_state_dict(checkpoint["model_state"])
        # Decoded afresh, once, to also score each image at its own size; the same loader inference.py uses.
        test_loader = eval_loader(
            data_path, "test", args.image_size, IMAGENET_MEAN, IMAGENET_STD, args.batch_size, args.num_workers,
            device, skip_bad=args.skip_bad, original_masks=True,
        )
        test = evaluate(model, test_loader, device, amp=amp, loss_fn=loss_fn, desc="test")
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        if finished_epoch:
            print(
                f"{run_dir / ckpt.LAST_NAME} holds the end of epoch {finished_epoch}; continue with:\n"
                f"  {resume_command(run_dir)}",
                file=sys.stderr,
            )
        else:
            print("No epoch had finished, so there is nothing to resume; start the run again.", file=sys.stderr)
            if not any(run_dir.iterdir()):
                run_dir.rmdir()
        sys.exit(130)
    except NonFiniteLoss as error:
        raise PetsegError(
            f"the training loss became {error.value} at epoch {finished_epoch + 1}, step {error.step}: the run diverged. "
            f"Try a lower -lr (this run used {args.learning_rate:g}) or --no-amp. The best checkpoint so far "
            f"(epoch {best_epoch}) is kept in {run_dir}."
        ) from error
    except torch.cuda.OutOfMemoryError as error:
        raise PetsegError(
            f"the GPU ran out of memory with -b {args.batch_size} at --image-size {args.image_size} ({args.network}). "
            f"Try a smaller -b (e.g. {max(1, args.batch_size // 2)}) or --image-size, or close other programs using the GPU."
        ) from error

    print(f"Best valid Dice {best_dice:.4f} at epoch {best_epoch}; test set ({len(test_loader.dataset)} images) with that checkpoint:")
    print(format_result("test", test))
    results = {
        "network": args.network,
        "checkpoint": ckpt.BEST_NAME,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "valid_dice": best_dice,
        "test": test.summary(),
        "train_seconds": sum(row["seconds"] for row in history),
        "args": plain_args(args),
    }
    with atomic_write(run_dir / "results.json", "w") as file:
        json.dump(results, file, indent=2)
    print(f"Saved {run_dir / ckpt.BEST_NAME} and results.json, history.csv, curves.png beside it.")


if __name__ == "__main__":
    run_script(main)
