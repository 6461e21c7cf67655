"""What every vigface console script shares: argument types and the one-line error exit."""

from __future__ import annotations

import argparse
import sys

from vigface.errors import VigfaceError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def run_command(prog: str, func, args) -> int:
    """Run func(args); a VigfaceError becomes `prog: error: ...` and exit status 2, Ctrl-C 130."""
    try:
        return func(args)
    except VigfaceError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
