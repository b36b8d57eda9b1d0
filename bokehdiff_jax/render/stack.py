"""Focal stacks with the scatter renderer: one image refocused at evenly spread disparities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics.focus import stack_focus
from bokehdiff_jax.physics.optics import linear_to_srgb
from bokehdiff_jax.render.scatter import (
    ScatterConfig,
    _as_traced,
    _check_shapes,
    _to_linear,
    scatter_linear,
)

_DEFAULT_CONFIG = ScatterConfig()


@jax.jit
def _focal_stack_jit(image, disparity, focus_n, strength, config):
    lin = _to_linear(image, config)

    def one(f):
        out = scatter_linear(lin, disparity, f, strength, config)
        return jnp.clip(linear_to_srgb(out, config.gamma), 0.0, 1.0)

    # lax.map: one render in memory at a time, however long the stack.
    return focus_n, jax.lax.map(one, focus_n)


def focal_stack(
    image_hwc: jnp.ndarray,
    disparity_hw: jnp.ndarray,
    strength: float | jnp.ndarray,
    n: int,
    *,
    config: ScatterConfig = _DEFAULT_CONFIG,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``n`` scatter renders of one image focused at ``n`` disparities evenly spread from the scene's
    farthest (min) to its nearest (max) disparity. Returns ``(focus_n, images_nhwc)`` (sRGB)."""
    if n < 1:
        raise InputError(f"focal stack needs n >= 1, got {n}")
    image_hwc = jnp.asarray(image_hwc, jnp.float32)
    disparity_hw = jnp.asarray(disparity_hw, jnp.float32)
    _check_shapes(image_hwc, disparity_hw)
    if image_hwc.ndim != 3:
        raise InputError(f"focal_stack takes one image [H, W, 3], got {image_hwc.shape}")
    focus_n = jnp.asarray(stack_focus(np.asarray(disparity_hw), n))  # the one rule, shared with the model
    return _focal_stack_jit(
        image_hwc, disparity_hw, focus_n, jnp.asarray(strength, jnp.float32), _as_traced(config)
    )
