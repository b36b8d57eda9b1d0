"""LPIPS-VGG (Zhang et al. 2018, v0.1) in Flax: VGG16 features, channel-normalised squared differences,
learned per-channel linear heads, spatial mean, summed over five layers.

Images are NHWC in **[-1, 1]** (the model's output range; LPIPS's own convention). Weights: the
verified cache of ``lpips_weights`` (``lpips_params()``), passed in as a frozen pytree, never closed
over (so a jitted loss does not embed 59 MB of constants).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bokehdiff_jax.losses.lpips_weights import LPIPS_TAPS, VGG16_BLOCKS

# LPIPS's ScalingLayer: maps [-1, 1] inputs to (approximately) ImageNet-normalised ones.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# LPIPS's channel-normalisation epsilon (added to the norm, as the reference does).
NORM_EPS = 1e-10
# Below this squared norm the norm is treated as this value's square root: the value changes by
# < 1e-15 but the gradient of sqrt at 0 (inf * 0 = NaN on an all-zero feature vector) is avoided.
_TINY_SQUARED_NORM = 1e-30


def max_pool_2x2(x_bhwc: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2, odd sides floored (torch's ``max_pool2d(x, 2, 2)``), as a reshape and
    a max. Same values as ``nn.max_pool``; its gradient is an elementwise mask, where ``nn.max_pool``'s
    (select-and-scatter) expands on XLA:CPU into index tensors and a variadic reduce-window, about 6% of
    a training step with the LPIPS term (``bench train-step``). At ties the gradient is shared."""
    b, h, w, c = x_bhwc.shape
    x = x_bhwc[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` up to ``relu5_3``: 13 3x3 convolutions (padding 1) with ReLU,
    2x2/2 max-pooling (floor) before blocks 2-5. ``__call__(x [B, H, W, 3])`` returns the five LPIPS
    taps ``relu1_2 .. relu5_3`` at strides 1, 2, 4, 8, 16 (64, 128, 256, 512, 512 channels).
    Parameter names: ``conv{block}_{index}`` (``conv1_1`` ... ``conv5_3``)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> list[jax.Array]:
        taps = []
        x = x_bhwc.astype(self.dtype)
        for b, block in enumerate(VGG16_BLOCKS):
            if b > 0:
                x = max_pool_2x2(x)
            for i, ch in enumerate(block):
                conv = nn.Conv(
                    ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv{b + 1}_{i + 1}"
                )
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


def lpips_scale(x_bhwc: jax.Array) -> jax.Array:
    """LPIPS's input scaling of images in [-1, 1]: ``(x - shift) / scale`` per channel."""
    shift = jnp.asarray(LPIPS_SHIFT, x_bhwc.dtype)
    scale = jnp.asarray(LPIPS_SCALE, x_bhwc.dtype)
    return (x_bhwc - shift) / scale


def vgg16_taps(vgg_params: Any, x_bhwc: jax.Array, dtype: Any = jnp.float32) -> list[jax.Array]:
    """The five LPIPS taps of images in [-1, 1] (scaling layer applied here)."""
    return VGG16Features(dtype=dtype).apply({"params": vgg_params}, lpips_scale(x_bhwc))


def normalize_channels(f_bhwc: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """``f / (||f||_2 + eps)`` over channels, with a finite gradient where ``f`` is all zero."""
    sq = jnp.sum(jnp.square(f_bhwc), axis=-1, keepdims=True)
    return f_bhwc / (jnp.sqrt(jnp.maximum(sq, _TINY_SQUARED_NORM)) + eps)


def lpips_distance(
    params: Any, x_bhwc: jax.Array, y_bhwc: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
    """LPIPS-VGG distance per image, ``[B]``. ``x``, ``y``: ``[B, H, W, 3]`` in [-1, 1]; any ``H, W >= 16``.

    ``params``: ``lpips_params()`` (``{"vgg": ..., "heads": ...}``). Each image batch goes through VGG
    on its own: in training only ``x`` (the prediction) is differentiated, and one VGG pass over the
    concatenated pair would transpose every convolution over the target's half too (twice the backward
    work; ``bench train-step``). Per tap: normalise channels, square the difference, weight channels by
    the head, average over positions; the five tap values are summed.
    """
    if x_bhwc.shape != y_bhwc.shape or x_bhwc.ndim != 4 or x_bhwc.shape[-1] != 3:
        raise ValueError(
            f"lpips_distance: expected two [B, H, W, 3] images, got {x_bhwc.shape}, {y_bhwc.shape}"
        )
    if min(x_bhwc.shape[1:3]) < 16:  # four 2x2 poolings before relu5_3: fewer pixels leave it empty
        raise ValueError(f"lpips_distance: images must be at least 16x16 pixels, got {x_bhwc.shape[1:3]}")
    taps_x = vgg16_taps(params["vgg"], x_bhwc, dtype)
    taps_y = vgg16_taps(params["vgg"], y_bhwc, dtype)
    total = jnp.zeros((x_bhwc.shape[0],), jnp.float32)
    for name, fx, fy in zip(LPIPS_TAPS, taps_x, taps_y, strict=True):
        fx = normalize_channels(fx.astype(jnp.float32))
        fy = normalize_channels(fy.astype(jnp.float32))
        d_bhwc = jnp.square(fx - fy)
        per_position = jnp.einsum("bhwc,c->bhw", d_bhwc, params["heads"][name].astype(jnp.float32))
        total = total + jnp.mean(per_position, axis=(1, 2))
    return total


def lpips_loss(params: Any, pred_bhwc: jax.Array, target_bhwc: jax.Array) -> jax.Array:
    """Batch mean of ``lpips_distance`` (images in [-1, 1]); a scalar."""
    return jnp.mean(lpips_distance(params, pred_bhwc, target_bhwc))
