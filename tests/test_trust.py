"""Trust the number (issue 20): the data a number comes from is the data the user meant, every typed flag takes
effect or is refused, and no text, signal or second process costs a file or ends in a traceback."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path, PurePath

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

import cli
import compare
import evaluate
import files
import inference
import interrupts
import locks
import oxford_pet
import plots
from distributed import Processes
from errors import PetsegError
from make_synthetic_pets import make_synthetic_pets
from oxford_pet import DatasetError, prepare_dataset, read_names, split_names
from test_user_facing import write_run

SRC = Path(__file__).resolve().parents[1] / "src"
SPLIT_LINES = "Abyssinian_1 1 1 1\nbasset_hound_1 4 2 3\n"


@pytest.fixture
def tiny_pets(tmp_path: Path) -> Path:
    """12 trainval pairs (lines 0 and 10 go to valid) and 3 test pairs."""
    return make_synthetic_pets(tmp_path / "oxford-iiit-pet", n_trainval=12, n_test=3, seed=0)


def write_lines(path: Path, names: list[str]) -> None:
    path.write_text("".join(f"{name} 1 1 1\n" for name in names))


# ----------------------------------------------------------------------------- split files in any encoding


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_split_file_in_utf8_with_a_byte_order_mark_reads_as_without(tmp_path: Path, newline: str) -> None:
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(SPLIT_LINES.replace("\n", newline).encode("utf-8"))
    marked.write_bytes(SPLIT_LINES.replace("\n", newline).encode("utf-8-sig"))
    assert read_names(marked) == read_names(plain) == ["Abyssinian_1", "basset_hound_1"]


def test_a_byte_order_mark_is_not_taken_for_an_incomplete_dataset(tiny_pets: Path) -> None:
    trainval = tiny_pets / "annotations" / "trainval.txt"
    trainval.write_bytes(trainval.read_bytes().decode().encode("utf-8-sig"))
    assert oxford_pet.missing_files(tiny_pets) == []
    assert prepare_dataset(tiny_pets, download=False) == tiny_pets.resolve()
    assert split_names(tiny_pets, "valid")[0] == "Abyssinian_1"


@pytest.mark.parametrize(
    ("encoded", "why"),
    [
        (SPLIT_LINES.encode("utf-16"), "byte 0xff"),  # with its BOM
        (SPLIT_LINES.encode("utf-16-le"), "zero bytes"),  # without: decodes as UTF-8, a zero byte after each letter
        ("Abyssinian_1 1 1 1\nchat_noir_\xe9 1 1 1\n".encode("latin-1"), "byte 0xe9 at offset 29"),
    ],
    ids=["utf-16", "utf-16 without a byte order mark", "one latin-1 byte"],
)
def test_a_split_file_in_another_encoding_is_named_with_what_to_do(tmp_path: Path, encoded: bytes, why: str) -> None:
    path = tmp_path / "trainval.txt"
    path.write_bytes(encoded)
    with pytest.raises(DatasetError) as error:
        read_names(path)
    message = str(error.value)
    assert "trainval.txt" in message and why in message and "save it as UTF-8" in message


# ----------------------------------------------------------------------------- leakage, repeats, fingerprints


def test_a_test_image_in_trainval_stops_the_run_with_its_names(tiny_pets: Path) -> None:
    test_names = read_names(tiny_pets / "annotations" / "test.txt")
    trainval = tiny_pets / "annotations" / "trainval.txt"
    write_lines(trainval, [*read_names(trainval), test_names[2], test_names[0]])
    with pytest.raises(DatasetError) as error:
        oxford_pet.check_split_overlap(tiny_pets)
    message = str(error.value)
    assert f"2 names ({test_names[2]}, {test_names[0]}) are in both" in message
    assert "trainval.txt" in message and "test.txt" in message and "remove the extra lines" in message


def test_a_name_twice_in_a_split_file_is_reported(tiny_pets: Path) -> None:
    test = tiny_pets / "annotations" / "test.txt"
    names = read_names(test)
    write_lines(test, [*names, names[1]])
    with pytest.raises(DatasetError, match=rf"test.txt lists 1 name \({names[1]}\) more than once"):
        oxford_pet.check_split_overlap(tiny_pets)


def test_splits_kept_apart_pass(tiny_pets: Path) -> None:
    oxford_pet.check_split_overlap(tiny_pets)


def test_the_split_fingerprint_sees_names_not_only_counts(tiny_pets: Path) -> None:
    before = oxford_pet.split_fingerprint(tiny_pets)
    assert {split: fp["images"] for split, fp in before.items()} == {"train": 10, "valid": 2, "test": 3}
    assert oxford_pet.split_fingerprint(tiny_pets) == before and oxford_pet.split_differences(before, before) == []

    # One line moved to the top: the same images, but every line's train/valid place shifts by one.
    trainval = tiny_pets / "annotations" / "trainval.txt"
    names = read_names(trainval)
    write_lines(trainval, [names[-1], *names[:-1]])
    after = oxford_pet.split_fingerprint(tiny_pets)
    assert {split: fp["images"] for split, fp in after.items()} == {"train": 10, "valid": 2, "test": 3}
    assert oxford_pet.split_differences(before, after) == [
        "the train split has the same number of images (10) but other names or another order",
        "the valid split has the same number of images (2) but other names or another order",
    ]
    write_lines(trainval, [*names, "extra_1"])
    changed = oxford_pet.split_differences(before, oxford_pet.split_fingerprint(tiny_pets))
    assert changed[0] == "the train split had 10 images and now has 11"


def test_the_dataset_record_holds_the_resolved_folder(tiny_pets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_pets.parent)
    record = oxford_pet.dataset_record(Path(tiny_pets.name))
    assert record == {"path": str(tiny_pets.resolve()), "splits": oxford_pet.split_fingerprint(tiny_pets)}


# ----------------------------------------------------------------------------- evaluate.py and inference.py


@pytest.mark.parametrize("script", [evaluate, inference])
def test_a_mistyped_data_path_never_starts_a_download(
    script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run(tmp_path / "run")
    typo = tmp_path / "oxford-iiit-pte"
    monkeypatch.setattr(oxford_pet, "_download", lambda path: pytest.fail(f"a download into {path} began"))
    with pytest.raises(DatasetError) as error:
        script.main(["-m", str(run_dir), "--data_path", str(typo), "--device", "cpu", "--num-workers", "0"])
    assert f"--data_path {oxford_pet.display_path(typo)}: no dataset there (no such folder)" in str(error.value)
    assert not typo.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["-b", "0"], "-b/--batch_size"), (["-b", "-3"], "-b/--batch_size"), (["--num-workers", "-1"], "--num-workers")],
)
@pytest.mark.parametrize("script", ["evaluate", "inference"])
def test_numeric_flags_are_usage_errors_before_anything_is_made(
    script: str, flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = write_run(tmp_path / "run")
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    Image.new("RGB", (40, 30)).save(photos / "cat.jpg")
    own_images = ["--input", str(photos), "--output", str(masks)] if script == "inference" else []
    with pytest.raises(SystemExit) as exit_info:
        {"evaluate": evaluate, "inference": inference}[script].main(
            ["-m", str(run_dir), *own_images, "--device", "cpu", *flags]
        )
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not masks.exists()


# ----------------------------------------------------------------------------- the printed resume command

AWKWARD_RUN = "saved models/it's a \"$HOME\" `run` & ü; *"


@pytest.mark.parametrize(
    "processes",
    [Processes(), Processes(world_size=2, local_world_size=2, launched=True)],
    ids=["python", "torchrun"],
)
def test_the_printed_resume_command_gives_back_the_exact_paths(processes: Processes) -> None:
    script = "my scripts/$train's.py"
    words = shlex.split(processes.resume_command(script, AWKWARD_RUN))
    assert words[-3:] == [script, "--resume", AWKWARD_RUN]
    assert words[0] == ("torchrun" if processes.launched else "python")


def test_on_windows_the_resume_command_is_double_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.os, "name", "nt")
    command = Processes().resume_command(r"src\train.py", r"C:\saved models\run 1")
    assert command == r'python src\train.py --resume "C:\saved models\run 1"'


# ----------------------------------------------------------------------------- interrupts


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh Python with src/ importable: a signal sent there cannot hit the tests' own process."""
    env = {**os.environ, "PYTHONPATH": str(SRC), **environment}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_each_interrupt_exits_with_the_conventional_status() -> None:
    assert interrupts.exit_status(KeyboardInterrupt()) == 130  # Python's own Ctrl-C
    assert interrupts.exit_status(interrupts.Interrupted(signal.SIGINT)) == 130
    assert interrupts.exit_status(interrupts.Interrupted(signal.SIGTERM)) == 143
    assert interrupts.exit_status(signal.SIGTERM) == 143
    assert isinstance(interrupts.Interrupted(signal.SIGTERM), KeyboardInterrupt), "every Ctrl-C handler takes it"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
