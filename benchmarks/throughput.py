"""How fast data reaches the model, and how fast the models train and predict.

    python benchmarks/throughput.py                         # synthetic photos of real sizes
    python benchmarks/throughput.py --data-path ../shared/oxford-iiit-pet-sample

Prints one markdown table and appends it, dated, with the device and the command, to
docs/BENCHMARKS.md (--no-record to skip). Measures:
- input pipeline, img/s on one CPU thread: the lab template's per-image PIL path (decode and
  resize), petseg's per-image path (--no-cache) and its decode-once cache: first the uint8
  batches the CPU hands to a GPU, then model-ready float batches made on this device (resize
  only, the lab path's work), then with the training augmentation;
- training img/s per model fed by the real (cached) loader vs one pre-loaded batch (compute only);
- inference img/s and peak memory per model.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

from batches import EvalBatches, TrainBatches  # noqa: E402
from cache import load_or_build  # noqa: E402
from cli import argument_parser  # noqa: E402
from make_synthetic_pets import REAL_IMAGE_SIZE, make_synthetic_pets  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from oxford_pet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    OxfordPetSegmentation,
    build_transform,
    crop_source_size,
    image_path,
    trimap_path,
)
from utils import BCEDiceLoss, autocast, select_device  # noqa: E402


def lab_pil_sample(data_path: Path, name: str, size: int, as_float: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The lab template's way: PIL decode, resize, numpy, per image; uint8 or float in [0, 1]."""
    image = np.array(Image.open(image_path(data_path, name)).convert("RGB").resize((size, size), Image.BILINEAR))
    trimap = np.array(Image.open(trimap_path(data_path, name)).resize((size, size), Image.NEAREST))
    image, mask = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy((trimap == 1) | (trimap == 3))[None]
    return (image.float() / 255, mask.float()) if as_float else (image, mask.to(torch.uint8))


