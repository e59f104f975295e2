"""argparse types for numbers with a range: a wrong one is a one-line usage error (exit 2)
before anything runs, never a QEMU or QMP failure later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type[int] | type[float], low: float, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (value == low and not inclusive):
            word = "0 or more" if inclusive else "more than 0"
            raise argparse.ArgumentTypeError(f"{text} must be {word}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """A number above zero (a timeout of 0 or -5 is a typo, not a deadline)."""
    return _number(kind, 0, inclusive=False)


def non_negative(kind: type[int] | type[float]) -> Callable[[str], float]:
    return _number(kind, 0, inclusive=True)
