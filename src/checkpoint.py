"""Self-describing checkpoints: everything inference needs, saved atomically and loaded without pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from errors import PetsegError
from files import atomic_write
from models import MODEL_NAMES, build_model

FORMAT = "petseg-checkpoint"
FORMAT_VERSION = 1
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"  # the end of the latest epoch, with everything --resume needs
REQUIRED_KEYS = ("network", "model_kwargs", "model_state", "image_size", "mean", "std", "epoch", "valid_dice")
# How torch.save's files start: a zip archive, or (the legacy format) a pickle's PROTO opcode.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"
FILE_KINDS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF"}


class CheckpointError(PetsegError):
    """A checkpoint file that cannot be used: missing, damaged, of another format, or for another network."""


def save_checkpoint(path: Path, **contents: Any) -> None:
    """Save tensors and plain types only (so `weights_only=True` can load it), atomically."""
    missing = [key for key in REQUIRED_KEYS if key not in contents]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    with atomic_write(Path(path)) as file:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **contents}, file)


def resolve_checkpoint_path(path: Path, name_in_folder: str = BEST_NAME) -> Path:
    """A checkpoint file, or a run folder holding `name_in_folder`."""
    path = Path(path)
    if path.is_dir():
        path = path / name_in_folder
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}. Pass a .pt file or a run folder from saved_models/.")
    return path


def describe_file_start(head: bytes) -> str:
    """What a file that is no torch file seems to be, from its first bytes."""
    if not head:
        return "empty"
    for magic, kind in FILE_KINDS.items():
        if head.startswith(magic):
            return kind
    if all(byte in b"\t\n\r" or 32 <= byte < 127 for byte in head):
        return "a text file"
    return "a file of another kind"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a checkpoint (or a run folder's best.pt); unpickles nothing but tensors and plain types."""
    path = resolve_checkpoint_path(path)
    with open(path, "rb") as file:
        head = file.read(8)
    # torch.load's weights_only error would misreport any other file as one holding code.
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        raise CheckpointError(
            f"{path} is not a readable checkpoint: it is {describe_file_start(head)}, not a torch .pt file. Pass a "
            f"checkpoint that train.py wrote (saved_models/RUN/{BEST_NAME} or {LAST_NAME}), or its run folder."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError... for damaged files
        if isinstance(error, pickle.UnpicklingError) and "weights_only" in str(error).replace(" ", "_").lower():
            raise CheckpointError(
                f"{path} is refused: it holds objects other than tensors and plain types, and loading those could "
                "run code. Only load checkpoints written by petseg's train.py, from people you trust."
            ) from error
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, or not a torch file): "
            f"{type(error).__name__}: {first_line}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a petseg checkpoint (no '{FORMAT}' marker).")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {checkpoint.get('format_version')}; this code reads version "
            f"{FORMAT_VERSION}. Use the petseg version that wrote it."
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing or checkpoint["network"] not in MODEL_NAMES:
        raise CheckpointError(f"{path} is damaged: missing {missing} or unknown network {checkpoint.get('network')!r}.")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's network with its weights, in eval mode, on the CPU."""
    model = build_model(checkpoint["network"], **checkpoint["model_kwargs"])
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()
