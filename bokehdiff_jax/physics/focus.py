"""Focus resolution and radius sizing, shared by the classical renderer and the model's inference.

A user names the focus one of three ways (SPEC section 1): a disparity value ``d_f`` in [0, 1], a tapped
pixel (the median disparity in a small window around it) or a box (the median disparity inside it).
All of it is host-side NumPy on a ``[H, W]`` disparity map, never traced. Bad input raises
``InputError`` with a one-line message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bokehdiff_jax.errors import InputError

# Side of the square window around a tapped pixel, in pixels (odd, so the pixel is its centre).
TAP_WINDOW = 9


def parse_coords(text: str, n: int, flag: str) -> tuple[int, ...]:
    """``"320,240"`` -> ``(320, 240)``: ``n`` comma-separated numbers, rounded to integer pixels.

    ``flag`` names the option in the error message (e.g. ``"--focus-at"``).
    """
    try:
        values = tuple(int(round(float(p))) for p in text.split(","))
    except (ValueError, OverflowError):  # "abc", "nan" and "inf" all fail here
        values = ()
    if len(values) != n:
        raise InputError(f"{flag} expects {n} comma-separated numbers, got {text!r}")
    return values


def _window_median(disparity: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    h, w = np.shape(disparity)
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x0 >= x1 or y0 >= y1:
        raise InputError(f"focus region [{x0},{y0})-[{x1},{y1}) lies outside the {w}x{h} image")
    window = np.asarray(disparity)[y0:y1, x0:x1]
    window = window[np.isfinite(window)]
    if window.size == 0:
        raise InputError("focus region holds no finite disparity value")
    return float(np.median(window))


def focus_at(disparity: np.ndarray, x: int, y: int, window: int = TAP_WINDOW) -> float:
    """Tap-to-focus: the median disparity in a ``window x window`` box centred on pixel ``(x, y)``.

    ``disparity``: ``[H, W]``; ``x`` is the column, ``y`` the row. Non-finite values are ignored.
    """
    h, w = np.shape(disparity)
    if not (0 <= x < w and 0 <= y < h):
        raise InputError(f"focus point ({x}, {y}) is outside the {w}x{h} image")
    half = window // 2
    return _window_median(disparity, x - half, y - half, x + half + 1, y + half + 1)


def focus_in_box(disparity: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    """The median disparity inside the box ``[x0, x1) x [y0, y1)`` (columns, rows); clipped to the image."""
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"focus box {x0},{y0},{x1},{y1} is empty or inverted: need X0 < X1 and Y0 < Y1")
    return _window_median(disparity, x0, y0, x1, y1)


def resolve_focus(
    disparity: np.ndarray,
    *,
    value: float | None = None,
    at: Sequence[int] | None = None,
    box: Sequence[int] | None = None,
) -> float:
    """The focus disparity ``d_f`` from exactly one of ``value`` (in [0, 1]), ``at = (x, y)`` or
    ``box = (x0, y0, x1, y1)`` (pixels; columns then rows). ``disparity``: ``[H, W]`` in [0, 1]."""
    given = [k for k, v in (("value", value), ("at", at), ("box", box)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one focus (a value, a point or a box), got {given or 'none'}")
    if value is not None:
        if not (0.0 <= value <= 1.0):  # also rejects nan
            raise InputError(f"focus must be a disparity in [0, 1], got {value}")
        return float(value)
    if at is not None:
        x, y = at
        return focus_at(disparity, int(x), int(y))
    x0, y0, x1, y1 = box
    return focus_in_box(disparity, int(x0), int(y0), int(x1), int(y1))


def stack_focus(disparity: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` focus disparities of a focal stack, ``[n]`` float32: evenly spread from the scene's
    farthest (min) to its nearest (max) disparity; one image focuses midway. ``disparity``: ``[H, W]``."""
    if n < 1:
        raise InputError(f"focal stack needs n >= 1, got {n}")
    d = np.asarray(disparity, np.float32)
    lo, hi = np.float32(np.min(d)), np.float32(np.max(d))
    if n == 1:
        return np.asarray([(lo + hi) / np.float32(2)], np.float32)
    return np.linspace(lo, hi, n, dtype=np.float32)


def needed_radius(disparity: np.ndarray, focus: float | None, strength: float) -> int:
    """The largest CoC radius (whole pixels, rounded up) of a render: ``ceil(K max |d - d_f|)``.

    ``focus=None`` sizes for any focus inside the map's range (a focal stack): ``ceil(K (max d - min d))``.
    A renderer's static ``max_radius`` of this size is just enough, so small blurs stay cheap.
    """
    lo, hi = float(np.min(disparity)), float(np.max(disparity))
    worst = (hi - lo) if focus is None else max(abs(hi - focus), abs(focus - lo))
    return math.ceil(strength * worst)


def capped_radius(needed: int, cap: int) -> int:
    """The static radius bound to compile for: ``needed`` clipped to ``[1, cap]`` (``cap`` bounds memory)."""
    return max(1, min(needed, cap))
