"""The stages of gpu_check.py, each run by it as a process of its own (a stage that hangs or crashes
cannot take the report with it), writing its part of the report to --section as it goes:

    python benchmarks/gpu_stages.py STAGE --section FILE --log FILE --seconds S [--smoke] [--sample DIR] \
        [--runs-dir DIR]

STAGE is platform, syncs, throughput, torchrun or study; `interrupted-train TRAIN_FLAGS` is the
worker stage 4 hands to torchrun. --smoke runs every stage on the CPU at toy sizes.
"""

from __future__ import annotations

import csv
import json
import os
import platform as python_platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"
sys.path[:0] = [str(SRC), str(REPO_ROOT / "tools"), str(REPO_ROOT / "benchmarks")]

import torch  # noqa: E402

import recipe_study  # noqa: E402
from cli import argument_parser  # noqa: E402
from deadline import GRACE_SECONDS, run_until  # noqa: E402
from errors import display_path, run_script  # noqa: E402
from files import atomic_write  # noqa: E402
from make_synthetic_pets import make_synthetic_pets  # noqa: E402

TRAIN = SRC / "train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
# The training loop's sync budget (the issue's, and tests/test_gpu_path.py's on the CPU): at most one per
# this many steps, plus three per epoch (its last read and its totals).
STEPS_PER_SYNC, SYNCS_PER_EPOCH = 25, 3
# The README's candidates from the CPU study, after the defaults of both networks.
CANDIDATES = ("lr3e-3=-lr 3e-3", "batch16=-b 16", "wide-decoder=--decoder-channels 256 128 64 64 32",
              "full-res-skip=--full-res-skip")
# What the code needs besides torch, torchvision and the standard library (and the suite, pytest): a GPU
# machine without a package registry must already have them.
PACKAGES = ("numpy", "pillow", "matplotlib", "tqdm", "pytest")
STUDY_SEEDS = 3  # as many as fit, up to the README's three
FIRST_RUN_SECONDS = 60  # a study run with no earlier one of its network to go by is started with this much left


@dataclass
class Context:
    section: Path
    log: Path  # the stage's log, which its own output goes to as well
    deadline: float  # time.monotonic() by which the stage reports, a little before gpu_check stops it
    smoke: bool
    sample: Path | None
    runs_dir: Path | None

    @property
    def device_flags(self) -> list[str]:
        return ["--device", "cpu"] if self.smoke else []

    @property
    def cuda(self) -> bool:
        return not self.smoke and torch.cuda.is_available()

    def write(self, lines: list[str]) -> None:
        with atomic_write(self.section, "w") as file:
            file.write("\n".join(lines) + "\n")


def table(columns: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows
    ]


def run_logged(ctx: Context, command: list[str], **kwargs) -> tuple[int | None, str, float]:
    """run_until the stage's deadline, its output going straight into the stage's log (so that it is
    there even if the stage is killed). Returns (exit code or None when stopped, its output, seconds)."""
    with open(ctx.log, "ab") as log:
        log.write(f"\n$ {' '.join(map(str, command))}\n".encode())
        offset = log.tell()
    start = time.monotonic()
    code = run_until(command, ctx.deadline, ctx.log, **kwargs)
    with open(ctx.log, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return code, text, time.monotonic() - start


def tail(text: str, lines: int = 15) -> list[str]:
    return ["```", *text.rstrip().splitlines()[-lines:], "```"]


# ----------------------------------------------------------------------------- 1. platform


def gpu_rows() -> list[list[object]]:
    if not torch.cuda.is_available():
        return [["GPU", "none: torch sees no CUDA device"]]
    rows: list[list[object]] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append([f"GPU {index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                     f"{props.multi_processor_count} SMs"])
    major, minor = torch.cuda.get_device_capability(0)
    arch_list = torch.cuda.get_arch_list()
    built = f"sm_{major}{minor}" in arch_list
    try:
        nccl = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError) as error:  # a build without NCCL: stage 4 will say more
        nccl = f"unavailable ({error})"
    rows += [
        ["capability", f"sm_{major}{minor}"],
        ["the wheel's arch list", " ".join(arch_list)],
        ["capability in the arch list", "yes" if built else "no: kernels only from PTX JIT, if the list has it"],
        ["native bf16", torch.cuda.is_bf16_supported(including_emulation=False)],
        ["NCCL", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl],
    ]
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        rows.append(["driver", driver.splitlines()[0] if driver else "unknown"])
    return rows


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "**missing**"


def platform(ctx: Context) -> None:
    import torchvision

    rows = [
        ["Python", python_platform.python_version()],
        ["torch", torch.__version__],  # with its build tag (+cu128), which the package metadata leaves out
        ["torchvision", torchvision.__version__],
        *([package, installed(package)] for package in PACKAGES),
        ["CUDA of the torch build", torch.version.cuda or "none (a CPU build)"],
        ["cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"],
        ["CPU cores", os.cpu_count()],
        *gpu_rows(),
    ]
    lines = table(["what", "value"], rows)
    ctx.write(lines + ["", "The suite's CUDA-only tests (`pytest -m cuda`): running."])
    if installed("pytest").startswith("**"):
        ctx.write(lines + ["", "The suite's CUDA-only tests: **not run**, pytest is not installed here."])
        return
    # Only the files that mark a test `cuda` are collected: the rest of the suite would be deselected anyway.
    marked = sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tests").glob("test_*.py")
                    if "mark.cuda" in path.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *marked]
    code, text, seconds = run_logged(ctx, command, cwd=REPO_ROOT)
    summaries = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)\s*=*$", text, re.MULTILINE)
    summary = summaries[-1] if summaries else "no summary line"
    verdict = {0: "pass", 5: "none selected: no test is marked `cuda`", None: "stopped at the stage's limit"}
    lines += ["", f"The suite's CUDA-only tests (`pytest -m cuda {' '.join(marked)}`): **{verdict.get(code, 'FAIL')}** "
                  f"(exit code {code}, {seconds:.0f} s): {summary}."]
    if code not in (0, 5):
        lines += tail(text, 30)
    ctx.write(lines)


