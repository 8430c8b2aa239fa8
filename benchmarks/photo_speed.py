"""How long a user's photo takes from file to mask and overlay, and how much memory a folder of big ones takes.

    python benchmarks/photo_speed.py              # 3, 12 and 48 megapixels, then a folder of 48 MP photos
    python benchmarks/photo_speed.py --record     # also append the table, dated, to docs/BENCHMARKS.md

Synthetic phone photos (smooth shading, blotches and sensor noise, stored sideways with an EXIF
orientation as portrait shots are) and an untrained checkpoint at the model size are written to a
temporary folder. Each photo size is predicted as `inference.py --input PHOTO --output DIR` does, in
this process: the time from the model being loaded to its mask and overlay written, and that time per
megapixel (flat when the cost grows with the pixels alone). Then inference.py runs as a user would on
a folder of the biggest photos at its default -b and --num-workers, and the memory of all its processes
(the sum of their proportional set sizes, sampled every 50 ms; Linux only) is reported at its peak.
Nothing is written into the repository unless --record is given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.ExifTags import Base

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src")]

import checkpoint as ckpt  # noqa: E402
import inference  # noqa: E402
from cli import argument_parser  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

SIZES = {3: (2000, 1500), 12: (4000, 3000), 48: (8000, 6000)}  # megapixels: (width, height) as the sensor stores it


def write_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A JPEG with what makes phone photos costly to decode and compress: shading, texture and sensor noise."""
    rng = np.random.default_rng(seed)
    blotches = rng.integers(40, 216, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(blotches).resize((width, height), Image.BICUBIC)).copy()
    for start in range(0, height, 512):  # in bands, so a 48 MP photo needs no float copy of itself
        band = pixels[start : start + 512].astype(np.int16) + rng.integers(-12, 13, pixels[start : start + 512].shape)
        pixels[start : start + 512] = band.clip(0, 255)
    exif = Image.Exif()
    exif[Base.Orientation] = 6  # stored sideways: a portrait shot, turned upright on reading
    Image.fromarray(pixels).save(path, quality=90, exif=exif)


def write_checkpoint(path: Path, network: str, image_size: int) -> None:
    ckpt.save_checkpoint(
        path, network=network, model_kwargs={}, model_state=build_model(network).state_dict(), image_size=image_size,
        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), epoch=1, valid_dice=0.0,
    )


def seconds_after_loading(argv: list[str]) -> float:
    """inference.main(argv), timed from the moment its model is loaded to the last file written."""
    loaded_at = []
    real_load = inference.load_for_eval

    def load_and_note(args):
        predictor = real_load(args)
        loaded_at.append(time.perf_counter())
        return predictor

    inference.load_for_eval = load_and_note
    try:
        inference.main(argv)
    finally:
        inference.load_for_eval = real_load
    return time.perf_counter() - loaded_at[0]


def tree_memory_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants: shared pages are counted once in all."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:  # it ended meanwhile
            continue
        total += next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
        pending += [int(child) for child in children]
    return total


def peak_memory_of(command: list[str]) -> tuple[int, float]:
    """Run `command`; return the peak memory of its process tree and the seconds it took."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_memory_bytes(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors[-2000:]}")
    return peak[0], time.perf_counter() - start


def seconds_per_size(model: Path, folder: Path, repeats: int) -> list[str]:
    """Table rows: each photo size predicted `repeats` times (the best kept: other work only adds time),
    after one small photo has warmed up what a first prediction pays for once."""
    write_photo(folder / "warm_up.jpg", 400, 300)
    seconds_after_loading(["-m", str(model), "--input", str(folder / "warm_up.jpg"), "--output", str(folder / "warm"),
                           "--device", "cpu"])
    rows = []
    for megapixels, (width, height) in SIZES.items():
        photo = folder / f"photo_{megapixels}mp.jpg"
        write_photo(photo, width, height)
        output = folder / f"out{megapixels}"
        argv = ["-m", str(model), "--input", str(photo), "--output", str(output), "--device", "cpu", "--overwrite"]
        seconds = min(seconds_after_loading(argv) for _ in range(repeats))
        rows.append(f"| {megapixels} MP ({height}×{width} upright) | {seconds:.2f} | {seconds / megapixels:.3f} |")
    return rows


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--network", default="resnet34_unet", choices=MODEL_NAMES, help="the checkpoint's model")
    parser.add_argument("--image-size", type=int, default=64, help="the checkpoint's input size")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each photo size; the fastest is reported")
    parser.add_argument(
        "--folder-photos", type=int, default=4, help="48 MP photos in the folder whose peak memory is measured"
    )
    parser.add_argument("--record", action="store_true", help="append the results, dated, to docs/BENCHMARKS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="petseg-photo-speed-") as tmp:
        tmp = Path(tmp)
        model = tmp / "best.pt"
        write_checkpoint(model, args.network, args.image_size)
        rows = seconds_per_size(model, tmp, args.repeats)
        folder = tmp / "folder"
        folder.mkdir()
        for index in range(args.folder_photos):
            shutil.copy(tmp / "photo_48mp.jpg", folder / f"photo_{index}.jpg")
        command = [sys.executable, str(REPO_ROOT / "src" / "inference.py"), "-m", str(model), "--input", str(folder),
                   "--device", "cpu", "--overwrite", "--output", str(tmp / "folder-out")]
        peak, folder_seconds = peak_memory_of(command)
        # -b 1 keeps every worker decoding a photo while the main process draws one, as a folder of more than
        # two default batches does: the most photos in memory at once.
        busiest, busiest_seconds = peak_memory_of([*command, "-b", "1"])
    report = (
        f"## {datetime.now():%Y-%m-%d %H:%M} — users' photos: {args.network} at {args.image_size}², CPU\n\n"
        f"```\npython benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}\n```\n\n"
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, default --num-workers; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (work of others on the machine adds time). "
        f"Best of {args.repeats} runs per size.\n\n"
        "| photo | seconds, model loaded to mask and overlay written | seconds per megapixel |\n|---|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nA folder of {args.folder_photos} photos of 48 MP, `inference.py` at its default --num-workers, "
        "peak memory of all its processes (and the seconds in all, the model's load included): at the default "
        f"-b {peak / 2**30:.2f} GiB ({folder_seconds:.0f} s); at -b 1, every worker decoding a photo while the "
        f"main process draws another, as a folder of more than two default batches does, {busiest / 2**30:.2f} GiB "
        f"({busiest_seconds:.0f} s).\n"
    )
    print("\n" + report)
    if args.record:
        with open(REPO_ROOT / "docs" / "BENCHMARKS.md", "a") as file:
            file.write("\n" + report)
        print("Appended to docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
