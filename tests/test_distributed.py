"""torchrun data-parallel training on CPUs (Gloo, 2 processes): the same step and the same scores as one
process, one run folder, a flag error for a batch that does not split, and Ctrl-C that resumes."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import distributed
from conftest import SRC, TOY_RUN
from errors import PetsegError
from evaluate import eval_loader, evaluate
from losses import bce_dice
from make_synthetic_pets import make_synthetic_pets
from models import build_model
from oxford_pet import IMAGENET_MEAN, IMAGENET_STD

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
CPU = torch.device("cpu")


def quiet_env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=quiet_env())


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    masks = (torch.rand(8, 1, 32, 32, generator=generator) > 0.5).float()
    return images, masks


# What each of the two processes runs: one SGD step of DDP with SyncBN, then an evaluation of fixed
# weights over 7 images; rank 0 saves what it got.
WORKER = """
    import json
    import sys

    import torch

    sys.path[:0] = [{src!r}, {tests!r}, {tools!r}]
    import distributed
    from evaluate import eval_loader, evaluate
    from models import build_model
    from oxford_pet import IMAGENET_MEAN, IMAGENET_STD
    from test_distributed import fixed_batch
    from losses import bce_dice

    processes = distributed.from_environment()
    device = distributed.start(processes, "cpu")
    torch.manual_seed(0)
    model = distributed.wrap(build_model("resnet34_unet"), device, sync_batch_norm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, masks = fixed_batch()
    share = slice(processes.rank * 4, processes.rank * 4 + 4)
    bce_dice(model(images[share]), masks[share]).backward()
    optimizer.step()
    if processes.is_main:
        torch.save(distributed.unwrap(model).state_dict(), {out!r} + "/stepped.pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --amp on CPUs: BatchNorm sees bfloat16
        loss = bce_dice(model(images[share]), masks[share])
    loss.backward()
    if processes.is_main:
        json.dump({{"bf16_loss": loss.item()}}, open({out!r} + "/bf16.json", "w"))

    torch.manual_seed(1)
    model = distributed.wrap(build_model("resnet34_unet"), device, sync_batch_norm=True)
    loader = eval_loader({data!r}, "test", 32, IMAGENET_MEAN, IMAGENET_STD, 3, 0, device, original_masks=True,
                         shard=processes.shard)
    result = evaluate(model, loader, device, loss_fn=bce_dice)
    if processes.is_main:
        summary = {{**result.summary(), "per_image_dice": result.per_image_dice}}
        json.dump(summary, open({out!r} + "/evaluated.json", "w"))
    distributed.stop(wait_for_others=True)
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(what the two processes saved, the 7-test-image dataset they evaluated)."""
    data = make_synthetic_pets(tmp_path_factory.mktemp("data") / "pets", n_trainval=10, n_test=7, seed=3)
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(
        src=str(SRC), tests=str(Path(__file__).parent), tools=str(SRC.parent / "tools"), data=str(data), out=str(out)
    )))
    result = torchrun(script, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data


def test_one_ddp_step_with_sync_batch_norm_equals_one_process_with_the_whole_batch(two_processes) -> None:
    out, _ = two_processes
    torch.manual_seed(0)
    initial = build_model("resnet34_unet")
    # The reference in float64: at 32x32 the deepest BatchNorm sees 8 values a channel, and a float32
    # single process is itself further from the exact step than the two processes are.
    model = build_model("resnet34_unet").double()
    model.load_state_dict(initial.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, masks = fixed_batch()
    bce_dice(model(images.double()), masks.double()).backward()
    optimizer.step()
    expected = model.state_dict()
    got = torch.load(out / "stepped.pt", weights_only=True)
    assert got.keys() == expected.keys(), "checkpoints hold the plain model's names, no module. prefix"
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(got[key].double(), value, rtol=1e-4, atol=1e-4), key
        else:
            assert torch.equal(got[key], value), key
    initial = initial.state_dict()
    moved = [key for key in expected if "running_mean" in key and not torch.equal(expected[key], initial[key])]
    assert moved, "the step must have updated BatchNorm's running statistics"


def test_sync_batch_norm_on_cpus_trains_under_bfloat16_autocast(two_processes) -> None:
    out, _ = two_processes
    assert math.isfinite(json.loads((out / "bf16.json").read_text())["bf16_loss"])


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "select_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    processes = distributed.Processes(rank=2, local_rank=2, world_size=4, local_world_size=4, launched=True)
    with pytest.raises(PetsegError, match="--nproc_per_node=2"):
        distributed.start(processes, "auto")


def test_distributed_evaluation_counts_every_image_once(two_processes) -> None:
    out, data = two_processes
    torch.manual_seed(1)
    model = build_model("resnet34_unet")
    loader = eval_loader(data, "test", 32, IMAGENET_MEAN, IMAGENET_STD, 3, 0, CPU, original_masks=True)
    expected = evaluate(model, loader, CPU, loss_fn=bce_dice)
    got = json.loads((out / "evaluated.json").read_text())
    assert len(got["per_image_dice"]) == 7
    assert got["per_image_dice"] == pytest.approx(expected.per_image_dice, abs=1e-6)
    scores = ("dice", "dataset_dice", "dataset_iou", "dice_original", "dataset_dice_original", "dataset_iou_original")
    for key in scores:
        assert got[key] == pytest.approx(getattr(expected, key), abs=1e-6), key
    assert got["loss"] == pytest.approx(expected.loss, rel=1e-5)


def printed_test_dice(output: str) -> float:
    match = re.search(r"^Test Dice: (\d\.\d{4})", output, flags=re.MULTILINE)
    assert match, f"no 'Test Dice:' line in:\n{output}"
    return float(match.group(1))




def test_a_batch_that_does_not_split_over_the_processes_is_a_flag_error(synthetic_pets: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "runs"
    result = torchrun(
        SRC / "train.py", "--data_path", synthetic_pets, *TOY_RUN, "-b", "7", "--save-dir", save_dir, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "-b/--batch_size 7" in result.stderr and "does not divide by 2" in result.stderr
    assert "exitcode  : 2" in result.stderr, "each process stops with argparse's exit code 2"
    assert not save_dir.exists()


def test_torchrun_run_stops_on_ctrl_c_resumes_and_leaves_one_run_that_inference_scores_alike(
    synthetic_pets: Path, tmp_path: Path
) -> None:
    save_dir = tmp_path / "runs"
    command = [*TORCHRUN, str(SRC / "train.py"), "--data_path", str(synthetic_pets), "-e", "3", *TOY_RUN,
               "--save-dir", str(save_dir), "--run-name", "r"]
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches torchrun and the workers.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=quiet_env(), start_new_session=True)
    history = save_dir / "r" / "history.csv"
    deadline = time.monotonic() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "epoch 1 did not finish in time"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "global batch 8 = 2 processes x 4" in stdout
    match = re.search(r"continue with:\n\s+(.+)", stderr)
    assert match, stderr[-3000:]
    resume = shlex.split(match.group(1))
    assert resume[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]

    finished = torchrun(*resume[3:], cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("Test Dice:") == 1, "only rank 0 prints"
    assert json.loads((save_dir / "r" / "results.json").read_text())["epochs_run"] == 3
    assert [path.name for path in save_dir.iterdir()] == ["r"]
    assert sorted(path.name for path in (save_dir / "r").iterdir()) == [
        "best.pt", "curves.png", "history.csv", "last.pt", "results.json",
    ]
    assert len((save_dir / "r" / "history.csv").read_text().splitlines()) == 4
    inference = subprocess.run(
        [sys.executable, str(SRC / "inference.py"), "-m", str(save_dir / "r"), "--data_path", str(synthetic_pets),
         "--device", "cpu", "--num-workers", "0", "-k", "0", "--worst", "0"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert inference.returncode == 0, inference.stderr[-3000:]
    assert printed_test_dice(inference.stdout) == printed_test_dice(finished.stdout)
