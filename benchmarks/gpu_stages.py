"""The stages of gpu_check.py, each run by it as a process of its own (a stage that hangs or crashes
cannot take the report with it), writing its part of the report to --section as it goes and its
outcome (ok, fail or skipped, and why) to --outcome at the end:

    python benchmarks/gpu_stages.py STAGE --section FILE --log FILE --seconds S [--outcome FILE] [--smoke] \
        [--sample DIR] [--runs-dir DIR] [--measured FILE]

STAGE is platform, syncs, determinism, torchrun, bookkeeping, throughput or sample; `interrupted-train
TRAIN_FLAGS` is the worker the torchrun stage hands to torchrun. --measured is the JSON the bookkeeping
stage writes (its seconds per step and per write) and the sample stage plans its epochs by. --smoke runs
every stage on the CPU at toy sizes.
"""

from __future__ import annotations

import csv
import json
import os
import platform as python_platform
import re
import shlex
import shutil
import statistics
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

from cli import argument_parser  # noqa: E402
from deadline import run_until  # noqa: E402
from errors import display_path, run_script  # noqa: E402
from files import atomic_write  # noqa: E402
from make_synthetic_pets import make_synthetic_pets  # noqa: E402

TRAIN = SRC / "train.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
# The training loop's sync budget (the issue's, and tests/test_gpu_path.py's on the CPU): at most one per
# this many steps, plus one per epoch (its totals, read with its last check for a diverged loss).
STEPS_PER_SYNC, SYNCS_PER_EPOCH = 25, 1
# What the code needs besides torch, torchvision and the standard library (and the suite, pytest): a GPU
# machine without a package registry must already have them.
PACKAGES = ("numpy", "pillow", "matplotlib", "tqdm", "pytest")
# A command stopped at the stage's deadline gets Ctrl-C, then this long before it is killed: train.py
# leaves within a second or two (an epoch's files being written finish first).
STOP_GRACE = 8.0
# The sample stage: train.py's start (imports, CUDA, the sample's cache, cuDNN's choices) and its test pass,
# besides the epochs; and the epochs a network is given when no measured speed is at hand.
SAMPLE_OVERHEAD_SECONDS = 35.0
UNMEASURED_EPOCHS = 10


@dataclass
class Context:
    section: Path
    log: Path  # the stage's log, which its own output goes to as well
    deadline: float  # time.monotonic() by which the stage reports, a little before gpu_check stops it
    smoke: bool
    sample: Path | None
    runs_dir: Path | None
    measured: Path | None = None  # the bookkeeping stage's JSON
    outcome: Path | None = None  # where conclude() writes the stage's verdict

    @property
    def device_flags(self) -> list[str]:
        return ["--device", "cpu"] if self.smoke else []

    @property
    def cuda(self) -> bool:
        return not self.smoke and torch.cuda.is_available()

    def write(self, lines: list[str]) -> None:
        with atomic_write(self.section, "w") as file:
            file.write("\n".join(lines) + "\n")

    def conclude(self, outcome: str, summary: str) -> None:
        """The stage's verdict for gpu_check's table: ok, fail or skipped, and a line saying why."""
        if self.outcome is not None:
            with atomic_write(self.outcome, "w") as file:
                file.write(f"{outcome}: {summary}\n")


def table(columns: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows
    ]


