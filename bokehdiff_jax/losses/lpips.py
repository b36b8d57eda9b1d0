"""LPIPS-VGG (Zhang et al. 2018, v0.1) in JAX: VGG16 features, channel-normalised squared differences,
learned per-channel linear heads, spatial mean, summed over five layers.

Images are NHWC in **[-1, 1]** (the model's output range; LPIPS's own convention). Weights: the
verified cache of ``lpips_weights`` (``lpips_params()``), passed in as a frozen pytree, never closed
over (so a jitted loss does not embed 59 MB of constants).
"""

from __future__ import annotations

import functools
from typing import Any

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


def conv3x3(x_bhwc: jax.Array, kernel_hwio: jax.Array, bias: jax.Array) -> jax.Array:
    """A 3x3 convolution with padding 1 and stride 1 (torch's ``Conv2d(..., 3, padding=1)``), NHWC/HWIO."""
    y = jax.lax.conv_general_dilated(
        x_bhwc, kernel_hwio, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


def vgg16_block(vgg_params: Any, x_bhwc: jax.Array, block: int, dtype: Any = jnp.float32) -> jax.Array:
    """Block ``block`` (0-4) of torchvision's VGG16 ``features``: 2x2/2 max-pooling (floor) before blocks
    1-4, then its 3x3 convolutions (padding 1) with ReLU. Params ``conv{block+1}_{i}`` (kernel HWIO, bias),
    cast to ``dtype``. Returns the block's LPIPS tap (``relu1_2`` .. ``relu5_3``)."""
    x = x_bhwc.astype(dtype)
    if block > 0:
        x = max_pool_2x2(x)
    for i in range(len(VGG16_BLOCKS[block])):
        p = vgg_params[f"conv{block + 1}_{i + 1}"]
        x = jax.nn.relu(conv3x3(x, p["kernel"].astype(dtype), p["bias"].astype(dtype)))
    return x


def lpips_scale(x_bhwc: jax.Array) -> jax.Array:
    """LPIPS's input scaling of images in [-1, 1]: ``(x - shift) / scale`` per channel."""
    shift = jnp.asarray(LPIPS_SHIFT, x_bhwc.dtype)
    scale = jnp.asarray(LPIPS_SCALE, x_bhwc.dtype)
    return (x_bhwc - shift) / scale


def vgg16_taps(
    vgg_params: Any, x_bhwc: jax.Array, dtype: Any = jnp.float32, *, remat: bool = False
) -> list[jax.Array]:
    """The five LPIPS taps ``relu1_2 .. relu5_3`` (strides 1, 2, 4, 8, 16; 64, 128, 256, 512, 512
    channels) of images in [-1, 1] (scaling layer applied here). ``remat``: each block is recomputed in
    the backward pass, which then keeps only the blocks' inputs (at 1024 px in f32 the first block's
    activations alone are 0.5 GiB per image)."""
    x = lpips_scale(x_bhwc)
    taps = []
    for b in range(len(VGG16_BLOCKS)):
        block = functools.partial(vgg16_block, block=b, dtype=dtype)
        x = (jax.checkpoint(block) if remat else block)(vgg_params, x)
        taps.append(x)
    return taps


def normalize_channels(f_bhwc: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """``f / (||f||_2 + eps)`` over channels, with a finite gradient where ``f`` is all zero."""
    sq = jnp.sum(jnp.square(f_bhwc), axis=-1, keepdims=True)
    return f_bhwc / (jnp.sqrt(jnp.maximum(sq, _TINY_SQUARED_NORM)) + eps)


def lpips_distance(
    params: Any, x_bhwc: jax.Array, y_bhwc: jax.Array, *, dtype: Any = jnp.float32, remat: bool = False
) -> jax.Array:
    """LPIPS-VGG distance per image, ``[B]``. ``x``, ``y``: ``[B, H, W, 3]`` in [-1, 1]; any ``H, W >= 16``.

    ``params``: ``lpips_params()`` (``{"vgg": ..., "heads": ...}``). Each image batch goes through VGG
    on its own: in training only ``x`` (the prediction) is differentiated, and one VGG pass over the
    concatenated pair would transpose every convolution over the target's half too (twice the backward
    work; ``bench train-step``). Per tap: normalise channels, square the difference, weight channels by
    the head, average over positions; the five tap values are summed.

    ``remat``: the backward pass keeps only the two images and recomputes the rest (both VGG passes,
    then ``x``'s block by block): same values and gradients, about one VGG pass's memory at the loss's
    backward instead of every tap, normalised feature and difference (several GiB at 1024 px).
    """
    if x_bhwc.shape != y_bhwc.shape or x_bhwc.ndim != 4 or x_bhwc.shape[-1] != 3:
        raise ValueError(
            f"lpips_distance: expected two [B, H, W, 3] images, got {x_bhwc.shape}, {y_bhwc.shape}"
        )
    if min(x_bhwc.shape[1:3]) < 16:  # four 2x2 poolings before relu5_3: fewer pixels leave it empty
        raise ValueError(f"lpips_distance: images must be at least 16x16 pixels, got {x_bhwc.shape[1:3]}")
    distance = functools.partial(_distance, dtype=dtype, remat=remat)
    return (jax.checkpoint(distance) if remat else distance)(params, x_bhwc, y_bhwc)


def _distance(params: Any, x_bhwc: jax.Array, y_bhwc: jax.Array, *, dtype: Any, remat: bool) -> jax.Array:
    taps_x = vgg16_taps(params["vgg"], x_bhwc, dtype, remat=remat)
    taps_y = vgg16_taps(params["vgg"], y_bhwc, dtype)
    total = jnp.zeros((x_bhwc.shape[0],), jnp.float32)
    for name, fx, fy in zip(LPIPS_TAPS, taps_x, taps_y, strict=True):
        fx = normalize_channels(fx.astype(jnp.float32))
        fy = normalize_channels(fy.astype(jnp.float32))
        d_bhwc = jnp.square(fx - fy)
        per_position = jnp.einsum("bhwc,c->bhw", d_bhwc, params["heads"][name].astype(jnp.float32))
        total = total + jnp.mean(per_position, axis=(1, 2))
    return total


def lpips_loss(
    params: Any, pred_bhwc: jax.Array, target_bhwc: jax.Array, *, remat: bool = False
) -> jax.Array:
    """Batch mean of ``lpips_distance`` (images in [-1, 1]); a scalar."""
    return jnp.mean(lpips_distance(params, pred_bhwc, target_bhwc, remat=remat))
