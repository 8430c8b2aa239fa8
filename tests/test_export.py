"""export.py: the ONNX file computes what the checkpoint's model does, at any batch and size, and is
written only when it does; bad inputs and missing packages are clear errors."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import checkpoint as ckpt
import export
from errors import PetsegError, run_script
from models import build_model
from oxford_pet import IMAGENET_MEAN

TRAINING_SIZE = 64
# Neither is the training size; one has a batch of two and H != W.
OTHER_SHAPES = [(2, 3, 32, 96), (1, 3, 128, 64)]
RECIPES = {
    "resnet34_unet": {"full_resolution_skip": True, "decoder_channels": (64, 32, 16, 16, 8), "deep_supervision": True},
    "unet": {"base_channels": 8, "deep_supervision": True},
}


def skip_without_export_packages() -> None:
    """Skip, saying what to install, where the export packages are absent (the error tests below run anyway)."""
    for name in export.EXPORT_PACKAGES:
        pytest.importorskip(name, reason=f"ONNX export needs {name}: pip install -r {export.REQUIREMENTS_FILE}")


def save_tiny_checkpoint(path: Path, network: str, seed: int = 0) -> Path:
    """An untrained checkpoint whose eval-mode logits look like a trained model's: BatchNorm statistics
    from one batch, and the head scaled so the logits reach about ±10 (untrained ResNet34 ones reach ±200)."""
    torch.manual_seed(seed)
    model = build_model(network, **RECIPES[network]).train()
    with torch.no_grad():
        model(torch.randn(4, 3, TRAINING_SIZE, TRAINING_SIZE))
        largest = model.eval()(torch.randn(2, 3, TRAINING_SIZE, TRAINING_SIZE)).abs().max()
        for parameter in model.head.parameters():
            parameter.mul_(10 / largest)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(
        path, network=network, model_kwargs=RECIPES[network], model_state=model.state_dict(),
        image_size=TRAINING_SIZE, mean=list(IMAGENET_MEAN), std=[0.5, 0.25, 0.2], epoch=3, valid_dice=0.75,
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    """Each network's tiny run, exported once, as (checkpoint, ONNX file, what export.py printed): one to
    the default path (the run folder's best.onnx), the other to an --output in a folder not made yet."""
    skip_without_export_packages()
    folder = tmp_path_factory.mktemp("runs")
    resnet = save_tiny_checkpoint(folder / "resnet" / "best.pt", "resnet34_unet")
    unet = save_tiny_checkpoint(folder / "unet" / "best.pt", "unet")
    elsewhere = folder / "elsewhere" / "unet.onnx"
    runs = {
        "resnet34_unet": (resnet, resnet.parent / "best.onnx", ["-m", str(resnet.parent)]),
        "unet": (unet, elsewhere, ["-m", str(unet), "--output", str(elsewhere)]),
    }
    results = {}
    for network, (checkpoint_path, onnx_path, argv) in runs.items():
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            export.main(argv)
        results[network] = (checkpoint_path, onnx_path, printed.getvalue())
    return results


@pytest.mark.parametrize("network", RECIPES)
def test_onnx_gives_the_checkpoints_logits_at_other_batches_and_sizes(exported: dict, network: str) -> None:
    import onnxruntime

    checkpoint_path, onnx_path, _ = exported[network]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = ckpt.model_from_checkpoint(ckpt.load_checkpoint(checkpoint_path))
    generator = torch.Generator().manual_seed(1)
    for shape in OTHER_SHAPES:
        images = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(images)
        (logits,) = session.run(["logits"], {"image": images.numpy()})
        assert logits.shape == (shape[0], 1, *shape[2:])
        assert float((torch.from_numpy(logits) - expected).abs().max()) <= 1e-4
    assert [input.shape for input in session.get_inputs()] == [["batch", 3, "height", "width"]]
    assert len(session.get_outputs()) == 1  # the deep-supervision heads are training-only


def test_the_file_tells_deployment_code_how_to_prepare_a_photo(exported: dict) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported["unet"][1]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["network"], meta["image_size"], meta["input_size"]) == ("unet", "64", "64")
    assert json.loads(meta["mean"]) == list(IMAGENET_MEAN) and json.loads(meta["std"]) == [0.5, 0.25, 0.2]
    assert json.loads(meta["model_kwargs"]) == RECIPES["unet"]


def test_the_printout_says_what_was_written_and_how_to_feed_it(exported: dict) -> None:
    printed = exported["unet"][2]
    assert printed.startswith("Wrote ") and "unet.onnx (" in printed.splitlines()[0]
    for words in ("(N, 3, H, W)", "multiples of 32", "(N, 1, H, W)", "logit > 0", "64×64", "std (0.5, 0.25, 0.2)"):
        assert words in printed
    assert "ONNX opset 18" in printed and "without the deep-supervision heads" in printed
    assert "max |difference|" in printed


def test_an_existing_file_is_kept_unless_overwrite_is_given(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    checkpoint = save_tiny_checkpoint(tmp_path / "run" / "best.pt", "unet")
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"the user's own file")
    with pytest.raises(PetsegError, match="already exists; nothing was written. Pass --overwrite"):
        export.main(["-m", str(checkpoint), "--output", str(mine)])
    assert mine.read_bytes() == b"the user's own file"
    proto = onnx.load(str(exported["unet"][1]))
    monkeypatch.setattr(export, "export_model", lambda *args: proto)
    export.main(["-m", str(checkpoint), "--output", str(mine), "--overwrite"])
    assert onnx.load(str(mine)).graph.input[0].name == "image"


def test_an_export_that_disagrees_with_pytorch_writes_nothing(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    other_seed = save_tiny_checkpoint(tmp_path / "run" / "best.pt", "unet", seed=1)
    proto = onnx.load(str(exported["unet"][1]))  # seed 0's model: the check must catch it
    monkeypatch.setattr(export, "export_model", lambda *args: proto)
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(b"an earlier export")
    with pytest.raises(PetsegError, match="onnxruntime and PyTorch disagree .* nothing was written"):
        export.main(["-m", str(other_seed), "--output", str(kept), "--overwrite"])
    assert kept.read_bytes() == b"an earlier export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.onnx", "run"]


@pytest.mark.parametrize(
    "given, expected",
    [("missing.pt", "no checkpoint at"), ("empty_run", "no checkpoint at"), ("notes.pt", "it is a text file")],
)
def test_a_model_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path, given: str, expected: str) -> None:
    skip_without_export_packages()  # they are checked first
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=expected):
        export.main(["-m", str(tmp_path / given)])
    assert not list(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize(
    "flags, expected",
    [(["--output", "best.pt"], "--output best.pt must end in .onnx"), (["--opset", "17"], "must be 18 or more")],
)
def test_flag_errors_say_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture, flags, expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export.main(["-m", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_missing_export_packages_are_one_error_line_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "run" / "best.pt", "unet")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` does when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: export.main(["-m", str(checkpoint)]))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert "onnxruntime" in error and "pip install -r requirements-export.txt" in error
    assert not list(tmp_path.rglob("*.onnx"))


def test_a_torch_without_the_exporter_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.5.1"))
    with pytest.raises(PetsegError, match="needs torch 2.6 or newer .* this is torch 2.5.1"):
        export.main(["-m", str(tmp_path)])


def test_help_says_what_the_file_takes_and_what_to_install(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for words in ("--model", "--output", "--overwrite", "multiples of 32", "pip install -r requirements-export.txt"):
        assert words in help_text
