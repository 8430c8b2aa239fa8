"""benchmarks/gpu_check.py: the first GPU's one command. Its plan gives every stage its floor within 8
minutes; --smoke runs every stage on the CPU at toy sizes into one report with real numbers and an outcome
from each stage; stages short of time are skipped, a failing one is reported and the next goes on, one cut
off at its limit keeps what it wrote; and the training-speed and bookkeeping pieces its stages time with."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import devices
import errors
from conftest import REPO_ROOT
from make_synthetic_pets import make_synthetic_pets

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import deadline  # noqa: E402
import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402
import train_speed  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(report, output folder) of `gpu_check.py --smoke` with a 12-image sample."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    sample = make_synthetic_pets(tmp / "sample", n_trainval=12, n_test=4)
    output = tmp / "out"
    gpu_check.main(["--smoke", "--output", str(output), "--sample", str(sample), "--runs-dir", str(tmp / "runs")])
    return (output / gpu_check.REPORT_NAME).read_text(), output


def section(report: str, number: int) -> str:
    return report.split(f"\n## {number}. ")[1].split("\n## ")[0]


def test_smoke_run_reports_every_stage_with_real_numbers(smoke: tuple[str, Path]) -> None:
    report, output = smoke
    for number, stage in enumerate(gpu_check.STAGES, start=1):
        assert f"| {number}. {stage.name} | finished |" in report, report
        # Each stage's own verdict, with what it rests on: not merely a process that exited 0.
        assert re.search(rf"\| {number}\. {stage.name} \| finished \| ok: \S[^|]* \|", report), report
        assert "*finished*; outcome ok: " in section(report, number)
    platform = section(report, 1)
    assert f"| torch | {torch.__version__} |" in platform
    assert re.search(r"CUDA-only tests .*\*\*pass\*\* \(exit code 0, .*skipped", platform), platform

    syncs = section(report, 2)
    counted = re.search(r"\| (\d+) \| (\d+) \| (\d+\.\d\d) \| (\d+\.\d) \| \*\*(within|over) budget\*\* \|", syncs)
    assert counted, syncs
    n_syncs, steps, per_step = int(counted[1]), int(counted[2]), float(counted[3])
    assert steps == 2 and per_step == pytest.approx(n_syncs / steps, abs=0.005)
    assert n_syncs == 0 or "train.py:" in syncs, "the sites of the syncs are listed"

    throughput = section(report, 6)
    fed = re.search(r"\| resnet34_unet \| float32 \| eager \| n/a \| CPU memory [^|]*\| cached loader \| ([\d.]+) \| "
                    r"([\d.]+) \| (\d+)% ", throughput)
    compute = re.search(r"\| resnet34_unet \| float32 \| eager \| n/a \|  \| one ready batch \(compute only\) \| "
                        r"([\d.]+) \|", throughput)
    assert fed and compute, throughput
    assert float(fed[1]) > 0 and float(compute[1]) > 0 and int(fed[3]) > 0
    projection = re.search(r"\| resnet34_unet \| [\d.]+ \| \d+% \| ([\d.]+) \| [\d.]+ \| [\d.]+% \| ([\d.]+) \|",
                           throughput)
    assert projection and float(projection[1]) > 0 and float(projection[2]) > 0, throughput
    assert "input, augmented: petseg cache + batched augmentation on cpu" in throughput

    determinism = section(report, 3)
    assert "--deterministic" in determinism and "Final weights: **bit-equal**" in determinism, determinism
    assert re.search(r"\| first \| 0 \| \d+ \|\n\| second \| 0 \| \d+ \|", determinism), determinism

    torchrun = section(report, 4)
    assert "**pass**: one epoch, resume, exit 0" in torchrun and "backend gloo" in torchrun
    assert re.search(r"\| 2: `--resume` the run folder \| 0 \| \d+ \| epoch 2 trained; test Dice 0\.\d{4} \|", torchrun)

    writes = section(report, 5)
    assert "python benchmarks/bookkeeping_speed.py" in writes, writes
    seconds, minutes = r"[\d.]+ s", r"[\d.]+ min"
    assert re.search(rf"\| resnet34_unet \| {seconds} \| {seconds} \| {seconds} \(\d+ MB\) \| {seconds} \(\d+ MB\) "
                     rf"\| {seconds} \| {seconds} \| {seconds} \|", writes), writes
    assert re.search(rf"\| resnet34_unet \| {minutes} \| {minutes} \| {minutes} \([\d.]+%\) \| {minutes} \(\d+, \d+\) "
                     rf"\| {minutes} \| {minutes} \| [\d.]+% \| (yes|no) \|", writes), writes

    sample = section(report, 7)
    for network in ("resnet34_unet", "unet"):
        assert re.search(rf"\| {network} \| 1 \(`--smoke`\) \| finished, 1 epoch\(s\), [\d.]+ s each \| 1: 0\.\d{{3}} "
                         rf"\| 0\.\d{{4}} \(1\) \| 0\.\d{{4}} \| [\d.]+ min \|", sample), sample
    assert sample.count("`python src/train.py -n ") == 2, "the report names the commands that ran"

    files = list(output.iterdir())
    assert len(files) <= 8 and all(path.is_file() and path.stat().st_size < 16 * 2**20 for path in files)


def test_an_output_folder_holding_a_report_is_a_flag_error(smoke: tuple[str, Path]) -> None:
    _, output = smoke
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--output", str(output)])
    assert exit_info.value.code == 2


def test_stages_short_of_time_are_skipped_with_a_line_saying_so(tmp_path: Path) -> None:
    gpu_check.main(["--smoke", "--output", str(tmp_path), "--budget-minutes", "0.1", "--runs-dir", str(tmp_path / "r")])
    report = (tmp_path / gpu_check.REPORT_NAME).read_text()
    for number, stage in enumerate(gpu_check.STAGES[:-1], start=1):
        assert re.search(rf"\| {number}\. {stage.name} \| skipped: \d+ s left for it, and it needs at least \d+ s "
                         r"\| skipped \|", report)
    assert "| 7. sample | skipped: no --sample given" in report


def test_the_plan_gives_every_stage_its_floor_in_eight_minutes_with_a_cold_start() -> None:
    budget = 8 * 60
    planned = [stage.planned for stage in gpu_check.STAGES[:-1]]
    assert all(stage.planned is None or stage.planned >= stage.minimum for stage in gpu_check.STAGES)
    assert gpu_check.STAGES[-1].planned is None, "the last stage takes what is left"
    # Every stage running to its planned end still leaves the last one its floor, and the final report its margin.
    assert sum(planned) + gpu_check.STAGES[-1].minimum + gpu_check.FINAL_MARGIN <= budget
    by_name = {stage.name: stage for stage in gpu_check.STAGES}
    # The stages that start processes get their commands' start-up: a cold torch import and pytest's collection;
    # two cold torchrun launches with NCCL's start and a checkpoint written and read.
    assert by_name["platform"].minimum >= 45 and by_name["torchrun"].minimum >= 70


def test_each_stage_may_run_to_its_planned_end_and_time_saved_rolls_on(tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")])
    check = gpu_check.Check(args, [])
    assert check.limit(0) == pytest.approx(gpu_check.STAGES[0].planned, abs=1)
    check.started -= 10  # the first stage took 10 s of its planned seconds
    second = gpu_check.STAGES[0].planned + gpu_check.STAGES[1].planned - 10
    assert check.limit(1) == pytest.approx(second, abs=1)
    assert check.skip_reason(gpu_check.STAGES[-1]) is not None, "no --sample: the sample stage is skipped"


# A stand-in for gpu_stages.py: each stage writes a line of its section, some their verdict; then one fails
# and one hangs.
FAKE_STAGES = """
    import sys
    import time

    VERDICTS = {"platform": "ok: platform fine", "torchrun": "ok: resumed", "determinism": "fail: weights differ"}

    stage, section = sys.argv[1], sys.argv[sys.argv.index("--section") + 1]
    with open(section, "w") as file:
        file.write(f"{stage}: first row\\n")
    if stage in VERDICTS:
        with open(sys.argv[sys.argv.index("--outcome") + 1], "w") as file:
            file.write(VERDICTS[stage])
    if stage == "syncs":
        print("Traceback (most recent call last):\\nRuntimeError: the stage broke")
        sys.exit(1)
    if stage == "throughput":
        time.sleep(60)
