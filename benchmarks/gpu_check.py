"""Everything a first GPU run must show, in one prepared command of at most --budget-minutes (8 by
default, the window a first GPU gets: python's and torch's start, CUDA's and cuDNN's included, the
machine's own start-up not), run once, written to one markdown report.

    python benchmarks/gpu_check.py --output OUT --sample .carry/sample
    python benchmarks/gpu_check.py --output OUT --sample ../shared/oxford-iiit-pet-sample --smoke   # CPU, toy sizes

Seven stages, each a process of its own (benchmarks/gpu_stages.py) with a time limit from the plan in
STAGES: each may run to its planned end (seconds an earlier stage saved roll on to the next) while the
stages after it keep their floors; the last takes what is left.
1. platform: torch, CUDA and cuDNN versions, the GPU, its capability and the wheel's arch list; the
   suite's CUDA-only tests (`pytest -m cuda`);
2. syncs: a short train.py run on synthetic data, syncs per training step counted against the budget;
3. determinism: two `train.py --deterministic` runs of one command, their final weights compared bit
   for bit;
4. torchrun --nproc_per_node=1 (NCCL): one epoch, a resume, exit 0;
5. bookkeeping: benchmarks/bookkeeping_speed.py at the recipe's sizes: a training step, validation, last.pt,
   best.pt, the figure and history.csv per network, and the full run's time with them;
6. throughput: benchmarks/throughput.py --no-compile: the input pipeline and the training table (cache
   in GPU or page-locked memory, loader-fed vs compute-only, bf16 and forced fp16 with a scaler,
   cudnn.benchmark on and off), peak memory per image, and what 200 epochs of the full split take;
7. sample: both networks' defaults at 256² on the real sample (--sample), each for as many epochs as
   half the time left allows (planned from stage 5's measured speed): valid Dice against epochs, test
   Dice, and the full run's time projected.

OUT/gpu_check.md is rewritten (atomically) as every stage goes, so a run cut off still holds what
finished; OUT/N-STAGE.log holds each stage's output. Each stage reports an outcome: ok, fail or skipped,
and why. A stage short of time is skipped with a line saying so; one that fails is reported with the
end of its log, and the next one starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "src"), str(REPO_ROOT / "tools")]

from cli import argument_parser  # noqa: E402
from deadline import GRACE_SECONDS, run_until  # noqa: E402
from errors import PetsegError, display_path, run_script  # noqa: E402
from files import atomic_write, unused_path  # noqa: E402
from interrupts import exit_status  # noqa: E402

GPU_STAGES = REPO_ROOT / "benchmarks" / "gpu_stages.py"
REPORT_NAME = "gpu_check.md"
FINAL_MARGIN = GRACE_SECONDS + 5.0  # at the budget's end: a stopped stage's grace, then the last report
LOG_LIMIT = 15 * 2**20  # bytes a stage's log keeps (its start and its end)
MEASURED = "measured.json"  # the bookkeeping stage's seconds, which the sample stage plans its epochs by


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    planned: float | None  # seconds it may take at most, unless earlier stages saved some; None: what is left
    minimum: float  # seconds below which it is skipped


# Estimates from the CPU and from what each stage starts (a process importing torch and starting CUDA takes
# seconds; the first pays the cold start), not yet measured on a GPU: the report's seconds column will tell.
# A stage's commands stop a little before its limit (gpu_stages.STOP_GRACE), so it can still report.
STAGES = (
    Stage("platform", "Platform: versions, the GPU, the CUDA-only tests", 70, 45),
    Stage("syncs", "Syncs per training step (train.py on synthetic data)", 30, 25),
    Stage("determinism", "--deterministic: two runs, their weights compared", 60, 45),
    Stage("torchrun", "torchrun --nproc_per_node=1: one epoch, resume, exit 0", 80, 70),
    Stage("bookkeeping", "The epoch's bookkeeping beside its training step, and the full run with it", 50, 35),
    Stage("throughput", "Throughput, memory per image, and the full recipe's time at that speed", 50, 40),
    Stage("sample", "Both networks on the real sample: Dice against epochs, the full run projected", None, 60),
)


@dataclass
class Outcome:
    status: str = "not reached"  # of the stage's process: finished, failed, cut off, skipped
    verdict: str = ""  # the stage's own: ok, fail or skipped, and why
    seconds: float | None = None
    limit: float | None = None
    section: str = ""
    detail: list[str] = field(default_factory=list)


class Check:
    """The stages' outcomes so far and the report made of them."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args, self.argv = args, argv
        self.budget = args.budget_minutes * 60
        self.started, self.date = time.monotonic(), datetime.now()
        self.deadline = self.started + self.budget
        self.outcomes = {stage.name: Outcome() for stage in STAGES}

    def write(self) -> None:
        with atomic_write(self.args.output / REPORT_NAME, "w") as file:
            file.write(self.render())

    def render(self) -> str:
        smoke = " (`--smoke`: every stage on the CPU at toy sizes)" if self.args.smoke else ""
        lines = [
            f"# GPU check, {self.date:%Y-%m-%d %H:%M}", "", "```",
            " ".join(["python benchmarks/gpu_check.py", *self.argv]), "```", "",
            f"Budget {self.args.budget_minutes:g} minutes{smoke}; {time.monotonic() - self.started:.0f} s so far. "
            "Status is the stage's process; outcome is the stage's own verdict. A stage may run to its planned end "
            "(seconds an earlier one saved roll on) while the later ones keep their floors. Each stage's output is "
            "in `N-STAGE.log` beside this file.", "",
            "| stage | status | outcome | seconds | limit | planned (floor) |", "|---|---|---|---:|---:|---:|",
        ]
        for number, stage in enumerate(STAGES, start=1):
            outcome = self.outcomes[stage.name]
            seconds = "" if outcome.seconds is None else f"{outcome.seconds:.0f}"
            limit = "" if outcome.limit is None else f"{outcome.limit:.0f}"
            planned = "the rest" if stage.planned is None else f"{stage.planned:.0f}"
            lines.append(f"| {number}. {stage.name} | {outcome.status} | {outcome.verdict} | {seconds} | {limit} "
                         f"| {planned} ({stage.minimum:.0f}) |")
        for number, stage in enumerate(STAGES, start=1):
            outcome = self.outcomes[stage.name]
            heading = f"*{outcome.status}*" + (f"; outcome {outcome.verdict}" if outcome.verdict else "")
            lines += ["", f"## {number}. {stage.title}", "", heading]
            lines += ["", outcome.section.rstrip()] if outcome.section.strip() else []
            lines += ["", *outcome.detail] if outcome.detail else []
        return "\n".join(lines) + "\n"

    def limit(self, index: int) -> float:
        """Seconds stage `index` may take: until its planned end (the planned seconds of it and the stages
        before, so time an earlier stage saved rolls on), less what the later stages need at the least; the
        last stage takes what is left."""
        left = self.deadline - time.monotonic() - FINAL_MARGIN
        if STAGES[index].planned is None:
            return left
        planned_end = self.started + sum(stage.planned or 0 for stage in STAGES[: index + 1])
        later = sum(stage.minimum for stage in STAGES[index + 1 :] if self.skip_reason(stage) is None)
        return min(planned_end - time.monotonic(), left - later)

    def skip_reason(self, stage: Stage) -> str | None:
        if stage.name == "sample" and self.args.sample is None:
            return "skipped: no --sample given (the real sample's folder)"
        return None

    def run(self, index: int, scratch: Path) -> None:
        stage, outcome = STAGES[index], self.outcomes[STAGES[index].name]
        limit = self.limit(index)
        reason = self.skip_reason(stage)
        if reason is None and limit < stage.minimum:
            reason = f"skipped: {max(limit, 0):.0f} s left for it, and it needs at least {stage.minimum:.0f} s"
        if reason is not None:
            outcome.status, outcome.verdict = reason, "skipped"
            self.write()
            print(f"gpu_check: stage {index + 1}, {stage.name}: {reason}", flush=True)
            return
        section, verdict = scratch / f"{stage.name}.md", scratch / f"{stage.name}.outcome"
        log = self.args.output / f"{index + 1}-{stage.name}.log"
        command = [sys.executable, str(GPU_STAGES), stage.name, "--section", str(section), "--log", str(log),
                   "--seconds", f"{limit:.0f}", "--outcome", str(verdict), "--measured", str(scratch / MEASURED)]
        command += ["--smoke"] if self.args.smoke else []
        command += ["--sample", str(self.args.sample)] if self.args.sample is not None else []
        command += ["--runs-dir", str(self.args.runs_dir)]
        outcome.status, outcome.limit = "running", limit
        start = time.monotonic()
        print(f"gpu_check: stage {index + 1}, {stage.name}, at most {limit:.0f} s; output in {display_path(log)}",
              flush=True)

        def refresh() -> None:
            outcome.seconds = time.monotonic() - start
            outcome.section = section.read_text() if section.exists() else ""
            outcome.verdict = emphasised(verdict.read_text().strip()) if verdict.exists() else ""
            self.write()

        try:
            code = run_until(command, start + limit, log, env=child_environment(), cwd=REPO_ROOT, own_group=True,
                             every=refresh)
        except KeyboardInterrupt:
            outcome.status = "interrupted (Ctrl-C or SIGTERM): what is above finished"
            raise
        finally:
            refresh()
            trim(log)
        outcome.status = {0: "finished", None: f"cut off at its limit of {limit:.0f} s: what is above finished"}.get(
            code, f"**failed** (exit code {code})"
        )
        outcome.verdict = outcome.verdict or "none reported"
        if code != 0:
            outcome.detail = ["End of its log:", "", "```", *tail_lines(log, 25), "```"]
        self.write()
        print(f"gpu_check: stage {index + 1}, {stage.name}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)


def emphasised(verdict: str) -> str:
    """A stage's verdict for the report, a failure in bold."""
    return f"**{verdict}**" if verdict.startswith("fail") else verdict


def child_environment() -> dict[str, str]:
    # Unbuffered, so that a log cut off holds everything printed; progress bars updated rarely, so logs stay small.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}


def tail_lines(path: Path, count: int) -> list[str]:
    if not path.exists():
        return ["(no log)"]
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 64 * 1024))
        text = file.read().decode(errors="replace")
    # Progress bars redraw with carriage returns: keep each line's last state.
    return [line.rsplit("\r", 1)[-1] for line in text.rstrip().splitlines()[-count:]]


