"""Command-line conventions of every script: each default shown once in --help, no abbreviated flags, numbers
checked as they are parsed, and commands printed so that they paste into the user's shell as they are."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` only where it tells the reader something: not when the help already
    describes the default, nor for required flags, defaults of None, or switches that take no value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        # A store_true/store_false switch's default is just "not given"; a --x/--no-x pair's default matters.
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if "default" in help_text.lower() or action.required or action.default is None or switch:
            return help_text
        return super()._get_help_string(action)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A parser with HelpFormatter and without prefix matching, which would take `--epoch` for `--epochs`."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)


# argparse types: a bad number stops the script with a usage error (exit 2) before it reads or writes anything,
# rather than failing deep inside PyTorch after an output folder was made.


def _bounded(kind: Callable[[str], N], accepts: Callable[[N], bool], requirement: str) -> Callable[[str], N]:
    """argparse type: a number of `kind` that `accepts` (a comparison: nan fails it), else a usage error."""

    def parse(text: str) -> N:
        value = kind(text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in "invalid int value: 'x'"
    return parse


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """argparse type: a number of `kind` (int or float) > 0."""
    return _bounded(kind, lambda value: value > 0, "> 0")


def at_least(minimum: int, reason: str) -> Callable[[str], int]:
    """argparse type: a whole number >= minimum; `reason`, in the usage error, says why."""
    return _bounded(int, lambda value: value >= minimum, f"{minimum} or more ({reason})")


non_negative = _bounded(int, lambda value: value >= 0, "0 or more")
non_negative_float = _bounded(float, lambda value: value >= 0, "0 or more")
ema_decay = _bounded(float, lambda value: 0 <= value < 1, "0 (off) or between 0 and 1 (e.g. 0.999)")
image_size = at_least(32, "the encoders downsample 32x")


def shell_command(words: list[str]) -> str:
    """`words` as one command line that the user's shell splits back into exactly these words: paths with
    spaces, `$`, quotes or non-ASCII letters are quoted (POSIX shells; on Windows, cmd's double quotes)."""
    if os.name == "nt":
        return subprocess.list2cmdline(words)
    return shlex.join(words)
