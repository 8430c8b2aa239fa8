"""Command-line conventions of every script: each default shown once in --help, and no abbreviated flags."""

from __future__ import annotations

import argparse


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