def trim(log: Path) -> None:
    """A log over LOG_LIMIT keeps its first and last halves of that."""
    if not log.exists() or log.stat().st_size <= LOG_LIMIT:
        return
    size, keep = log.stat().st_size, LOG_LIMIT // 2
    with open(log, "rb") as file:
        head = file.read(keep)
        file.seek(size - keep)
        end = file.read()
    with atomic_write(log) as file:
        file.write(head + f"\n[... {size - 2 * keep} bytes cut ...]\n".encode() + end)


def positive_minutes(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for gpu_check.md and the stages' logs")
    parser.add_argument(
        "--sample", type=Path, default=None,
        help="the real sample's folder (images/ and annotations/) for the last stage; without it that stage is skipped",
    )
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy sizes, in a minute or two")
    parser.add_argument("--budget-minutes", type=positive_minutes, default=8.0, help="time for all the stages")
    parser.add_argument(
        "--runs-dir", type=Path, default=None,
        help="where the sample stage's runs and the bookkeeping stage's writes go (default: a new "
        "saved_models/gpu_check_DATE-TIME)",
    )
    args = parser.parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file; give a folder (it is made if missing).")
    earlier = [path for path in args.output.glob("*") if path.name == REPORT_NAME or path.suffix == ".log"]
    if earlier:
        parser.error(f"--output {args.output} already holds an earlier check's report or logs, which are never "
                     "overwritten; give a new folder.")
    if args.sample is not None and not (args.sample / "annotations" / "trainval.txt").is_file():
        parser.error(f"--sample {args.sample} has no annotations/trainval.txt; give the folder holding the sample's "
                     "images/ and annotations/.")
    if args.runs_dir is not None and args.runs_dir.exists() and any(args.runs_dir.iterdir()):
        parser.error(f"--runs-dir {args.runs_dir} already holds runs, which are never reused; give a new folder.")
    if args.runs_dir is None:
        args.runs_dir = unused_path(REPO_ROOT / "saved_models" / f"gpu_check_{datetime.now():%Y%m%d-%H%M%S}")
    # The stages run in the repository's root: paths given from elsewhere must still point where they did.
    for key in ("output", "sample", "runs_dir"):
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).absolute())
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    check = Check(args, argv)
    try:  # run_script turns SIGINT, SIGTERM and SIGHUP into an interrupt: each stops the running stage too
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            for index in range(len(STAGES)):
                check.run(index, Path(scratch))
    except KeyboardInterrupt as interrupt:
        check.write()
        print(f"\nInterrupted; {display_path(args.output / REPORT_NAME)} holds what finished.", file=sys.stderr)
        sys.exit(exit_status(interrupt))
    report = args.output / REPORT_NAME
    print(f"gpu_check: report in {display_path(report)}, {time.monotonic() - check.started:.0f} s in all")
    failed = [stage.name for stage in STAGES if check.outcomes[stage.name].status.startswith("**failed")
              or check.outcomes[stage.name].verdict.startswith("**fail")]
    if failed:
        raise PetsegError(f"stage(s) {', '.join(failed)} failed; {display_path(report)} shows why.")


if __name__ == "__main__":
    run_script(main)
