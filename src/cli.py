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


def positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    """argparse type: a number of `kind` (int or float) > 0."""

    def parse(text: str) -> N:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in "invalid int value: 'x'"
    return parse


def non_negative(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def ema_decay(text: str) -> float:
    """argparse type: 0 (off) or a decay in (0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or between 0 and 1, e.g. 0.999; got {text}")
    return value


def at_least(minimum: int, reason: str) -> Callable[[str], int]:
    """argparse type: a whole number >= minimum; `reason`, in the usage error, says why."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more ({reason}), got {text}")
        return value

    parse.__name__ = "int"
    return parse


image_size = at_least(32, "the encoders downsample 32x")


def shell_command(words: list[str]) -> str:
    """`words` as one command line that the user's shell splits back into exactly these words: paths with
    spaces, `$`, quotes or non-ASCII letters are quoted (POSIX shells; on Windows, cmd's double quotes)."""
    if os.name == "nt":
        return subprocess.list2cmdline(words)
    return shlex.join(words)