@pytest.mark.parametrize(("name", "status"), [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_mid_write_leaves_no_temporary_file_one_message_and_its_status(
    tmp_path: Path, name: str, status: int
) -> None:
    result = run_python(f"""
        import os, signal, sys
        from errors import run_script
        from files import atomic_write

        def main():
            with atomic_write(sys.argv[0] + "/last.pt") as file:
                file.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.{name})  # the moment it comes, injected
                file.write(b"the other half")

        sys.argv[0] = {str(tmp_path)!r}
        run_script(main)
    """)
    assert result.returncode == status, result.stderr
    assert result.stderr.strip().startswith("Interrupted by") and name in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "neither last.pt nor its temporary file"


def test_a_second_signal_while_the_temporary_file_is_removed_waits_for_it(tmp_path: Path) -> None:
    result = run_python(f"""
        import os, signal
        import files
        from errors import run_script

        real_remove = files.os.remove

        def remove_after_a_second_ctrl_c(path):
            os.kill(os.getpid(), signal.SIGINT)  # torchrun passing the terminal's Ctrl-C on
            real_remove(path)

        def main():
            with files.atomic_write({str(tmp_path / "best.pt")!r}) as file:
                file.write(b"weights")
                files.os.remove = remove_after_a_second_ctrl_c
                os.kill(os.getpid(), signal.SIGINT)

        run_script(main)
    """)
    assert result.returncode == 130, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_a_write_held_from_interrupts_holds_sighup_too(tmp_path: Path) -> None:
    result = run_python(f"""
        import os, signal
        from interrupts import Interrupted, sigint_deferred

        try:
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGHUP)
                open({str(tmp_path / "written")!r}, "w").close()
        except Interrupted as interrupt:
            print("raised after the block:", interrupt.signum == signal.SIGHUP)
    """)
    assert result.stdout.strip() == "raised after the block: True", result.stderr
    assert (tmp_path / "written").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_a_signal_the_user_chose_to_ignore_stays_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup python src/train.py` starts it
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with interrupts.interrupts_raised():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not sigterm
        assert signal.getsignal(signal.SIGTERM) is sigterm
    finally:
        signal.signal(signal.SIGHUP, previous)


# ----------------------------------------------------------------------------- text the terminal cannot show


def test_output_an_ascii_only_terminal_cannot_show_is_escaped_not_a_crash() -> None:
    result = run_python("""
        from errors import run_script
        run_script(lambda: print("saved_models/r\\u00fcn-\\u732b"))
    """, PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "saved_models/r\\xfcn-\\u732b"


# ----------------------------------------------------------------------------- big folders


def test_finding_20000_images_compares_no_path_with_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(20_000):
        (photos / f"IMG_{i:05d}.jpg").touch()
    (photos / "notes.txt").touch()
    monkeypatch.setattr(inference, "is_image", lambda path: path.suffix == ".jpg")
    comparisons = []
    real_eq = PurePath.__eq__

    def counted_eq(self: PurePath, other: object) -> bool:
        comparisons.append(1)
        # A list-membership test per file makes about n² / 2 = 2e8 of them; stop long before.
        assert len(comparisons) < 100_000, "finding images compares each file with every other: quadratic"
        return real_eq(self, other)

    with monkeypatch.context() as patch:  # undone before pytest, which compares paths too, reports a failure
        patch.setattr(PurePath, "__eq__", counted_eq)
        images = inference.find_images(photos, tmp_path / "masks")
    assert len(images) == 20_000 and images[0].name == "IMG_00000.jpg" and images[-1].name == "IMG_19999.jpg"
    assert len(comparisons) < 100
    err = capsys.readouterr().err
    assert "finding images" in err, "the search shows its progress"
    assert "skipping 1 file(s)" in err and "notes.txt" in err


def test_predicted_masks_are_not_flushed_to_the_disk_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = write_run(tmp_path / "run")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 30), "orange").save(photos / f"{name}.jpg")
    synced = []
    monkeypatch.setattr(files.os, "fsync", synced.append)
    inference.main(["-m", str(run_dir), "--input", str(photos), "--output", str(tmp_path / "masks"),
                    "--device", "cpu", "--num-workers", "0"])
    assert synced == []
    assert sorted(path.name for path in (tmp_path / "masks").iterdir()) == [
        f"{name}{suffix}" for name in ("a", "b", "c") for suffix in ("_mask.png", "_overlay.png")
    ]


# ----------------------------------------------------------------------------- any text the user types

MATH_LOOKING = "lr_$10^$"  # matplotlib would read `$10^$` as math, and fail to draw it: a superscript of nothing


def finished_run(folder: Path, dataset: dict | None = None, data_path: str | None = None) -> Path:
    """write_run's run, its results.json holding oxford_pet.dataset_record's `dataset`, or flags with --data_path."""
    write_run(folder)
    results = json.loads((folder / "results.json").read_text())
    if dataset is not None:
        results["dataset"] = dataset
    if data_path is not None:
        results["args"] = {"data_path": data_path}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def table_rows(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in out.splitlines()[2:] if line[:1] == "|"]


def test_runs_with_math_looking_names_go_through_the_figure_and_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = finished_run(tmp_path / MATH_LOOKING, data_path="/data/pets")
    second = finished_run(tmp_path / "_ü \"quoted\" | piped", data_path="/data/pets")
    compare.main([str(first), str(second), "-o", str(tmp_path / "comparison.png")])
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == [MATH_LOOKING, '_ü "quoted" \\| piped']
    assert (tmp_path / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_the_figure_legend_names_every_run_as_typed() -> None:
    history = [{"epoch": 1, "train_loss": 1.0, "train_dice": 0.5, "valid_loss": 1.0, "valid_dice": 0.5}]
    figure = plots.learning_curves_figure([(MATH_LOOKING, history), ("_starts_with_underscore", history)])
    try:
        legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        assert legend[:2] == [MATH_LOOKING, "_starts_with_underscore"]
    finally:
        plt.close(figure)


def test_test_image_captions_are_drawn_as_typed(tmp_path: Path) -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    plots.plot_cases([(f"heading {MATH_LOOKING}", [plots.Case(image, mask, mask, MATH_LOOKING)])],
                     tmp_path / "cases.png", title=MATH_LOOKING)
    assert (tmp_path / "cases.png").is_file()


def test_a_figure_that_fails_is_a_warning_not_a_lost_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_font(*args, **kwargs) -> None:
        raise RuntimeError("no font could be loaded")

    monkeypatch.setattr(plt.Figure, "savefig", no_font)
    history = [{"epoch": 1, "train_loss": 1.0, "train_dice": 0.5, "valid_loss": 1.0, "valid_dice": 0.5}]
    open_before = plt.get_fignums()
    assert plots.plot_learning_curves_or_warn([("r", history)], tmp_path / "curves.png", title="unet") is False
    err = capsys.readouterr().err
    assert err.startswith("warning: could not draw") and "curves.png" in err and "no font could be loaded" in err
    assert plt.get_fignums() == open_before and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert plots.plot_learning_curves_or_warn([("r", history)], tmp_path / "curves.png", title="unet") is True


def test_text_files_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    result = run_python(f"""
        import json
        from files import atomic_write

        with atomic_write({str(tmp_path / "test_dice.csv")!r}, "w") as file:
            file.write("name,dice\\r\\nchat_\\u00e9t\\u00e9,0.9\\r\\n")
    """, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "test_dice.csv").read_bytes() == "name,dice\r\nchat_été,0.9\r\n".encode()


# ----------------------------------------------------------------------------- compare.py: datasets and labels


def test_two_runs_of_one_name_get_labels_that_tell_them_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = finished_run(tmp_path / "lab" / "r", data_path="/data/pets")
    second = finished_run(tmp_path / "home" / "r", data_path="/data/pets")
    compare.main([str(first), str(second), "-o", str(tmp_path / "comparison.png")])
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["lab/r", "home/r"]
    assert compare.unique_names([Path("x/a/r"), Path("y/a/r"), Path("b")]) == ["x/a/r", "y/a/r", "b"]


def test_runs_of_different_datasets_are_refused_unless_allowed_and_then_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = finished_run(tmp_path / "pets", data_path="/data/oxford-iiit-pet")
    second = finished_run(tmp_path / "synthetic", data_path="/tmp/syn")
    figure = tmp_path / "comparison.png"
    with pytest.raises(PetsegError) as error:
        compare.main([str(first), str(second), "-o", str(figure)])
    message = str(error.value)
    assert "pets and synthetic were trained on different datasets" in message and "/tmp/syn" in message
    assert "--allow-mixed-datasets" in message and not figure.exists()

    compare.main([str(first), str(second), "-o", str(figure), "--allow-mixed-datasets"])
    out, err = capsys.readouterr()
    assert [row[-1] for row in table_rows(out)] == ["/data/oxford-iiit-pet", "/tmp/syn"]
    assert "trained on different datasets" in err and figure.exists()


def test_a_recorded_split_fingerprint_tells_datasets_apart_wherever_they_lie(
    tmp_path: Path, tiny_pets: Path, capsys: pytest.CaptureFixture
) -> None:
    record = oxford_pet.dataset_record(tiny_pets)
    moved = {**record, "path": "/elsewhere/oxford-iiit-pet"}  # the same split files, copied to another machine
    changed = {**record, "splits": {**record["splits"], "test": {"images": 3, "sha256": "0" * 64}}}
    same = [finished_run(tmp_path / "a", record), finished_run(tmp_path / "b", moved)]
    compare.main([*map(str, same), "-o", str(tmp_path / "one.png")])
    assert "different datasets" not in capsys.readouterr().err
    with pytest.raises(PetsegError, match="different datasets"):
        compare.main([str(same[0]), str(finished_run(tmp_path / "c", changed)), "-o", str(tmp_path / "two.png")])


def test_a_run_that_does_not_record_its_dataset_says_unknown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    known = finished_run(tmp_path / "known", data_path="/data/pets")
    old = write_run(tmp_path / "old")
    compare.main([str(known), str(old), "-o", str(tmp_path / "comparison.png")])
    out, err = capsys.readouterr()
    assert [row[-1] for row in table_rows(out)] == ["/data/pets", "unknown"]
    assert "old does not record the dataset" in err


def test_compare_output_survives_an_ascii_only_terminal(tmp_path: Path) -> None:
    runs = [finished_run(tmp_path / name, data_path="/data/pets") for name in ("r\u00fcn_1", "r\u00fcn_2")]
    result = subprocess.run(
        [sys.executable, str(SRC / "compare.py"), *map(str, runs)], capture_output=True, text=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONWARNINGS": "ignore"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| r\\xfcn_1 |" in result.stdout


# ----------------------------------------------------------------------------- one live process per run folder


def test_a_second_process_is_refused_a_run_folder_with_the_owners_process_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "saved models" / "r"
    second = f"""
        from pathlib import Path
        from errors import run_script
        from locks import run_lock

        def main():
            with run_lock(Path({str(run_dir)!r})):
                print("trained into it")

        run_script(main)
    """
    with locks.run_lock(run_dir):
        refused = run_python(second)
    assert refused.returncode == 1 and "trained into it" not in refused.stdout
    assert refused.stderr.startswith("error: ") and "being written by another live process" in refused.stderr
    assert f"(process id {os.getpid()})" in refused.stderr and "--run-name" in refused.stderr
    assert not locks.lock_path(run_dir).exists(), "released"
    assert run_python(second).stdout == "trained into it\n"


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_the_lock_of_a_killed_run_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    killed = run_python(f"""
        import os, signal
        from pathlib import Path
        from locks import run_lock

        with run_lock(Path({str(run_dir)!r})):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert killed.returncode == -signal.SIGKILL
    stale = locks.lock_path(run_dir)
    assert stale.read_text().strip().isdigit(), "the killed run's process id is still there"
    with locks.run_lock(run_dir):
        assert stale.read_text() == f"{os.getpid()}\n"
    assert not stale.exists()
