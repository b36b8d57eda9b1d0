"""argparse value types with range checks: a bad number is one ``error:`` line before any work starts.

Every numeric option of every command uses one of these, so NaN, inf and out-of-range values (a
negative count, or a size that would take hours or gigabytes) are refused by the parser itself::

    parser.add_argument("--layers", type=int_in(3, 256), default=24)
    parser.add_argument("--strength", type=float_in(0, 4096), required=True)

The error names the option (argparse adds it): ``argument --layers: must be an integer in [3, 256],
got '1000'``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _span(lo: float | None, hi: float | None, above: bool = False) -> str:
    """`` in [lo, hi]``, `` >= lo``, `` > lo``, ...: the allowed range in words (empty if unbounded)."""
    low = None if lo is None else f"{'>' if above else '>='} {lo:g}"
    if low and hi is not None:
        return f" {low} and <= {hi:g}" if above else f" in [{lo:g}, {hi:g}]"
    if low:
        return f" {low}"
    return f" <= {hi:g}" if hi is not None else ""


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (either bound may be None: open)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer{_span(lo, hi)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(
    lo: float | None = None, hi: float | None = None, *, above: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``above``: strictly greater than ``lo``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        ok = ok and (lo is None or (value > lo if above else value >= lo)) and (hi is None or value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number{_span(lo, hi, above)}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse
