"""Optics conventions of SPEC section 1, in one place.

- Images: float32 in [0, 1], sRGB-encoded, ``HWC``; blur happens in linear light (``x ** gamma``).
- Disparity ``d`` in [0, 1]: 1 nearest, 0 infinitely far; same ``H x W`` as the image.
- Focus ``d_f`` in [0, 1]; blur strength ``K`` in image pixels: CoC radius ``r = K |d - d_f|``.
- Pixel ``(i, j)`` (row, column) covers ``[j, j+1) x [i, i+1)`` in continuous image coordinates,
  so its centre is at ``(x, y) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

DEFAULT_GAMMA = 2.2


def srgb_to_linear(x: jnp.ndarray, gamma: float | jnp.ndarray = DEFAULT_GAMMA) -> jnp.ndarray:
    """sRGB-encoded [0, 1] -> linear light, ``x ** gamma`` (negative inputs clipped to 0)."""
    return jnp.maximum(x, 0.0) ** gamma


def linear_to_srgb(x: jnp.ndarray, gamma: float | jnp.ndarray = DEFAULT_GAMMA) -> jnp.ndarray:
    """Linear light -> sRGB-encoded, ``x ** (1 / gamma)``; not clipped above 1 (highlights may exceed)."""
    return jnp.maximum(x, 0.0) ** (1.0 / gamma)


def defocus_map(disparity: jnp.ndarray, focus: jnp.ndarray) -> jnp.ndarray:
    """``D = |d - d_f|``. ``disparity``: ``[..., H, W]``; ``focus``: scalar or ``[...]`` (batch)."""
    focus = jnp.asarray(focus, disparity.dtype)
    return jnp.abs(disparity - focus[..., None, None])


def coc_radius(disparity: jnp.ndarray, focus: jnp.ndarray, strength: jnp.ndarray) -> jnp.ndarray:
    """Circle-of-confusion radius in image pixels, ``K |d - d_f|`` (thin lens, paper Eq. 4).

    ``disparity``: ``[..., H, W]``; ``focus``, ``strength``: scalars or ``[...]``.
    """
    strength = jnp.asarray(strength, disparity.dtype)
    return strength[..., None, None] * defocus_map(disparity, focus)


def _window_median(disparity: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    from bokehdiff_jax.errors import InputError

    h, w = disparity.shape
    x0, x1 = max(0, x0), min(w, x1)
    y0, y1 = max(0, y0), min(h, y1)
    if x0 >= x1 or y0 >= y1:
        raise InputError(f"focus region [{x0},{y0})-[{x1},{y1}) lies outside the {w}x{h} image")
    window = np.asarray(disparity)[y0:y1, x0:x1]
    window = window[np.isfinite(window)]
    if window.size == 0:
        raise InputError("focus region holds no finite disparity value")
    return float(np.median(window))


def focus_at(disparity: np.ndarray, x: int, y: int, window: int = 9) -> float:
    """Tap-to-focus: the median disparity in a ``window x window`` box centred on pixel ``(x, y)``.

    ``disparity``: ``[H, W]``; ``x`` is the column, ``y`` the row. Host-side (NumPy), not traced.
    """
    h, w = np.shape(disparity)
    if not (0 <= x < w and 0 <= y < h):
        from bokehdiff_jax.errors import InputError

        raise InputError(f"focus point ({x}, {y}) is outside the {w}x{h} image")
    half = window // 2
    return _window_median(disparity, x - half, y - half, x + half + 1, y + half + 1)


def focus_in_box(disparity: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> float:
    """The median disparity inside the box ``[x0, x1) x [y0, y1)`` (columns, rows). Host-side."""
    return _window_median(disparity, x0, y0, x1, y1)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of exact area (box) resampling: output cell ``o`` covers input
    interval ``[o n_in / n_out, (o + 1) n_in / n_out)``; each row sums to 1."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return (overlap / (n_in / n_out)).astype(np.float32)


def area_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Exact area resampling of ``x[..., H, W]`` to ``[..., h, w]`` for any sizes (divisible or not).

    Each output value is the mean of ``x`` over the output cell's footprint, so a mean is preserved.
    Upsampling (``h > H``) repeats values piecewise-constantly.
    """
    h_in, w_in = x.shape[-2:]
    r_h = jnp.asarray(_area_matrix(h_in, size[0]))
    r_w = jnp.asarray(_area_matrix(w_in, size[1]))
    return jnp.einsum("hH,...HW,wW->...hw", r_h, x, r_w)


def bilinear_sample(img: jnp.ndarray, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Bilinear lookup of ``img[H, W, ...]`` at continuous image coordinates ``(x, y)``, edge-clamped.

    Coordinates follow the pixel-centre convention: ``(j + 0.5, i + 0.5)`` returns ``img[i, j]``
    exactly. ``x`` and ``y`` broadcast together; the result has shape ``x.shape + img.shape[2:]``.
    """
    h, w = img.shape[:2]
    fx = jnp.clip(x - 0.5, 0.0, w - 1.0)
    fy = jnp.clip(y - 0.5, 0.0, h - 1.0)
    x0 = jnp.clip(jnp.floor(fx).astype(jnp.int32), 0, max(w - 2, 0))
    y0 = jnp.clip(jnp.floor(fy).astype(jnp.int32), 0, max(h - 2, 0))
    x1 = jnp.minimum(x0 + 1, w - 1)
    y1 = jnp.minimum(y0 + 1, h - 1)
    ax = fx - x0
    ay = fy - y0
    extra = (None,) * (img.ndim - 2)
    ax, ay = ax[(...,) + extra], ay[(...,) + extra]
    top = img[y0, x0] * (1 - ax) + img[y0, x1] * ax
    bot = img[y1, x0] * (1 - ax) + img[y1, x1] * ax
    return top * (1 - ay) + bot * ay
