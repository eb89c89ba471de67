"""Command-line flags are given in full: an abbreviation is refused, naming the flag it would have meant.

argparse (and transformers' `HfArgumentParser`, built on it) accepts any unambiguous prefix of a long flag by
default: `--learning_r 0.5` sets `learning_rate`. A tool that also reads the typed flags to learn what the user
gave (hive-train's `explicit_flags`, the `--deepspeed` handling) would not see `--learning_rate` and overwrite the
user's value with a default. Every command-line tool of the project therefore parses with `allow_abbrev=False`
(`FullFlagParser`, or `refuse_abbreviations` before a parser it does not build) and refuses an abbreviation with
a message that names the full flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--flag` the parser knows (aliases included)."""
    return {
        option
        for action in parser._actions  # argparse keeps its actions here; no public accessor
        for option in action.option_strings
        if option.startswith("--")
    }


def abbreviation_error(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The refusal for the first abbreviated flag in `argv` (None when every flag is given in full). Flags that
    are no prefix of a known one are left to the parser ("unrecognized arguments")."""
    known = long_flags(parser)
    for arg in argv:
        if arg == "--":  # what follows is positional
            return None
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name in known:
            continue
        meant = sorted(flag for flag in known if flag.startswith(name))
        if meant:
            choices = " or ".join(meant[:4]) + (" or ..." if len(meant) > 4 else "")
            return f"{name} is an abbreviation: give the full flag ({choices}); abbreviated flags are refused"
    return None


def refuse_abbreviations(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A `ValueError` naming the full flag when `argv` abbreviates one of `parser`'s flags."""
    message = abbreviation_error(parser, argv)
    if message is not None:
        raise ValueError(message)


class FullFlagParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that refuses abbreviated long flags (exit status 2, the full flag named)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        message = abbreviation_error(self, args)
        if message is not None:
            self.error(message)
        return super().parse_known_args(args, namespace)
