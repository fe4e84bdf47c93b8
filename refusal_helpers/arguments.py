"""Value types for the command lines (`python -m refusal_helpers`, `python -m refusal_helpers.organism`): each
turns one argument into a value or gives argparse a one-line message naming what was expected."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive(value: str, alternative: str = "", minimum: int = 1) -> int:
    """A whole number >= `minimum` (1 unless said otherwise)."""
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise argparse.ArgumentTypeError(f"expected a positive whole number{' ' + alternative if alternative else ''}, got {value!r}")
    return n


def n_or_all(value: str) -> int | None:
    """A positive whole number, or 'all' (None)."""
    return None if value == "all" else positive(value, "or 'all'")


def count(value: str) -> int:
    """A whole number >= 0."""
    return positive(value, "or 0", minimum=0)


def finite(value: str) -> float:
    """A finite number (JSON cannot hold inf or NaN, and no threshold needs them)."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number (e.g. 1e9 for 'no limit'), got {value!r}")
    return x


def positive_finite(value: str) -> float:
    """A finite number > 0 (a learning rate)."""
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not 0 < x < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return x


def non_negative(value: str) -> float:
    """A finite number >= 0 (a loss weight)."""
    x = finite(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return x


def fraction(value: str) -> float:
    """A number in [0, 1] (a share of the training steps)."""
    x = finite(value)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return x


def layers(value: str) -> list[int]:
    """Layers as 'a-b' (inclusive) or 'a,b,c'."""
    try:
        if "-" in value:
            first, last = (int(x) for x in value.split("-"))
            chosen = list(range(first, last + 1))
        else:
            chosen = [int(x) for x in value.split(",")]
    except ValueError:
        chosen = []
    if not chosen or min(chosen) < 0:
        raise argparse.ArgumentTypeError(f"expected layers as 'first-last' or 'a,b,c' (0 or more), got {value!r}")
    return chosen


def folder(value: str) -> Path:
    """An existing folder."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {value!r}")
    return path