def gather_batches(split, batch_size: int) -> None:
    """What the CPU does per batch for a GPU run from the cache: cut uint8 images and masks out of memory."""
    order = torch.randperm(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        split.images.index_select(0, index), split.masks.index_select(0, index)  # noqa: B018 - the timed work


def images_per_second(count: int, run) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_rate(model, batches, device: torch.device, amp: bool, steps: int) -> float:
    """img/s of forward + backward + AdamW over `steps` batches taken from `batches`, after one warm-up."""
    optimizer = torch.optim.AdamW(model.parameters())
    loss_fn = BCEDiceLoss()
    iterator = iter(batches)

    def step() -> int:
        images, masks = next(iterator)
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True))
        loss = loss_fn(logits, masks.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(images)

    model.train()
    step()
    synchronize(device)
    start = time.perf_counter()
    seen = sum(step() for _ in range(steps))
    synchronize(device)
    return seen / (time.perf_counter() - start)


def epoch(batches, device: torch.device) -> None:
    for _ in batches:
        pass
    synchronize(device)


@torch.no_grad()
def inference_rate(model, images: torch.Tensor, device: torch.device, amp: bool, steps: int) -> float:
    """img/s of eval-mode forward passes on one batch, after one warm-up."""
    model.eval()

    def run() -> None:
        with autocast(device, amp):
            for _ in range(steps):
                model(images)
        synchronize(device)

    run()
    return images_per_second(len(images) * steps, run)


def repeat(batch: tuple[torch.Tensor, torch.Tensor]):
    while True:
        yield batch


def cycle(batches):
    while True:
        yield from batches


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-path", "--data_path", type=Path, default=None,
        help="a dataset in the official layout (default: synthetic photos of real sizes, in a temporary folder)",
    )
    parser.add_argument(
        "--n-images", type=int, default=200, help="synthetic training photos (the official train split has 3312)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of the square model input, in pixels")
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto picks cuda, then mps, then cpu"
    )
    parser.add_argument(
        "-b", "--batch-size", type=int, default=None, help="images per batch (default: 32 on CUDA, 4 elsewhere)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps per model (default: 30 on CUDA, 2 elsewhere)"
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
        help=f"the models to time, among {', '.join(MODEL_NAMES)} (default: all of them)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to docs/BENCHMARKS.md")
    args = parser.parse_args()

    device = select_device(args.device)
    on_cuda = device.type == "cuda"
    batch_size = args.batch_size or (32 if on_cuda else 4)
    steps = args.steps or (30 if on_cuda else 2)
    amp = on_cuda
    size = args.image_size
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as scratch:
        data_path = args.data_path
        if data_path is None:
            data_path = make_synthetic_pets(
                Path(scratch) / "pets", n_trainval=args.n_images * 10 // 9 + 1, n_test=1, image_size=REAL_IMAGE_SIZE,
                progress=True,
            )
        train_set = OxfordPetSegmentation(data_path, "train", build_transform(train=True, image_size=size))
        names, n = train_set.names, len(train_set)
        print(f"{n} training images from {data_path}; device {device}")

        rows = []
        # One core for the input rows, as each DataLoader worker has: img/s per core, comparable across paths.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        lab_uint8 = images_per_second(
            n, lambda: [lab_pil_sample(data_path, name, size, as_float=False) for name in names]
        )
        rows.append(("input, uint8 for the GPU: lab template per-image PIL (decodes every epoch)", lab_uint8, "1.0x"))
        lab = images_per_second(n, lambda: [lab_pil_sample(data_path, name, size) for name in names])
        rows.append(("input, resize only: lab template per-image PIL, to float", lab, "1.0x"))
        eval_set = OxfordPetSegmentation(data_path, "train", build_transform(train=False, image_size=size))
        per_image_eval = images_per_second(n, lambda: [eval_set[i] for i in range(n)])
        rows.append(
            ("input, resize only: petseg per-image (`--no-cache`)", per_image_eval, f"{per_image_eval / lab:.1f}x")
        )
        caches = {}

        def build(source_size: int) -> None:
            caches[source_size] = load_or_build(train_set, source_size, Path(scratch) / "cache")

        build_rate = images_per_second(n, lambda: build(size))
        rows.append(("input: building the cache (once; then reused by every run)", build_rate, ""))
        uint8_rate = images_per_second(n, lambda: gather_batches(caches[size], batch_size))
        rows.insert(
            1,
            (
                "input, uint8 for the GPU: petseg cache (batches cut from memory)",
                uint8_rate,
                f"{uint8_rate / lab_uint8:.1f}x",
            ),
        )
        eval_batches = EvalBatches(caches[size], batch_size, device, IMAGENET_MEAN, IMAGENET_STD)
        cached_eval = images_per_second(n, lambda: epoch(eval_batches, device))
        rows.append(
            (
                f"input, resize only: petseg cache, normalised float batches on {device.type}",
                cached_eval,
                f"{cached_eval / lab:.1f}x",
            )
        )

        augmented = (batch_size, device, size, IMAGENET_MEAN, IMAGENET_STD)
        decoded = TrainBatches(train_set, *augmented)
        per_image = images_per_second(len(decoded) * batch_size, lambda: epoch(decoded, device))
        rows.append(
            (
                f"input, augmented: petseg per-image (`--no-cache`) + batched augmentation on {device.type}",
                per_image,
                f"{per_image / lab:.1f}x",
            )
        )
        build(crop_source_size(size))
        cached = TrainBatches(caches[crop_source_size(size)], *augmented)
        from_cache = images_per_second(len(cached) * batch_size, lambda: epoch(cached, device))
        rows.append(
            (
                f"input, augmented: petseg cache + batched augmentation on {device.type}",
                from_cache,
                f"{from_cache / lab:.1f}x",
            )
        )
        torch.set_num_threads(threads)

        for name in args.models:
            model = build_model(name).to(device)
            if on_cuda:
                model = model.to(memory_format=torch.channels_last)
                torch.cuda.reset_peak_memory_stats()
            compute = training_rate(model, repeat(next(iter(cached))), device, amp, steps)
            fed = training_rate(model, cycle(cached), device, amp, steps)
            rows.append((f"train {name}: compute only (one pre-loaded batch)", compute, ""))
            rows.append((f"train {name}: fed by the cached loader", fed, f"{fed / compute:.0%} of compute-only"))
            predict = inference_rate(model, next(iter(cached))[0], device, amp, steps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
            rows.append(
                (f"inference {name}" + (f" (peak GPU memory in training {peak:.1f} GiB)" if peak else ""), predict, "")
            )
            del model

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    table = ["| what | img/s | ratio |", "|---|---:|---|"]
    table += [f"| {what} | {rate:.1f} | {ratio} |" for what, rate, ratio in rows]
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    header = (
        f"## {datetime.now():%Y-%m-%d %H:%M} — throughput on {device_name}\n\n"
        f"```\npython benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}\n```\n\n"
        f"{n} training images at {size}², batch {batch_size}, {steps} timed steps per model, "
        f"{'bf16 autocast, channels_last' if amp else 'fp32'}; "
        f"peak resident memory of the process {peak_rss:.1f} GiB.\n"
    )
    report = header + "\n" + "\n".join(table) + "\n"
    print("\n" + report)
    if not args.no_record:
        with open(REPO_ROOT / "docs" / "BENCHMARKS.md", "a") as file:
            file.write("\n" + report)
        print("Appended to docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