"""


def test_a_failed_stage_is_reported_and_the_next_runs_and_one_cut_off_keeps_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake_stages.py"
    fake.write_text(textwrap.dedent(FAKE_STAGES))
    monkeypatch.setattr(gpu_check, "GPU_STAGES", fake)
    monkeypatch.setattr(gpu_check, "FINAL_MARGIN", 0.0)
    quick = [gpu_check.Stage(name, name, 1.5, 0.1) for name in ("platform", "syncs", "throughput", "torchrun")]
    monkeypatch.setattr(gpu_check, "STAGES", tuple(quick))
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(errors.PetsegError, match="stage.s. syncs failed"):
        gpu_check.main(["--output", str(out), "--budget-minutes", "0.1", "--runs-dir", str(out / "runs")])
    assert time.monotonic() - start < 15, "the hanging stage was stopped at its limit"
    report = (out / gpu_check.REPORT_NAME).read_text()
    assert "| 1. platform | finished |" in report and "| 2. syncs | **failed** (exit code 1) |" in report
    assert "| 1. platform | finished | ok: platform fine |" in report
    assert "RuntimeError: the stage broke" in section(report, 2)
    assert re.search(r"\| 3\. throughput \| cut off at its limit of \d+ s", report)
    assert re.search(r"\| 3\. throughput \| cut off [^|]* \| none reported \|", report)
    assert "throughput: first row" in section(report, 3)
    assert "| 4. torchrun | finished |" in report and "torchrun: first row" in section(report, 4)


def test_a_stage_that_exits_cleanly_with_a_failing_verdict_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake_stages.py"
    fake.write_text(textwrap.dedent(FAKE_STAGES))
    monkeypatch.setattr(gpu_check, "GPU_STAGES", fake)
    monkeypatch.setattr(gpu_check, "FINAL_MARGIN", 0.0)
    monkeypatch.setattr(gpu_check, "STAGES", (gpu_check.Stage("determinism", "determinism", 3, 0.1),))
    out = tmp_path / "out"
    with pytest.raises(errors.PetsegError, match="stage.s. determinism failed"):
        gpu_check.main(["--output", str(out), "--budget-minutes", "0.1", "--runs-dir", str(out / "runs")])
    report = (out / gpu_check.REPORT_NAME).read_text()
    assert "| 1. determinism | finished | **fail: weights differ** |" in report


def test_run_until_stops_a_command_at_its_deadline_with_ctrl_c_then_a_kill(tmp_path: Path) -> None:
    output = tmp_path / "out.txt"
    polite = [sys.executable, "-c", "import time\ntry:\n time.sleep(60)\nexcept KeyboardInterrupt:\n print('saved')"]
    assert deadline.run_until(polite, time.monotonic() + 1, output) is None
    assert "saved" in output.read_text(), "Ctrl-C first, so that a run can keep its last epoch"
    ignores_ctrl_c = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    stubborn = [sys.executable, "-c", ignores_ctrl_c]
    start = time.monotonic()
    assert deadline.run_until(stubborn, time.monotonic() + 0.5, output, grace=0.5) is None
    assert time.monotonic() - start < 10
    assert deadline.run_until([sys.executable, "-c", "raise SystemExit(3)"], time.monotonic() + 30, output) == 3


def test_forced_fp16_reaches_autocast_and_the_scaler_and_is_undone() -> None:
    setup = train_speed.Setup(amp=True, force_fp16=True, cudnn_benchmark=False)
    benchmark = torch.backends.cudnn.benchmark
    with train_speed.configured(setup):
        assert devices.autocast_dtype(CPU) == torch.float16 and devices.needs_loss_scaling(CPU, amp=True)
        training = train_speed.make_training("resnet34_unet", CPU, setup, loader=[None, None])
        assert training.trainer.scaler.is_enabled() and not torch.backends.cudnn.benchmark
    assert devices.autocast_dtype(CPU) == torch.bfloat16 and not devices.needs_loss_scaling(CPU, amp=True)
    assert torch.backends.cudnn.benchmark == benchmark
    assert setup.precision(CPU) == "float16 autocast with loss scaling (forced)"


def test_projection_counts_the_full_splits_steps_and_a_validation_pass() -> None:
    # 3312 // 32 = 103 steps of 0.1 s and 368 valid images at 368 img/s: 11.3 s an epoch, 200 epochs.
    assert train_speed.projected_seconds(0.1, 32, 368.0) == pytest.approx(200 * (103 * 0.1 + 1.0))


def test_the_bookkeeping_projection_saves_last_pt_by_time_and_best_pt_on_improvement() -> None:
    import bookkeeping_speed

    measured = bookkeeping_speed.Measured(
        "net", step=0.01, validation=0.5, last=0.4, best=0.1, figure=0.3, history=0.01, last_bytes=1, best_bytes=1,
        host_copy=0.02,
    )
    run = bookkeeping_speed.project(measured, batch_size=32, valid_images=368, save_every=60, improved=0.25)
    training, validation = 200 * 103 * 0.01, 200 * 0.5
    assert run["training"] == pytest.approx(training) and run["validation"] == pytest.approx(validation)
    assert run["every_epoch"] == pytest.approx(200 * (0.4 + 0.3 + 0.01 + 0.25 * 0.1))
    intervals = int((training + validation + 200 * (0.01 + 0.02)) // 60)  # 5 minutes: 5 intervals
    assert (run["last_saves"], run["figures"]) == (intervals + 2, intervals + 2) == (7, 7), "the figure with last.pt"
    # On the training thread: history and the host copy every epoch, the figures; the writes, in the background,
    # are shorter than the 1.53 s epochs that follow them, so they hold nothing up.
    assert run["policy"] == pytest.approx(200 * (0.01 + 0.02) + 7 * 0.3)
    assert run["background"] == pytest.approx(7 * 0.4 + 50 * 0.1)
    slow_disk = bookkeeping_speed.Measured(**{**vars(measured), "last": 2.53})
    assert bookkeeping_speed.project(slow_disk, 32, 368, 60, 0.25)["policy"] == pytest.approx(
        200 * (0.01 + 0.02) + 7 * 0.3 + 7 * 1.0
    ), "a write that outlasts the next epoch holds training up by the difference"
    half_valid = bookkeeping_speed.project(measured, batch_size=32, valid_images=184, save_every=60, improved=0.25)
    assert half_valid["validation"] == pytest.approx(2 * validation), "a smaller valid pass is scaled to 368 images"


def test_the_sample_stage_plans_epochs_from_the_measured_speed_and_its_start_up() -> None:
    measured = {"step": 0.05, "validation": 0.368, "valid_images": 368, "batch_size": 32, "last": 0.5, "best": 0.1,
                "figure": 0.3, "history": 0.01, "host_copy": 0.02}
    # 283 train images: 8 steps of 0.05 s; 32 valid images: 0.032 s; history and host copy 0.03 s: 0.462 s an
    # epoch; last.pt and the figure (0.8 s) after epoch 1 and at the end, whatever the number of epochs.
    epochs, how = gpu_stages.planned_epochs(100.0, 283, 32, measured)
    assert epochs == int((100 - gpu_stages.SAMPLE_OVERHEAD_SECONDS - 1.6) / 0.462) and "0.46 s an epoch" in how
    assert gpu_stages.planned_epochs(10.0, 283, 32, measured)[0] == 0, "not one epoch fits beside the start"
    assert gpu_stages.planned_epochs(1e6, 283, 32, measured)[0] == 200, "never more than the recipe's epochs"
    epochs, how = gpu_stages.planned_epochs(100.0, 283, 32, None)
    assert epochs == gpu_stages.UNMEASURED_EPOCHS and "no measured speed" in how


def test_on_cuda_every_sync_warning_inside_an_epoch_counts_at_the_line_that_made_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)  # what a GPU would do: warn on each sync

    def an_epoch(model: object, loader: list, *args: object, **kwargs: object) -> dict:
        for _ in loader:
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        return {}

    counter = gpu_stages.StepSyncs(cuda=True)
    counted = counter.wrap(an_epoch)
    counted(None, [1, 2, 3])
    counted(None, [1, 2])
    assert (counter.syncs, counter.steps, counter.epochs) == (5, 5, 2)
    line = an_epoch.__code__.co_firstlineno + 2
    assert counter.sites == {f"test_gpu_check.py:{line}": 5}
    assert modes == ["warn", "default"] * 2, "the debug mode is on only inside the epochs"
    assert counter.budget() == pytest.approx(5 / gpu_stages.STEPS_PER_SYNC + 2 * gpu_stages.SYNCS_PER_EPOCH)


def process_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after its name: state, parent, ..."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
    return stats


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped does not)."""
    fields = process_stats().get(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG, which ties a stage to gpu_check, is Linux's")
def test_a_stage_does_not_outlive_gpu_check_killed_outright(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO_ROOT / "tools")!r})
        from deadline import run_until
        run_until(["sleep", "60"], time.monotonic() + 60, Path({str(tmp_path / "log")!r}), own_group=True)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline_at = time.monotonic() + 20
    children = []
    while not children and time.monotonic() < deadline_at:
        time.sleep(0.1)
        children = [pid for pid, fields in process_stats().items() if fields[1] == str(parent.pid)]
    assert children, "the stage started"
    parent.kill()  # SIGKILL: gpu_check gets no chance to stop its stage
    parent.wait()
    while any(alive(pid) for pid in children) and time.monotonic() < deadline_at:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), "the stage went with gpu_check"
