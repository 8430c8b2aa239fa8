"""Export a checkpoint's model to ONNX, to run it where PyTorch is not installed.

    python src/export.py -m saved_models/RUN                        # writes saved_models/RUN/best.onnx
    python src/export.py -m saved_models/RUN/last.pt --output pets.onnx

The model in eval mode, its inputs' size, mean and std in the file's metadata; nothing is written unless
onnxruntime agrees with PyTorch. It prints how to feed the model; see docs/predicting.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint_path
from cli import argument_parser, at_least
from errors import PetsegError, display_path, run_script
from files import atomic_write

EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
REQUIREMENTS_FILE = "requirements-export.txt"
MIN_TORCH = "2.6"  # the first whose torch.onnx.export has dynamo=True with dynamic_shapes and model_proto
# Sizes the exported graph is right at for both networks. UNet is traced at a size that halves evenly,
# so its padding of sizes that do not is not in the graph (right at multiples of 16); ResNet34-UNet's
# graph is right at any size, and 32 is its stride.
SIZE_MULTIPLE = 32
# The oldest opset the exporter writes without converting down (conversion can fail or change ops).
MIN_OPSET = 18
# Float32 kernels round differently; the difference grows with the logits' size, so the limit does too.
RELATIVE_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "image", "logits"
Agreement = tuple[tuple[int, ...], float, float]  # (input shape, max |ONNX - PyTorch|, max |logit|)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(
        "Export a petseg checkpoint's model to ONNX (eval mode, without training-only heads) with free batch size, "
        f"height and width (height and width multiples of {SIZE_MULTIPLE}), check it with onnxruntime against "
        f"PyTorch, and print how to feed it. Needs: pip install -r {REQUIREMENTS_FILE}"
    )
    parser.add_argument(
        "-m", "--model", type=Path, required=True,
        help="a checkpoint train.py wrote (.pt), or its run folder (which means the folder's best.pt)",
    )
    parser.add_argument(
        "--output", type=Path, default=None,
        help="the .onnx file to write (default: beside the checkpoint, named after it: best.pt -> best.onnx)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists instead of refusing")
    parser.add_argument(
        "--opset", type=at_least(MIN_OPSET, "older opsets need a lossy conversion"), default=MIN_OPSET,
        help=f"ONNX operator set version; the default {MIN_OPSET} is read by onnxruntime 1.14+ and most runtimes",
    )
    args = parser.parse_args(argv)
    if args.output is not None and args.output.suffix != ".onnx":
        parser.error(f"--output {args.output} must end in .onnx (which also keeps it from replacing a checkpoint)")
    return args


def require_export_packages() -> None:
    """The exporter and the check need onnx, onnxscript and onnxruntime, which petseg's training does not,
    and a torch with the torch.export-based exporter."""
    if torch.__version__ < MIN_TORCH:
        raise PetsegError(
            f"ONNX export needs torch {MIN_TORCH} or newer (its torch.export-based exporter); this is torch "
            f"{torch.__version__}. Upgrade it with: pip install --upgrade torch torchvision"
        )
    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PetsegError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install the export packages with: pip install -r {REQUIREMENTS_FILE}"
        )


def refuse_existing(output: Path, overwrite: bool) -> None:
    """An existing file at `output` is replaced only with --overwrite; a folder never."""
    if output.is_dir():
        raise PetsegError(f"--output {output} is a folder; give a file name ending in .onnx.")
    if output.exists() and not overwrite:
        raise PetsegError(
            f"{display_path(output)} already exists; nothing was written. Pass --overwrite to replace it, or choose "
            "another --output."
        )


def input_size(checkpoint: dict[str, Any]) -> int:
    """The square size photos are resized to: the checkpoint's, rounded up to a multiple of SIZE_MULTIPLE."""
    return math.ceil(checkpoint["image_size"] / SIZE_MULTIPLE) * SIZE_MULTIPLE


