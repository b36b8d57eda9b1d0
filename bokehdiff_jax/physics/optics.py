"""Optics conventions of SPEC section 1, in one place.

- Images: float32 in [0, 1], sRGB-encoded, ``HWC``; blur happens in linear light (``x ** gamma``).
- Disparity ``d`` in [0, 1]: 1 nearest, 0 infinitely far; same ``H x W`` as the image.
- Focus ``d_f`` in [0, 1]; blur strength ``K`` in image pixels: CoC radius ``r = K |d - d_f|``.
- Pixel ``(i, j)`` (row, column) covers ``[j, j+1) x [i, i+1)`` in continuous image coordinates,
  so its centre is at ``(x, y) = (j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_GAMMA = 2.2


def srgb_to_linear(x: jnp.ndarray, gamma: float | jnp.ndarray = DEFAULT_GAMMA) -> jnp.ndarray:
    """sRGB-encoded [0, 1] -> linear light, ``x ** gamma`` (negative inputs clipped to 0)."""
    return jnp.maximum(x, 0.0) ** gamma


def linear_to_srgb(x: jnp.ndarray, gamma: float | jnp.ndarray = DEFAULT_GAMMA) -> jnp.ndarray:
    """Linear light -> sRGB-encoded, ``x ** (1 / gamma)``; not clipped above 1 (highlights may exceed)."""
    return jnp.maximum(x, 0.0) ** (1.0 / gamma)


def _xp(*arrays):
    """``jnp`` when any input is a JAX array (tracers included), else NumPy: host-side data code (loaders,
    item decoding) stays in NumPy and never touches an accelerator."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def defocus_map(disparity, focus, *, spatial_dims: int = 2):
    """``D = |d - d_f|``. ``disparity``: ``[..., *spatial]`` with ``spatial_dims`` trailing spatial axes
    (``[..., H, W]`` by default; 1 for token lists ``[B, N]`` or per-layer values ``[L]``); ``focus``:
    scalar or ``[...]`` (batch). JAX arrays in -> JAX array out; NumPy/Python in -> NumPy out."""
    xp = _xp(disparity, focus)
    disparity = xp.asarray(disparity)
    focus = xp.asarray(focus, disparity.dtype)
    return xp.abs(disparity - focus.reshape(focus.shape + (1,) * spatial_dims))


def coc_radius(disparity, focus, strength, *, spatial_dims: int = 2):
    """Circle-of-confusion radius in image pixels, ``K |d - d_f|`` (thin lens, paper Eq. 4): the one
    home of this formula.

    ``disparity``: ``[..., *spatial]`` (see :func:`defocus_map` for ``spatial_dims``); ``focus``,
    ``strength``: scalars or ``[...]``. Works on JAX (traced or not) and NumPy inputs alike.
    """
    xp = _xp(disparity, focus, strength)
    defocus = defocus_map(disparity, focus, spatial_dims=spatial_dims)
    strength = xp.asarray(strength, defocus.dtype)
    return strength.reshape(strength.shape + (1,) * spatial_dims) * defocus


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
