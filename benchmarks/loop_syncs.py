"""How often train.train_one_epoch would make the host wait for a GPU, and what it copies to the device, counted
on any machine (tools/host_syncs.py): one epoch from a synthetic decode-once cache on the training device.

    python benchmarks/loop_syncs.py -n resnet34_unet --steps 50

Prints the host reads and device copies in all and per step, and the lines of src/ that made them. The batches
are fetched in the training thread here, so that the (thread-local) counter sees the fetching too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

import batches  # noqa: E402
import devices  # noqa: E402
import losses  # noqa: E402
import run_state  # noqa: E402
import train  # noqa: E402
from cache import CachedSplit  # noqa: E402
from cli import argument_parser  # noqa: E402
from host_syncs import HostSyncCounter  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("Count the host reads and device copies of one training epoch, on any machine.")
    parser.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="architecture")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the epoch (batch 2, 32 px)")
    args = parser.parse_args(argv)

    generator = torch.Generator().manual_seed(0)
    n, side = 2 * args.steps, 46  # 46 px: the crop source of 32 px images
    split = CachedSplit(
        torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=generator),
        torch.randint(0, 2, (n, 1, side, side), dtype=torch.uint8, generator=generator),
        [str(i) for i in range(n)],
    )
    loader = batches.TrainBatches(split, 2, CPU, 32, IMAGENET_MEAN, IMAGENET_STD)
    model = build_model(args.network)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = run_state.make_scheduler(optimizer, 1e-3, 10, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches.prefetched = iter  # fetch in this thread, where the counter sees it
    devices.device_constant.cache_clear()  # the constants made once per device count too
    with HostSyncCounter([REPO_ROOT / "src"]) as counter:
        train.train_one_epoch(model, loader, optimizer, scheduler, scaler, losses.bce_dice, CPU, False, "epoch")
    steps = len(loader)
    print(f"{args.network}, {steps} steps: {counter.syncs} host reads ({counter.syncs / steps:.2f} per step), "
          f"{counter.transfers} copies to the device ({counter.transfers / steps:.2f} per step)")
    for site, count in counter.sites.most_common():
        print(f"  {count:5d}  {site}")


if __name__ == "__main__":
    main()