def run_logged(
    ctx: Context, command: list[str], deadline: float | None = None, **kwargs
) -> tuple[int | None, str, float]:
    """run_until the stage's deadline (or an earlier one), its output going straight into the stage's log (so
    that it is there even if the stage is killed). Returns (exit code or None when stopped, its output, seconds)."""
    with open(ctx.log, "ab") as log:
        log.write(f"\n$ {shlex.join(map(str, command))}\n".encode())
        offset = log.tell()
    start = time.monotonic()
    until = ctx.deadline if deadline is None else min(deadline, ctx.deadline)
    code = run_until(command, until, ctx.log, grace=STOP_GRACE, **kwargs)
    with open(ctx.log, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return code, text, time.monotonic() - start


def tail(text: str, lines: int = 15) -> list[str]:
    # Progress bars redraw with carriage returns: keep each line's last state.
    return ["```", *(line.rsplit("\r", 1)[-1] for line in text.rstrip().splitlines()[-lines:]), "```"]


def shown(command: list[str]) -> str:
    """A command as the report shows it: the repository's scripts by their path in it, python as `python`."""
    parts = ["python" if part == sys.executable else display_path(Path(part)) if os.path.isabs(part) else part
             for part in map(str, command)]
    return f"`{shlex.join(parts)}`"


# ----------------------------------------------------------------------------- 1. platform


def gpu_rows() -> tuple[list[list[object]], str | None]:
    """The GPU's rows, and what stops this code running on it (None when nothing does)."""
    if not torch.cuda.is_available():
        return [["GPU", "none: torch sees no CUDA device"]], "torch sees no CUDA device"
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
    except (AttributeError, RuntimeError) as error:  # a build without NCCL: the torchrun stage will say more
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
    return rows, None


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "**missing**"


def platform(ctx: Context) -> None:
    import torchvision

    gpu, problem = gpu_rows()
    rows = [
        ["Python", python_platform.python_version()],
        ["torch", torch.__version__],  # with its build tag (+cu128), which the package metadata leaves out
        ["torchvision", torchvision.__version__],
        *([package, installed(package)] for package in PACKAGES),
        ["CUDA of the torch build", torch.version.cuda or "none (a CPU build)"],
        ["cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"],
        ["CPU cores", os.cpu_count()],
        *gpu,
    ]
    lines = table(["what", "value"], rows)
    if installed("pytest").startswith("**"):
        ctx.write(lines + ["", "The suite's CUDA-only tests: **not run**, pytest is not installed here."])
        ctx.conclude("fail" if problem and not ctx.smoke else "skipped", problem or "pytest is not installed")
        return
    ctx.write(lines + ["", "The suite's CUDA-only tests (`pytest -m cuda`): running."])
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
    if code != 0:
        ctx.conclude("fail", f"pytest -m cuda: {verdict.get(code, 'FAIL')} ({summary})")
    elif problem and not ctx.smoke:
        ctx.conclude("fail", problem)
    else:
        ctx.conclude("ok", f"versions read; pytest -m cuda: {summary}")


# ----------------------------------------------------------------------------- 2. syncs per step


class StepSyncs:
    """Syncs made inside train.train_one_epoch, and the steps they were made in: on CUDA every one
    torch's sync debug mode warns of; on the CPU the calls of src/ that would sync (HostSyncCounter)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps = self.epochs = self.syncs = self.transfers = 0
        self.sites: Counter[str] = Counter()

    def wrap(self, train_one_epoch: Callable, after: Callable[[], object] | None = None) -> Callable:
        """train_one_epoch, counted; `after` is called when each epoch is counted."""

        def counted(model: object, loader: Sized, *args: object, **kwargs: object) -> dict[str, float]:
            with self.counting():
                result = train_one_epoch(model, loader, *args, **kwargs)
            self.steps += len(loader)
            self.epochs += 1
            if after is not None:
                after()
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

    def within(self) -> bool:
        return self.syncs <= self.budget()

    def lines(self) -> list[str]:
        """The count so far: a table, and where the syncs were made."""
        counted = table(
            ["syncs", "steps", "syncs per step", f"budget: 1 per {STEPS_PER_SYNC} steps + {SYNCS_PER_EPOCH} per epoch",
             "verdict"],
            [[self.syncs, self.steps, f"{self.syncs / max(self.steps, 1):.2f}", f"{self.budget():.1f}",
              "**within budget**" if self.within() else "**over budget**"]],
        )
        if not self.cuda:
            counted += ["", f"Copies onto the device (transfers) made there besides: {self.transfers}."]
        return counted + ["", "Where (file:line, count):", "", *table(["site", "syncs"], self.sites.most_common(12))]


def syncs(ctx: Context) -> None:
    import train

    counter = StepSyncs(ctx.cuda)
    # On a GPU, epochs long enough (90 steps) that the per-epoch reads do not hide the per-step ones.
    n_images, size, epochs = (12, 32, 1) if ctx.smoke else (400, 64, 2)
    how = "torch.cuda.set_sync_debug_mode('warn')" if ctx.cuda else "tools/host_syncs.py (src/'s calls that would sync)"
    intro = (f"`train.py` on {n_images} synthetic images at {size}², batch 4, {epochs} epoch(s), on "
             f"{'cuda' if ctx.cuda else 'the CPU'}; syncs counted inside train_one_epoch with {how}.")
    ctx.write([intro, "", "Running: no epoch counted yet."])
    with tempfile.TemporaryDirectory() as scratch:
        data = make_synthetic_pets(Path(scratch) / "pets", n_trainval=n_images, n_test=4)
        train.train_one_epoch = counter.wrap(
            train.train_one_epoch, after=lambda: ctx.write([intro, "", f"After epoch {counter.epochs}:", "",
                                                            *counter.lines()])
        )
        train.main([
            "--data_path", str(data), "-e", str(epochs), "-b", "4", "--image-size", str(size), "--num-workers", "0",
            "--save-dir", str(Path(scratch) / "runs"), "--run-name", "syncs",
            "--cache-dir", str(Path(scratch) / "cache"), *ctx.device_flags,
        ])
    ctx.write([intro, "", *counter.lines()])
    ctx.conclude("ok" if counter.within() else "fail",
                 f"{counter.syncs} syncs in {counter.steps} steps, budget {counter.budget():.1f}")


# ----------------------------------------------------------------------------- 3. determinism


def weight_differences(first: Path, second: Path) -> list[str]:
    """Names of the tensors in which two checkpoints' weights differ (shape or any bit)."""
    import checkpoint as ckpt

    a, b = (ckpt.load_checkpoint(path)["model_state"] for path in (first, second))
    return [name for name in a if name not in b or a[name].shape != b[name].shape or not torch.equal(a[name], b[name])]


def determinism(ctx: Context) -> None:
    """Two train.py --deterministic runs of one command (deep supervision on, so both bilinear paths
    train), each a process of its own; their final weights must be equal bit for bit."""
    n_images, size, epochs, batch = (8, 32, 1, 4) if ctx.smoke else (72, 64, 2, 8)
    with tempfile.TemporaryDirectory() as scratch:
        data = make_synthetic_pets(Path(scratch) / "pets", n_trainval=n_images, n_test=4)
        runs = Path(scratch) / "runs"
        recipe = ["-n", "resnet34_unet", "--deep-supervision", "--deterministic", "-e", str(epochs), "-b", str(batch),
                  "--image-size", str(size), "--num-workers", "0", *ctx.device_flags]
        cache = Path(scratch) / "cache"
        flags = [*recipe, "--data_path", str(data), "--save-dir", str(runs), "--cache-dir", str(cache)]
        intro = (f"Two runs of `python src/train.py {shlex.join(recipe)}` on {n_images} synthetic images (a temporary "
                 "folder), each a process of its own (`--run-name first`, `second`); their final weights (last.pt) "
                 "compared bit for bit.")
        rows: list[list[object]] = []
        for name in ("first", "second"):
            ctx.write([intro, "", *table(["run", "exit code", "seconds"], rows), "", f"Run {name}: running."])
            code, text, seconds = run_logged(ctx, [sys.executable, str(TRAIN), *flags, "--run-name", name])
            rows.append([name, code, f"{seconds:.0f}"])
            if code != 0:
                why = "stopped at the stage's limit" if code is None else f"exit code {code}"
                ctx.write([intro, "", *table(["run", "exit code", "seconds"], rows), "", f"Run {name}: **{why}**:",
                           *tail(text, 30)])
                ctx.conclude("fail", f"run {name}: {why}")
                return
        differing = weight_differences(runs / "first" / "last.pt", runs / "second" / "last.pt")
    verdict = ("**bit-equal**: every weight tensor" if not differing
               else f"**differ** in {len(differing)} tensor(s), the first: {', '.join(differing[:5])}")
    ctx.write([intro, "", *table(["run", "exit code", "seconds"], rows), "", f"Final weights: {verdict}."])
    ctx.conclude("fail" if differing else "ok",
                 f"weights differ in {len(differing)} tensor(s)" if differing else "two runs, bit-equal weights")


# ----------------------------------------------------------------------------- 4. torchrun


def interrupted_train(argv: list[str]) -> None:
    """train.py, stopped as by Ctrl-C when its second epoch starts, the first one saved: a run for
    the torchrun stage to resume. It says which backend its process group runs."""
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
    backend = "gloo on the CPU" if ctx.smoke else "NCCL on the GPU"
    intro = (f"`torchrun --standalone --nproc_per_node=1 src/train.py` on 12 synthetic images at {size}², batch "
             f"{batch}, 2 epochs, {backend}: the first launch stopped as by Ctrl-C when epoch 2 starts, the second "
             "`--resume`s the run folder")
    columns = ["run", "exit code", "seconds", "what it showed"]
    with tempfile.TemporaryDirectory() as scratch:
        data = make_synthetic_pets(Path(scratch) / "pets", n_trainval=12, n_test=4)
        run_dir = Path(scratch) / "runs" / "torchrun"
        flags = ["--data_path", str(data), "-e", "2", "-b", str(batch), "--image-size", str(size), "--num-workers", "0",
                 "--save-dir", str(run_dir.parent), "--run-name", run_dir.name,
                 "--cache-dir", str(Path(scratch) / "cache"), *ctx.device_flags]
        ctx.write([intro + ".", "", "Launch 1: running."])
        first, first_text, first_seconds = run_logged(ctx, [*TORCHRUN, __file__, "interrupted-train", *flags])
        found = re.search(r"process group backend: (\w+)", first_text)
        saved = (run_dir / "last.pt").exists() and "--nproc_per_node=1" in first_text and "--resume" in first_text
        rows = [["1: train, stopped by Ctrl-C as epoch 2 starts", first, f"{first_seconds:.0f}",
                 f"backend {found.group(1) if found else 'unknown'}; "
                 + ("last.pt saved, torchrun resume command printed" if saved else "**no last.pt or resume command**")]]
        resumed, text, seconds = (None, "", 0.0)
        if saved:
            ctx.write([intro + ".", "", *table(columns, rows), "", "Launch 2 (`--resume`): running."])
            resumed, text, seconds = run_logged(ctx, [*TORCHRUN, str(TRAIN), "--resume", str(run_dir)])
        results = run_dir / "results.json"
        finished = resumed == 0 and results.exists()
        dice = f"test Dice {json.loads(results.read_text())['test']['dice']:.4f}" if finished else "no results.json"
        rows.append(["2: `--resume` the run folder", resumed, f"{seconds:.0f}", f"epoch 2 trained; {dice}"])
    verdict = "**pass**: one epoch, resume, exit 0" if finished else "**FAIL**"
    lines = [f"{intro}: {verdict}.", "", *table(columns, rows)]
    if not finished:
        lines += tail(text or first_text, 30)
    ctx.write(lines)
    ctx.conclude("ok" if finished else "fail", "one epoch, resume, exit 0" if finished else
                 f"launch {'2' if saved else '1'} did not finish (exit code {resumed if saved else first})")


# ----------------------------------------------------------------------------- 5. bookkeeping


def bookkeeping_argv(ctx: Context) -> list[str]:
    argv = ["--dir", str(ctx.runs_dir)] if ctx.runs_dir is not None else []
    if ctx.smoke:
        return argv + ["--device", "cpu", "--image-size", "32", "-b", "4", "--valid-images", "8", "--steps", "1",
                       "--warmup-steps", "0", "--repeats", "1", "--models", "resnet34_unet"]
    # The recipe's network first: a stage cut off at its limit has measured it, and the sample stage plans by it.
    return argv + ["--models", "resnet34_unet", "unet"]


def bookkeeping(ctx: Context) -> None:
    """benchmarks/bookkeeping_speed.py at the recipe's sizes (toy ones with --smoke): its tables go to the section as
    each network finishes, its seconds to --measured for the sample stage."""
    import bookkeeping_speed as benchmark

    argv = bookkeeping_argv(ctx)
    ctx.write([f"{shown(['python', 'benchmarks/bookkeeping_speed.py', *argv])}: running."])
    extra = ["--report-to", str(ctx.section)] + (["--json", str(ctx.measured)] if ctx.measured is not None else [])
    rows = benchmark.main([*argv, *extra])
    args = benchmark.parse_args(argv)
    shares = []
    for row in rows:
        run = benchmark.project(row, args.batch_size, args.valid_images, args.save_every, args.improved)
        shares.append(f"{row.network} {run['policy'] / (run['training'] + run['validation'] + run['policy']):.1%}")
    ctx.conclude("ok", f"bookkeeping's share of the projected run under the policy: {', '.join(shares)}")


# ----------------------------------------------------------------------------- 6. throughput


def throughput(ctx: Context) -> None:
    import throughput as benchmark

    argv = ["--no-record"]
    if ctx.sample is not None:
        argv += ["--data-path", str(ctx.sample)]
    if ctx.smoke:
        # One network: the other runs the same code, and a UNet step costs a second even at 32² on a CPU.
        argv += ["--device", "cpu", "--image-size", "32", "--n-images", "12", "-b", "4", "--steps", "1",
                 "--warmup-steps", "0", "--models", "resnet34_unet"]
    else:
        # Compiling both networks takes minutes, more than this stage has; the recipe's network is timed first.
        argv += ["--no-compile", "--models", "resnet34_unet", "unet"]
    command = shown(["python", "benchmarks/throughput.py", *argv])
    benchmark.main([*argv, "--report-to", str(ctx.section)])
    text = ctx.section.read_text()
    failed = len(re.findall(r"\| failed: ", text))
    note = "" if ctx.smoke else " `torch.compile` is not timed here: compiling takes minutes; run the script alone."
    ctx.write([f"{command}.{note}", "", text.rstrip()])
    ctx.conclude("fail" if failed else "ok", f"{failed} measurement(s) failed" if failed else "every row measured")


# ----------------------------------------------------------------------------- 7. the sample


def planned_epochs(seconds: float, n_train: int, n_valid: int, measured: dict | None) -> tuple[int, str]:
    """Epochs of one network that fit in `seconds` on the sample, and how that was worked out: from the
    bookkeeping stage's seconds per step and validation, with what train.py does on the training thread
    every epoch (history.csv, the host copy of the state) and last.pt and the figure twice (after epoch 1
    and at the end: a short run writes them no more often), besides SAMPLE_OVERHEAD_SECONDS; without
    them, UNMEASURED_EPOCHS."""
    from train_speed import RECIPE_EPOCHS

    if measured is None:
        return UNMEASURED_EPOCHS, f"{UNMEASURED_EPOCHS} (no measured speed: the bookkeeping stage did not finish)"
    epoch = (n_train // measured["batch_size"] * measured["step"]
             + measured["validation"] * n_valid / measured["valid_images"]
             + measured["history"] + measured.get("host_copy", 0.0))
    budget = seconds - SAMPLE_OVERHEAD_SECONDS - 2 * (measured["last"] + measured["figure"])
    epochs = max(0, min(RECIPE_EPOCHS, int(budget / epoch)))
    return epochs, (f"{epochs} ({seconds:.0f} s less {SAMPLE_OVERHEAD_SECONDS:.0f} s of start and test, at "
                    f"{epoch:.2f} s an epoch)")


def dice_by_epoch(rows: list[dict]) -> str:
    """Valid Dice at about five epochs spread over the run: how it rose."""
    picked = sorted({1, *(round(len(rows) * part / 4) for part in (1, 2, 3, 4))} - {0})
    return ", ".join(f"{epoch}: {float(rows[epoch - 1]['valid_dice']):.3f}" for epoch in picked)


def sample_row(network: str, plan: str, code: int | None, run_dir: Path, n_train: int) -> list[object]:
    """A network's row: the plan, what ran, valid Dice against epochs, test Dice, the projection."""
    from train_speed import FULL_TRAIN_IMAGES, RECIPE_EPOCHS

    history = run_dir / "history.csv"
    rows = list(csv.DictReader(history.read_text().splitlines())) if history.exists() else []
    outcome = {0: "finished", None: "cut off at its limit"}.get(code, f"**failed** (exit code {code})")
    if not rows:
        return [network, plan, f"{outcome}, no epoch", "", "", "", ""]
    seconds = statistics.median(float(row["seconds"]) for row in rows[1:] or rows)  # the first autotunes
    results = run_dir / "results.json"
    test = f"{json.loads(results.read_text())['test']['dice']:.4f}" if code == 0 and results.exists() else ""
    projected = RECIPE_EPOCHS * seconds * FULL_TRAIN_IMAGES / n_train / 60
    best = max(rows, key=lambda row: float(row["valid_dice"]))
    return [network, plan, f"{outcome}, {len(rows)} epoch(s), {seconds:.2f} s each", dice_by_epoch(rows),
            f"{float(best['valid_dice']):.4f} ({best['epoch']})", test, f"{projected:.1f} min"]


def sample(ctx: Context) -> None:
    """Both networks' defaults at 256² on the real sample, each for as many epochs as half the time left allows."""
    from oxford_pet import split_names
    from train_speed import FULL_TRAIN_IMAGES

    size, networks = 32 if ctx.smoke else 256, ("resnet34_unet", "unet")
    smoke_flags = ["--device", "cpu", "--num-workers", "0", "-b", "4"] if ctx.smoke else []
    n_train, n_valid = (len(split_names(ctx.sample, split)) for split in ("train", "valid"))
    measured = json.loads(ctx.measured.read_text()) if ctx.measured is not None and ctx.measured.exists() else {}
    columns = ["network", "epochs planned", "ran", "valid Dice by epoch", "best valid Dice (epoch)", "test Dice",
               "200 epochs of the full split, projected"]
    intro = [f"train.py's defaults{' (toy flags ' + shlex.join(smoke_flags) + ')' if smoke_flags else ''} at {size}² "
             f"on the sample ({n_train} train / {n_valid} valid images), each network for as many epochs as half the "
             "time left allows. The projection scales the median epoch (training and validation, after the first) "
             f"by the full split's {FULL_TRAIN_IMAGES} train images: the bookkeeping stage has the writes.", ""]
    rows: list[list[object]] = []
    commands, failures = [], []
    for index, network in enumerate(networks):
        seconds = (ctx.deadline - time.monotonic()) / (len(networks) - index)
        epochs, plan = (1, "1 (`--smoke`)") if ctx.smoke else planned_epochs(
            seconds, n_train, n_valid, measured.get(network))
        if epochs < 1:
            rows.append([network, plan, "skipped: not one epoch fits", "", "", "", ""])
            continue
        command = [sys.executable, str(TRAIN), "-n", network, "-e", str(epochs), "--image-size", str(size),
                   "--data_path", str(ctx.sample), "--save-dir", str(ctx.runs_dir / "sample"), "--run-name", network,
                   *smoke_flags]
        commands.append(shown(command))
        ctx.write([*intro, *table(columns, rows), "", f"{network}: running {commands[-1]}"])
        code, text, _ = run_logged(ctx, command, deadline=time.monotonic() + seconds)
        rows.append(sample_row(network, plan, code, ctx.runs_dir / "sample" / network, n_train))
        failures += [] if code in (0, None) else ["", f"{network} failed; the end of its output:", *tail(text, 20)]
    ctx.write([*intro, *table(columns, rows), "", "Commands:", "", *(f"- {command}" for command in commands),
               *failures])
    failed = [row[0] for row in rows if "**failed**" in str(row[2])]
    ctx.conclude("fail" if failed else "ok", f"{', '.join(failed)} failed" if failed else
                 "; ".join(f"{row[0]}: {row[2]}" for row in rows))


STAGES = {
    "platform": platform, "syncs": syncs, "determinism": determinism, "torchrun": torchrun,
    "bookkeeping": bookkeeping, "throughput": throughput, "sample": sample,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["interrupted-train"]:
        interrupted_train(argv[1:])
        return
    parser = argument_parser("Run one stage of gpu_check.py, writing its part of the report and its outcome.")
    parser.add_argument("stage", choices=STAGES, help="which stage to run")
    parser.add_argument("--section", type=Path, required=True, help="the markdown file this stage writes")
    parser.add_argument("--log", type=Path, required=True, help="the stage's log, which its commands' output joins")
    parser.add_argument("--seconds", type=float, required=True, help="the stage's time limit")
    parser.add_argument("--smoke", action="store_true", help="on the CPU, at toy sizes")
    parser.add_argument("--sample", type=Path, default=None, help="the real sample's folder")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the sample's runs and the writes go")
    parser.add_argument(
        "--measured", type=Path, default=None, help="the bookkeeping stage's JSON, which the sample stage plans by"
    )
    parser.add_argument("--outcome", type=Path, default=None, help="a file for the stage's verdict: ok, fail, skipped")
    args = parser.parse_args(argv)
    if args.stage == "sample" and (args.sample is None or args.runs_dir is None):
        parser.error("the sample stage needs --sample (the real sample's folder) and --runs-dir.")
    # Time to report before gpu_check stops the stage: a command's Ctrl-C grace, and writing.
    margin = min(STOP_GRACE + 4.0, 0.5 * args.seconds)
    ctx = Context(args.section, args.log, time.monotonic() + args.seconds - margin, args.smoke, args.sample,
                  args.runs_dir, args.measured, args.outcome)
    STAGES[args.stage](ctx)


if __name__ == "__main__":
    run_script(main)
