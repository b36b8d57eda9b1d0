"""Pixel-space losses: MSE and the multi-scale edge loss (paper Eq. 10).

Images are NHWC in **[-1, 1]** (the model's output range; the released code computes these losses
there too: a gradient in [-1, 1] units is twice one in [0, 1] units). All losses are means over batch,
positions and channels, so they do not grow with the batch or the image size.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

EdgeVariant = Literal["paper", "released"]
EDGE_VARIANTS: tuple[str, ...] = ("paper", "released")


def mse(pred_bhwc: jax.Array, target_bhwc: jax.Array) -> jax.Array:
    """Mean squared error over every element; a scalar."""
    return jnp.mean(jnp.square(pred_bhwc.astype(jnp.float32) - target_bhwc.astype(jnp.float32)))


@functools.lru_cache(maxsize=64)
def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of adaptive average pooling (PyTorch's ``mode="area"``): output ``o``
    averages inputs ``floor(o n_in / n_out) .. ceil((o + 1) n_in / n_out) - 1``. For ``n_in`` a multiple
    of ``n_out`` this is plain ``n_in / n_out`` box pooling; otherwise windows differ by one pixel."""
    m = np.zeros((n_out, n_in), np.float32)
    for o in range(n_out):
        lo, hi = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
        m[o, lo:hi] = 1.0 / (hi - lo)
    return m


def downsample_area(x_bhwc: jax.Array, factor: int) -> jax.Array:
    """Downsampling by an integer ``factor`` as ``F.interpolate(x, scale_factor=1/factor, mode="area")``:
    output size ``floor(n * (1 / factor))`` per side, adaptive average pooling."""
    if factor == 1:
        return x_bhwc
    _, h, w, _ = x_bhwc.shape
    oh, ow = math.floor(h * (1.0 / factor)), math.floor(w * (1.0 / factor))
    if oh < 2 or ow < 2:
        raise ValueError(
            f"edge loss: a {h}x{w} image is too small for scale {factor} (needs >= {2 * factor} px)"
        )
    r_h = jnp.asarray(_adaptive_pool_matrix(h, oh))
    r_w = jnp.asarray(_adaptive_pool_matrix(w, ow))
    return jnp.einsum("hH,bHWc,wW->bhwc", r_h, x_bhwc, r_w, precision=jax.lax.Precision.HIGHEST)


def _diffs(x_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Forward differences along x (width) and y (height): ``[B, H, W-1, C]`` and ``[B, H-1, W, C]``."""
    return x_bhwc[:, :, :-1] - x_bhwc[:, :, 1:], x_bhwc[:, :-1] - x_bhwc[:, 1:]


def edge_loss(
    pred_bhwc: jax.Array,
    target_bhwc: jax.Array,
    aif_bhwc: jax.Array,
    *,
    variant: EdgeVariant = "paper",
    scales: int = 3,
) -> jax.Array:
    """Multi-scale edge loss (Eq. 10); a scalar. ``pred`` the model's output, ``target`` the bokeh ground
    truth ``I_b``, ``aif`` the all-in-focus input ``I_f``; all ``[B, H, W, C]`` in [-1, 1].

    At scale ``l = 1 .. scales`` each image is downsampled by ``l`` (area / adaptive average pooling,
    which makes the one-pixel difference an ``l``-wide derivative, the paper's "extended operator of
    size ``l``"); in each direction the difference ``|grad pred - grad target|`` is weighted per pixel by
    ``w = max(|grad target|, |grad aif|)`` (edges present before or after the blur; flat regions are
    left to the MSE) and averaged over batch, positions and channels; the two directions are summed.

    - ``"paper"``: ``sum_l (1 / l^2) mean(|diff| * w)``.
    - ``"released"`` (the released training script): ``sum_l (1 / l) mean(|diff| * (1 + w))`` (the ``+ 1``
      keeps flat regions in the loss).

    The weight depends on ``target`` and ``aif`` only; the gradient flows to ``pred``.
    """
    if variant not in EDGE_VARIANTS:
        raise ValueError(f"edge loss variant {variant!r}: expected one of {EDGE_VARIANTS}")
    pred = pred_bhwc.astype(jnp.float32)
    target = target_bhwc.astype(jnp.float32)
    aif = aif_bhwc.astype(jnp.float32)
    total = jnp.zeros((), jnp.float32)
    for level in range(1, scales + 1):
        p, t, f = (downsample_area(a, level) for a in (pred, target, aif))
        for dp, dt, df in zip(_diffs(p), _diffs(t), _diffs(f), strict=True):
            w = jnp.maximum(jnp.abs(dt), jnp.abs(df))
            if variant == "paper":
                total = total + jnp.mean(jnp.abs(dp - dt) * w) / level**2
            else:
                total = total + jnp.mean(jnp.abs(dp - dt) * (1.0 + w)) / level
    return total
