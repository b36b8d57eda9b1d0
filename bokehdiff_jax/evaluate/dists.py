"""DISTS (Ding, Ma, Wang, Simoncelli, TPAMI 2020) in JAX: a full-reference metric that compares the
*structure* and *texture* of two images in VGG16 feature space; 0 = identical, larger = more different.

From the paper (Sec. 3): the VGG16 of ImageNet classification, with every 2x2 max-pool replaced by an
"L2 pooling" (square, blur with a 3x3 Hann window, subsample by 2, square root), gives six stages of
feature maps: the input image itself and the ReLU outputs ending each VGG block (``relu1_2`` ..
``relu5_3``). Per stage ``k`` and channel ``c``, with spatial means ``mu``, variances ``sigma^2`` and the
covariance ``sigma_xy`` of the two images' maps::

    texture   l = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    structure s = (2 sigma_xy + c2) / (sigma_x^2 + sigma_y^2 + c2)          c1 = c2 = 1e-6
    DISTS     = 1 - sum_k sum_c (alpha_kc l_kc + beta_kc s_kc) / (sum alpha + sum beta)

Inputs are NHWC sRGB in **[0, 1]** (stage 0 compares them as they are; VGG sees them ImageNet-normalised).
Weights: the VGG16 convolutions of the LPIPS cache (``losses.lpips_params()["vgg"]``, torchvision's
ImageNet VGG16, as DISTS uses) and DISTS's ``alpha``/``beta`` (``dists_weights``), passed in as a pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.evaluate.dists_weights import DISTS_CHANNELS, load_dists_weights
from bokehdiff_jax.losses.lpips import conv3x3
from bokehdiff_jax.losses.lpips_weights import VGG16_BLOCKS, lpips_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
C1 = 1e-6
C2 = 1e-6
# L2 pooling's blur: the outer product of a 5-tap Hann window without its zero ends, [0.5, 1, 0.5],
# normalised to sum 1; stride 2, zero padding 1 (the published implementation's geometry).
_HANN = np.array([0.5, 1.0, 0.5])
L2POOL_KERNEL = np.outer(_HANN, _HANN) / np.outer(_HANN, _HANN).sum()
L2POOL_EPS = 1e-12  # added under the square root (its gradient at 0)


def dists_params(lpips_path: str | None = None, dists_path: str | None = None) -> dict[str, Any]:
    """``{"vgg": {"conv1_1": {"kernel" HWIO, "bias"}, ...}, "alpha": [1475], "beta": [1475]}`` (NumPy),
    from the verified caches (``InputError`` with the fetch command when one is missing)."""
    ab = load_dists_weights(dists_path)
    return {"vgg": lpips_params(lpips_path)["vgg"], "alpha": ab["alpha"], "beta": ab["beta"]}


def l2_pool(x_bhwc: jax.Array) -> jax.Array:
    """DISTS's L2 pooling: ``sqrt(blur(x^2) + eps)``, blur = 3x3 Hann, stride 2, zero padding 1, per
    channel. ``[B, H, W, C] -> [B, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1, C]``."""
    c = x_bhwc.shape[-1]
    kernel = jnp.broadcast_to(jnp.asarray(L2POOL_KERNEL, x_bhwc.dtype)[:, :, None, None], (3, 3, 1, c))
    out = jax.lax.conv_general_dilated(
        jnp.square(x_bhwc),
        kernel,
        window_strides=(2, 2),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )
    return jnp.sqrt(out + L2POOL_EPS)


def dists_features(vgg_params: Any, x_bhwc: jax.Array) -> list[jax.Array]:
    """The six DISTS stages of images in [0, 1]: the image, then VGG16 (L2-pooled) ``relu1_2`` ..
    ``relu5_3`` at strides 1, 2, 4, 8, 16 (3, 64, 128, 256, 512, 512 channels)."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    h = (x_bhwc - mean) / std
    feats = [x_bhwc]
    for b, block in enumerate(VGG16_BLOCKS):
        if b > 0:
            h = l2_pool(h)
        for i in range(len(block)):
            p = vgg_params[f"conv{b + 1}_{i + 1}"]
            h = jax.nn.relu(conv3x3(h, p["kernel"], p["bias"]))
        feats.append(h)
    return feats


def dists_distance(params: Any, x_bhwc: jax.Array, y_bhwc: jax.Array) -> jax.Array:
    """DISTS per image, ``[B]``. ``x``, ``y``: ``[B, H, W, 3]`` sRGB in [0, 1], any ``H, W >= 16`` (so the
    last stage is at least 1 x 1). ``params``: :func:`dists_params`. Both images share one VGG batch."""
    if x_bhwc.shape != y_bhwc.shape or x_bhwc.ndim != 4 or x_bhwc.shape[-1] != 3:
        raise ValueError(
            f"dists_distance: expected two [B, H, W, 3] images, got {x_bhwc.shape}, {y_bhwc.shape}"
        )
    b = x_bhwc.shape[0]
    x = jnp.concatenate([x_bhwc, y_bhwc], axis=0).astype(jnp.float32)
    feats = dists_features(params["vgg"], x)
    alpha = jnp.asarray(params["alpha"], jnp.float32)
    beta = jnp.asarray(params["beta"], jnp.float32)
    total = jnp.sum(alpha) + jnp.sum(beta)
    bounds = np.cumsum((0,) + DISTS_CHANNELS)
    score = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
        fx, fy = f[:b], f[b:]
        mx, my = jnp.mean(fx, axis=(1, 2)), jnp.mean(fy, axis=(1, 2))  # [B, C]
        vx = jnp.mean(jnp.square(fx - mx[:, None, None]), axis=(1, 2))
        vy = jnp.mean(jnp.square(fy - my[:, None, None]), axis=(1, 2))
        cov = jnp.mean(fx * fy, axis=(1, 2)) - mx * my
        texture = (2 * mx * my + C1) / (jnp.square(mx) + jnp.square(my) + C1)
        structure = (2 * cov + C2) / (vx + vy + C2)
        a, bb = alpha[bounds[k] : bounds[k + 1]], beta[bounds[k] : bounds[k + 1]]
        score = score + (texture @ a + structure @ bb) / total
    return 1.0 - score