def export_model(model: nn.Module, size: int, opset_version: int) -> Any:
    """The ONNX ModelProto of `model`, traced at size x size, with batch, height and width left free."""
    free = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    try:
        program = torch.onnx.export(
            model, (torch.randn(1, 3, size, size),), dynamo=True, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=(free,), opset_version=opset_version, verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - the exporter raises many kinds; each is a failed export
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise PetsegError(
            f"torch.onnx could not export this model (torch {torch.__version__}): {type(error).__name__}: "
            f"{first_line}. Try another --opset, or report it with the checkpoint's network and model_kwargs."
        ) from error
    return program.model_proto


def metadata(checkpoint: dict[str, Any]) -> dict[str, str]:
    """What deployment code needs to prepare a photo and read the output, as ONNX metadata_props."""
    return {
        "network": checkpoint["network"],
        "model_kwargs": json.dumps(checkpoint["model_kwargs"]),
        "epoch": str(checkpoint["epoch"]),
        "valid_dice": f"{checkpoint['valid_dice']:.4f}",
        "image_size": str(checkpoint["image_size"]),
        "input_size": str(input_size(checkpoint)),
        "size_multiple": str(SIZE_MULTIPLE),
        "mean": json.dumps(list(checkpoint["mean"])),
        "std": json.dumps(list(checkpoint["std"])),
        "input": f"{INPUT_NAME}: float32 (N, 3, H, W), RGB in [0, 1] normalised with mean and std; "
        f"H and W multiples of {SIZE_MULTIPLE}",
        "output": f"{OUTPUT_NAME}: float32 (N, 1, H, W); pet where logit > 0",
    }


def compare_with_pytorch(onnx_bytes: bytes, model: nn.Module, size: int) -> list[Agreement]:
    """How close ONNX and PyTorch come on random inputs, of the photo size itself and a batch of two at another,
    non-square size; an error when they disagree."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    differences = []
    for shape in [(1, 3, size, size), (2, 3, size + SIZE_MULTIPLE, max(SIZE_MULTIPLE, size - SIZE_MULTIPLE))]:
        images = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        try:
            (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors share no base class but Exception
            raise PetsegError(
                f"onnxruntime could not run the exported model on input {shape}: {' '.join(str(error).split())}; "
                "nothing was written. Please report it with the checkpoint's network and model_kwargs."
            ) from error
        if logits.shape != expected.shape:
            raise PetsegError(
                f"the exported model gives logits of shape {logits.shape} for input {shape}, PyTorch {expected.shape}; "
                "nothing was written. Please report it with the checkpoint's network and model_kwargs."
            )
        difference, largest = float(abs(logits - expected).max()), float(abs(expected).max())
        limit = RELATIVE_TOLERANCE * max(1.0, largest)
        if not difference <= limit:
            raise PetsegError(
                f"onnxruntime and PyTorch disagree by up to {difference:.3g} on input {shape} (allowed {limit:.3g}); "
                "nothing was written. Try another --opset, or report it with the checkpoint's network."
            )
        differences.append((shape, difference, largest))
    return differences


def describe(output: Path, checkpoint: dict[str, Any], opset_version: int, differences: list[Agreement]) -> str:
    """What was written and how to feed it."""
    size, trained = input_size(checkpoint), checkpoint["image_size"]
    mean, std = (", ".join(f"{value:g}" for value in checkpoint[key]) for key in ("mean", "std"))
    resize = f"resize photos to {size}×{size}"
    if size != trained:
        resize += f" (trained at {trained}×{trained}, which is no multiple of {SIZE_MULTIPLE})"
    checks = ", ".join(
        f"{difference:.2g} at {'×'.join(map(str, shape))} (largest |logit| {largest:.3g})"
        for shape, difference, largest in differences
    )
    megabytes = output.stat().st_size / 1e6
    mode = "eval mode"
    if checkpoint["model_kwargs"].get("deep_supervision"):
        mode += " (without the deep-supervision heads, which only training uses)"
    return "\n".join([
        f"Wrote {display_path(output)} ({megabytes:.1f} MB, ONNX opset {opset_version}): {checkpoint['network']} "
        f"from epoch {checkpoint['epoch']} (valid Dice {checkpoint['valid_dice']:.4f}), {mode}",
        f"  input  {INPUT_NAME!r}: float32 (N, 3, H, W), N, H and W free, H and W multiples of {SIZE_MULTIPLE}; "
        f"RGB in [0, 1], normalised with mean ({mean}) and std ({std})",
        f"  output {OUTPUT_NAME!r}: float32 (N, 1, H, W); pet where logit > 0",
        f"  {resize}, and resize the logits back to each photo's size before thresholding",
        f"  onnxruntime vs PyTorch on random inputs, max |difference|: {checks}",
        "  image_size, input_size, mean and std are in the file's metadata "
        "(onnxruntime: session.get_modelmeta().custom_metadata_map)",
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_export_packages()
    import onnx

    checkpoint_path = resolve_checkpoint_path(args.model)
    checkpoint = load_checkpoint(checkpoint_path)
    output = args.output or checkpoint_path.with_suffix(".onnx")
    refuse_existing(output, args.overwrite)  # before the export's seconds, and again before writing
    model, size = model_from_checkpoint(checkpoint), input_size(checkpoint)
    proto = export_model(model, size, args.opset)
    onnx.helper.set_model_props(proto, metadata(checkpoint))
    onnx.checker.check_model(proto)
    onnx_bytes = proto.SerializeToString()
    differences = compare_with_pytorch(onnx_bytes, model, size)
    refuse_existing(output, args.overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output) as file:
        file.write(onnx_bytes)
    # What was written: the exporter keeps a newer opset where converting down to --opset fails.
    written_opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    print(describe(output, checkpoint, written_opset, differences))


if __name__ == "__main__":
    run_script(main)
