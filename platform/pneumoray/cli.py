"""What every entry point shares: the profile and its overrides, and friendly failure."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from .profiles import load_profile


def add_profile_args(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    parser.add_argument("--profile", default=default, help="tiny, rtx3090 or a path to a YAML profile (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set train.lr=1e-4 (repeatable)")


def profile_from(args: argparse.Namespace) -> dict:
    return load_profile(args.profile, args.overrides)


@contextmanager
def user_errors():
    """Bad input ends the command with its message and exit status 2, not a traceback."""
    from .data.images import ImageError
    from .data.labels import LabelSetError
    from .data.manifest import DataError
    from .profiles import ProfileError

    try:
        yield
    except (DataError, LabelSetError, ProfileError, ImageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
