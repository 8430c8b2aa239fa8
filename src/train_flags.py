"""Every flag of train.py with its default: the recommended recipe. Change a default here.

Flags are grouped as `--help` shows them: the data, the model and its optimisation, the recipe-study
options (measured against the defaults in docs/BENCHMARKS.md) and the run (device, precision, files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from augment import AUGMENTATIONS
from bookkeeping import DEFAULT_SAVE_EVERY
from cache import DEFAULT_CACHE_DIR
from cli import argument_parser, ema_decay, image_size, non_negative, non_negative_float, positive
from evaluate import default_num_workers
from files import REPO_ROOT
from losses import DEFAULT_LOSS, LOSSES, describe_losses
from models import MODEL_NAMES, networks_taking
from models.resnet34_unet import DEFAULT_DECODER_CHANNELS
from oxford_pet import DEFAULT_DATA_PATH


def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "Train a segmentation model on Oxford-IIIT Pet and report its test Dice. Defaults are the recommended "
        "recipe for one CUDA GPU; under torchrun the same command trains on several (see docs/platforms.md)."
    )
    add_data_flags(parser.add_argument_group("data"))
    add_recipe_flags(parser.add_argument_group("model and optimisation"))
    add_study_flags(parser.add_argument_group(
        "recipe-study options", "variants measured against the defaults (docs/BENCHMARKS.md); all off by default"
    ))
    add_run_flags(parser.add_argument_group("run"))
    return parser


def add_data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data_path", "--data-path", type=Path, default=DEFAULT_DATA_PATH,
        help="folder holding images/ and annotations/; the default one is downloaded on first use",
    )
    data.add_argument(
        "--no-download", action="store_true", help="never download: fail with instructions if the dataset is missing"
    )
    data.add_argument(
        "--skip-bad", action="store_true",
        help="check every image and trimap first and leave out unusable ones (listed in one warning) instead of "
        "stopping",
    )
    data.add_argument(
        "--image-size", "--image_size", type=image_size, default=256, help="images are resized to SIZE x SIZE"
    )
    data.add_argument(
        "--num-workers", "--num_workers", type=non_negative, default=default_num_workers(),
        help="processes decoding images (0: in the main process)",
    )
    data.add_argument(
        "--no-cache", action="store_true",
        help="decode every image every epoch instead of once (slower; the cache is used only when it fits in memory)",
    )
    data.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
        help="where the decoded, resized images are kept (environment variable PETSEG_CACHE_DIR changes the default)",
    )


def add_recipe_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="architecture")
    model.add_argument("-e", "--epochs", type=positive(int), default=200, help="training epochs")
    model.add_argument(
        "-b", "--batch_size", "--batch-size", type=positive(int), default=32,
        help="images per optimiser step, over all processes when started by torchrun",
    )
    model.add_argument(
        "-lr", "--learning-rate", "--learning_rate", dest="learning_rate", type=positive(float), default=1e-3,
        help="peak AdamW learning rate of the one-cycle schedule",
    )
    model.add_argument("--weight-decay", "--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    model.add_argument(
        "--patience", type=non_negative, default=0,
        help="stop after this many epochs without a better valid Dice; 0 never stops early",
    )


def add_study_flags(study: argparse._ArgumentGroup) -> None:
    study.add_argument(
        "--deep-supervision", action=argparse.BooleanOptionalAction, default=False,
        help="also train 1x1 heads on the coarser decoder stages, their loss halving per stage (training only; "
        "the checkpoint predicts as without them)",
    )
    study.add_argument(
        "--decoder-channels", type=positive(int), nargs=5, default=None, metavar="C",
        help=f"{', '.join(networks_taking('--decoder-channels'))} only: widths of the 5 decoder blocks, coarse to "
        f"fine (default: {' '.join(map(str, DEFAULT_DECODER_CHANNELS))})",
    )
    study.add_argument(
        "--full-res-skip", action=argparse.BooleanOptionalAction, default=False,
        help=f"{', '.join(networks_taking('--full-res-skip'))} only: give the last decoder block a skip from the "
        "input image at full resolution (their encoder starts at half resolution)",
    )
    study.add_argument(
        "--loss", default=DEFAULT_LOSS, choices=LOSSES, help=f"training loss (src/losses.py): {describe_losses()}",
    )
    study.add_argument(
        "--augment", default="default", choices=AUGMENTATIONS,
        help="the training augmentation, a preset of operations acting in this order: "
        + "; ".join(f"{name}: {preset.describe()}" for name, preset in AUGMENTATIONS.items()).replace("%", "%%"),
    )
    study.add_argument(
        "--ema", type=ema_decay, default=0.0,
        help="validate, keep and test an exponential moving average of the weights with this decay per step "
        "(e.g. 0.999, warmed up over the first steps); 0 turns it off",
    )


def add_run_flags(run: argparse._ArgumentGroup) -> None:
    run.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu"
    )
    run.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="mixed precision: bf16 on Ampere and newer GPUs, fp16 with loss scaling on Volta and Turing (default: "
        "on for CUDA GPUs of compute capability 7.0 and newer; off on older ones, which have no tensor cores)",
    )
    run.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last memory layout, which tensor cores run natively (default: on for CUDA)",
    )
    run.add_argument(
        "--deterministic", action="store_true",
        help="repeatable GPU runs: deterministic algorithms only (an operation without one stops the run with an "
        "error), bilinear upsampling as matrix products, cuDNN deterministic and not benchmarking; slower. On the "
        "CPU runs are repeatable without it",
    )
    run.add_argument(
        "--sync-bn", action=argparse.BooleanOptionalAction, default=True,
        help="under torchrun with several processes: BatchNorm statistics over the images of all processes, "
        "so 8 images on each of 4 GPUs normalise like 32",
    )
    run.add_argument(
        "--compile", action="store_true",
        help="torch.compile the model (slow to start; see docs/BENCHMARKS.md for whether it pays off)",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument(
        "--save-dir", "--save_dir", type=Path, default=REPO_ROOT / "saved_models",
        help="runs are saved in a new folder here",
    )
    run.add_argument(
        "--run-name", default=None, help="name of the run's folder (default: NETWORK_DATE-TIME); never reused"
    )
    run.add_argument(
        "--save-every", "--save_every", type=non_negative_float, default=DEFAULT_SAVE_EVERY, metavar="SECONDS",
        help="write last.pt (for --resume) and curves.png at most this often, also after the first epoch, at the end "
        "and on Ctrl-C. A killed run loses at most this much training; 0 writes them every epoch",
    )
    run.add_argument(
        "--resume", type=Path, default=None,
        help="continue a run from its last.pt (or its folder) with everything restored; only the data and machine "
        "flags may change",
    )