# ----------------------------------------------------------------------------- 2. syncs per step


class StepSyncs:
    """Syncs made inside train.train_one_epoch, and the steps they were made in: on CUDA every one
    torch's sync debug mode warns of; on the CPU the calls of src/ that would sync (HostSyncCounter)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps = self.epochs = self.syncs = self.transfers = 0
        self.sites: Counter[str] = Counter()

    def wrap(self, train_one_epoch: Callable) -> Callable:
        def counted(model: object, loader: Sized, *args: object, **kwargs: object) -> dict[str, float]:
            with self.counting():
                result = train_one_epoch(model, loader, *args, **kwargs)
            self.steps += len(loader)
            self.epochs += 1
            return result

        return counted

    @contextmanager
    def counting(self) -> Iterator[None]:
        if not self.cuda:
            from host_syncs import HostSyncCounter

            with HostSyncCounter([SRC]) as counter:
                yield
            self.syncs += counter.syncs
            self.transfers += counter.transfers
            self.sites.update({site: n for site, n in counter.sites.items() if site.endswith("(sync)")})
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            if "synchronizing" in str(warning.message):
                self.syncs += 1
                self.sites[f"{Path(warning.filename).name}:{warning.lineno}"] += 1

    def budget(self) -> float:
        return self.steps / STEPS_PER_SYNC + SYNCS_PER_EPOCH * self.epochs


def syncs(ctx: Context) -> None:
    import train

    counter = StepSyncs(ctx.cuda)
    # On a GPU, epochs long enough (90 steps) that the per-epoch reads do not hide the per-step ones.
    n_images, size, epochs = (12, 32, 1) if ctx.smoke else (400, 64, 2)
    with tempfile.TemporaryDirectory() as scratch:
        data = make_synthetic_pets(Path(scratch) / "pets", n_trainval=n_images, n_test=4)
        train.train_one_epoch = counter.wrap(train.train_one_epoch)
        train.main([
            "--data_path", str(data), "-e", str(epochs), "-b", "4", "--image-size", str(size), "--num-workers", "0",
            "--save-dir", str(Path(scratch) / "runs"), "--run-name", "syncs",
            "--cache-dir", str(Path(scratch) / "cache"), *ctx.device_flags,
        ])
    how = "torch.cuda.set_sync_debug_mode('warn')" if ctx.cuda else "tools/host_syncs.py (src/'s calls that would sync)"
    within = counter.syncs <= counter.budget()
    lines = [
        f"`train.py` on {n_images} synthetic images at {size}², batch 4, {counter.steps} steps over "
        f"{counter.epochs} epoch(s), on {'cuda' if ctx.cuda else 'the CPU'}; syncs counted "
        f"inside train_one_epoch with {how}.", "",
        *table(
            ["syncs", "steps", "syncs per step", f"budget: 1 per {STEPS_PER_SYNC} steps + {SYNCS_PER_EPOCH} per epoch",
             "verdict"],
            [[counter.syncs, counter.steps, f"{counter.syncs / max(counter.steps, 1):.2f}", f"{counter.budget():.1f}",
              "**within budget**" if within else "**over budget**"]],
        ),
    ]
    if not ctx.cuda:
        lines += ["", f"Copies onto the device (transfers) made there besides: {counter.transfers}."]
    lines += ["", "Where (file:line, count):", "", *table(["site", "syncs"], counter.sites.most_common(12))]
    ctx.write(lines)


# ----------------------------------------------------------------------------- 3. throughput


def throughput(ctx: Context) -> None:
    import throughput as benchmark

    argv = ["--no-record", "--report-to", str(ctx.section)]
    if ctx.sample is not None:
        argv += ["--data-path", str(ctx.sample)]
    if ctx.smoke:
        # One network: the other runs the same code, and a UNet step costs a second even at 32² on a CPU.
        argv += ["--device", "cpu", "--image-size", "32", "--n-images", "12", "-b", "4", "--steps", "1",
                 "--warmup-steps", "0", "--models", "resnet34_unet"]
    benchmark.main(argv)


# ----------------------------------------------------------------------------- 4. torchrun


def interrupted_train(argv: list[str]) -> None:
    """train.py, stopped as by Ctrl-C when its second epoch starts, the first one saved: a run for
    stage 4 to resume. It says which backend its process group runs."""
    import torch.distributed as dist

    import train

    real_epoch, calls = train.train_one_epoch, []

    def first_epoch_only(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        print(f"process group backend: {dist.get_backend() if dist.is_initialized() else 'none'}", flush=True)
        return real_epoch(*args, **kwargs)

    train.train_one_epoch = first_epoch_only
    run_script(lambda: train.main(argv))


def torchrun(ctx: Context) -> None:
    size, batch = (32, 8) if ctx.smoke else (64, 4)
    with tempfile.TemporaryDirectory() as scratch:
        data = make_synthetic_pets(Path(scratch) / "pets", n_trainval=12, n_test=4)
        run_dir = Path(scratch) / "runs" / "torchrun"
        flags = ["--data_path", str(data), "-e", "2", "-b", str(batch), "--image-size", str(size), "--num-workers", "0",
                 "--save-dir", str(run_dir.parent), "--run-name", run_dir.name,
                 "--cache-dir", str(Path(scratch) / "cache"), *ctx.device_flags]
        first, first_text, first_seconds = run_logged(ctx, [*TORCHRUN, __file__, "interrupted-train", *flags])
        backend = re.search(r"process group backend: (\w+)", first_text)
        saved = (run_dir / "last.pt").exists() and "--nproc_per_node=1" in first_text and "--resume" in first_text
        rows = [["1: train, stopped by Ctrl-C as epoch 2 starts", first, f"{first_seconds:.0f}",
                 f"backend {backend.group(1) if backend else 'unknown'}; "
                 + ("last.pt saved, torchrun resume command printed" if saved else "**no last.pt or resume command**")]]
        resumed, text, seconds = (None, "", 0.0)
        if saved:
            resumed, text, seconds = run_logged(ctx, [*TORCHRUN, str(TRAIN), "--resume", str(run_dir)])
        results = run_dir / "results.json"
        finished = resumed == 0 and results.exists()
        dice = f"test Dice {json.loads(results.read_text())['test']['dice']:.4f}" if finished else "no results.json"
        rows.append(["2: `--resume` the run folder", resumed, f"{seconds:.0f}", f"epoch 2 trained; {dice}"])
    verdict = "**pass**: one epoch, resume, exit 0" if finished else "**FAIL**"
    lines = [f"`torchrun --standalone --nproc_per_node=1 src/train.py` on 12 synthetic images at {size}², "
             f"batch {batch}, 2 epochs, {'gloo on the CPU' if ctx.smoke else 'NCCL on the GPU'}: {verdict}.", "",
             *table(["run", "exit code", "seconds", "what it showed"], rows)]
    if not finished:
        lines += tail(text or first_text, 30)
    ctx.write(lines)


# ----------------------------------------------------------------------------- 5. recipe study


def study_plan(smoke: bool) -> list[tuple[int, str, recipe_study.Variant]]:
    """(seed, network, variant) in the order they run: the defaults of both networks, then the
    candidates (ResNet34-UNet's: the study that found them, and two only it has), seed after seed."""
    default = recipe_study.variant("default=")
    if smoke:
        return [(0, "resnet34_unet", default), (0, "unet", default)]
    per_seed = [("resnet34_unet", default), ("unet", default)]
    per_seed += [("resnet34_unet", recipe_study.variant(text)) for text in CANDIDATES]
    return [(seed, network, var) for seed in range(STUDY_SEEDS) for network, var in per_seed]


def study(ctx: Context) -> None:
    size, epochs = (32, 1) if ctx.smoke else (256, 200)
    train_flags = "--device cpu --num-workers 0 -b 8" if ctx.smoke else ""
    plan = study_plan(ctx.smoke)
    results: dict[str, dict[str, list[dict]]] = {}
    seconds_per_run: dict[str, float] = {}
    notes: list[str] = []
    for seed, network, var in plan:
        name = f"{network} {recipe_study.run_name(var, seed)}"
        if ctx.deadline - time.monotonic() < seconds_per_run.get(network, FIRST_RUN_SECONDS):
            notes.append(f"- {name}: not started, too little time left")
            continue
        save_dir = ctx.runs_dir / network
        common = recipe_study.study_flags(network, epochs, size, ctx.sample, train_flags)
        command = recipe_study.run_command(common, var, seed, save_dir)
        code, text, seconds = run_logged(ctx, command)
        run_dir = save_dir / recipe_study.run_name(var, seed)
        if code == 0:
            results.setdefault(network, {}).setdefault(var.name, []).append(
                json.loads((run_dir / "results.json").read_text())
            )
            seconds_per_run[network] = seconds
        elif code is None:
            notes.append(f"- {name}: stopped at the deadline, {progress(run_dir, epochs)}; continue it with "
                         f"`python src/train.py --resume {display_path(run_dir)}`")
        else:
            notes += [f"- {name}: **failed** (exit code {code}):", *tail(text)]
        ctx.write(study_report(plan, results, notes, size, epochs, train_flags))


def progress(run_dir: Path, epochs: int) -> str:
    """How far a run that was stopped had come, from its history.csv."""
    history = run_dir / "history.csv"
    rows = list(csv.DictReader(history.read_text().splitlines())) if history.exists() else []
    if not rows:
        return "before its first epoch ended"
    best = max(rows, key=lambda row: float(row["valid_dice"]))
    seconds = sum(float(row["seconds"]) for row in rows) / len(rows)
    return (f"after epoch {len(rows)}/{epochs} ({seconds:.1f} s an epoch), best valid Dice "
            f"{float(best['valid_dice']):.4f} at epoch {best['epoch']}")


def study_report(plan: list, results: dict, notes: list[str], size: int, epochs: int, train_flags: str) -> list[str]:
    lines = [f"`benchmarks/recipe_study.py`'s runs (`python src/train.py`) on the sample at {size}², {epochs} "
             f"epoch(s){', flags ' + repr(train_flags) if train_flags else ''}: the defaults of both networks, then "
             f"the README's candidates, seed after seed, as many as fit. Mean ± standard deviation over the seeds "
             "that finished."]
    for network in dict.fromkeys(network for _, network, _ in plan):
        variants = list({var.name: var for _, net, var in plan if net == network and var.name in
                         results.get(network, {})}.values())
        if variants:
            lines += ["", f"**{network}**", "", *recipe_study.table(variants, results[network])]
    finished = sum(len(runs) for by_variant in results.values() for runs in by_variant.values())
    lines += ["", f"{finished} of {len(plan)} planned runs finished.", *notes]
    return lines


STAGES = {"platform": platform, "syncs": syncs, "throughput": throughput, "torchrun": torchrun, "study": study}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["interrupted-train"]:
        interrupted_train(argv[1:])
        return
    parser = argument_parser("Run one stage of gpu_check.py, writing its part of the report.")
    parser.add_argument("stage", choices=STAGES, help="which stage to run")
    parser.add_argument("--section", type=Path, required=True, help="the markdown file this stage writes")
    parser.add_argument("--log", type=Path, required=True, help="the stage's log, which its commands' output joins")
    parser.add_argument("--seconds", type=float, required=True, help="the stage's time limit")
    parser.add_argument("--smoke", action="store_true", help="on the CPU, at toy sizes")
    parser.add_argument("--sample", type=Path, default=None, help="the real sample's folder")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the study's runs go")
    args = parser.parse_args(argv)
    if args.stage == "study" and (args.sample is None or args.runs_dir is None):
        parser.error("the study stage needs --sample (the real sample's folder) and --runs-dir.")
    # Time to report before gpu_check stops the stage: a child's Ctrl-C grace period, and writing.
    margin = min(GRACE_SECONDS + 5.0, 0.5 * args.seconds)
    ctx = Context(
        args.section, args.log, time.monotonic() + args.seconds - margin, args.smoke, args.sample, args.runs_dir
    )
    STAGES[args.stage](ctx)


if __name__ == "__main__":
    run_script(main)
