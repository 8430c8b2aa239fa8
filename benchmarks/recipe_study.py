"""Which recipe trains the best model: named variants of train.py's flags, each trained with several
seeds through train.py itself (so it measures what users run), in one table of mean ± spread.

    python benchmarks/recipe_study.py --data_path ../shared/oxford-iiit-pet-sample --image-size 96 -e 16 \\
        --seeds 0 1 --variant default= --variant batch16="-b 16"

Every run is `python src/train.py` with the common flags, the variant's flags and `--seed`, in its own
folder `VARIANT-seedS` under --save-dir; a folder that already holds a finished run is read, not
trained again, so an interrupted study continues where it stopped. Prints one markdown table and
appends it, dated, with the command and the device, to docs/BENCHMARKS.md (--no-record to skip).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src")]

from cli import argument_parser  # noqa: E402
from errors import PetsegError, display_path, run_script  # noqa: E402

TRAIN = REPO_ROOT / "src" / "train.py"


@dataclass
class Variant:
    name: str
    flags: list[str]


def variant(text: str) -> Variant:
    """NAME=FLAGS, e.g. `batch16=-b 16`; `default=` is train.py's defaults."""
    name, separator, flags = text.partition("=")
    if not separator or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=FLAGS (e.g. batch16='-b 16'), got {text!r}")
    return Variant(name, shlex.split(flags))


def train_once(run_dir: Path, command: list[str]) -> dict:
    """results.json of the run in run_dir, training it first unless it has finished before; a run stopped
    after an epoch (its last.pt is there) is resumed, since train.py never reuses a folder for a new run."""
    results = run_dir / "results.json"
    if not results.exists():
        if (run_dir / "last.pt").exists():
            command = [*command, "--resume", str(run_dir)]
        elif run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # stopped before its first epoch ended: nothing to keep
        elif run_dir.exists():
            raise PetsegError(
                f"{display_path(run_dir)} holds an unfinished run without a last.pt to resume from; move it away "
                "and run the study again."
            )
        print(f"$ {shlex.join(command)}", flush=True)
        finished = subprocess.run(command, stdout=subprocess.DEVNULL)
        if finished.returncode != 0:
            raise PetsegError(f"the run {display_path(run_dir)} failed (exit code {finished.returncode}); see above.")
    return json.loads(results.read_text())


def study_flags(
    network: str, epochs: int, image_size: int, data_path: Path | None, train_flags: str = ""
) -> list[str]:
    """train.py's flags that every run of a study shares."""
    common = ["-n", network, "-e", str(epochs), "--image-size", str(image_size)]
    if data_path is not None:
        common += ["--data_path", str(data_path)]
    return common + shlex.split(train_flags)


def run_name(var: Variant, seed: int) -> str:
    return f"{var.name}-seed{seed}"


def run_command(common: list[str], var: Variant, seed: int, save_dir: Path) -> list[str]:
    """The train.py command of one run: the shared flags, the variant's, its seed and its own folder."""
    return [
        sys.executable, str(TRAIN), *common, *var.flags, "--seed", str(seed),
        "--save-dir", str(save_dir), "--run-name", run_name(var, seed),
    ]


def mean_and_spread(values: list[float], digits: int = 4) -> str:
    """mean ± standard deviation over seeds (the mean alone for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(variants: list[Variant], results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| variant | flags | seeds | best valid Dice | test Dice (lab: at model size) | test Dice at original size "
        "| best epoch | minutes per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for var in variants:
        runs = results[var.name]
        lines.append(
            f"| {var.name} | `{shlex.join(var.flags) or '(defaults)'}` | {len(runs)} "
            f"| {mean_and_spread([run['valid_dice'] for run in runs])} "
            f"| {mean_and_spread([run['test']['dice'] for run in runs])} "
            f"| {mean_and_spread([run['test']['dice_original'] for run in runs])} "
            f"| {mean_and_spread([run['best_epoch'] for run in runs], 1)} "
            f"| {mean_and_spread([run['train_seconds'] / 60 for run in runs], 1)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("Train named variants of train.py's flags over several seeds and tabulate their Dice.")
    parser.add_argument(
        "--variant", type=variant, action="append", required=True,
        help="NAME=FLAGS: a variant of train.py's flags, e.g. --variant default= --variant batch16='-b 16'; "
        "give one per variant",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds each variant is trained with")
    parser.add_argument(
        "--data_path", "--data-path", type=Path, default=None,
        help="dataset folder holding images/ and annotations/ (default: train.py's)",
    )
    parser.add_argument("-n", "--network", default="resnet34_unet", help="architecture, as train.py's -n")
    parser.add_argument("-e", "--epochs", type=int, default=200, help="epochs of every run")
    parser.add_argument("--image-size", type=int, default=256, help="image size of every run")
    parser.add_argument(
        "--train-flags", default="",
        help="further flags for every run, e.g. '--device cpu --num-workers 1'",
    )
    parser.add_argument(
        "--save-dir", type=Path, default=REPO_ROOT / "saved_models" / "study",
        help="where the runs' folders go (a finished run found there is reused)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to the record file")
    parser.add_argument(
        "--record-to", type=Path, default=REPO_ROOT / "docs" / "BENCHMARKS.md",
        help="the file the table is appended to",
    )
    args = parser.parse_args(argv)
    names = [var.name for var in args.variant]
    if len(set(names)) != len(names):
        parser.error(f"--variant names must differ, got {names}")

    common = study_flags(args.network, args.epochs, args.image_size, args.data_path, args.train_flags)
    results: dict[str, list[dict]] = {}
    for var in args.variant:
        results[var.name] = []
        for seed in args.seeds:
            command = run_command(common, var, seed, args.save_dir)
            results[var.name].append(train_once(args.save_dir / run_name(var, seed), command))

    lines = table(args.variant, results)
    print("\n".join(lines))
    if args.no_record:
        return
    command = shlex.join(["python", f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
    device = results[names[0]][0]["args"].get("device", "auto")
    report = (
        f"\n## {datetime.now():%Y-%m-%d %H:%M} — recipe study: {args.network}, {args.image_size}², "
        f"{args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}\n\n```\n{command}\n```\n\n"
        f"--device {device}; mean ± standard deviation over the seeds. Differences inside the spread are no "
        "difference.\n\n" + "\n".join(lines) + "\n"
    )
    with open(args.record_to, "a") as file:
        file.write(report)
    print(f"Appended to {display_path(args.record_to)}")


if __name__ == "__main__":
    run_script(main)
