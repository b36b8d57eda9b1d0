"""The slow reference of the scatter renderer: :func:`numpy_scatter`, plain NumPy, one layer at a time.

It follows the algorithm of :mod:`bokehdiff_jax.render.scatter` step by step (same layers, kernels,
hole filling and compositing, ``numpy.fft``) in straightforward Python loops, so it is easy to read
and check by eye. It is the parity reference of the tests and the NumPy baseline of
``bokehdiff-jax bench render``; it is not meant for real work (seconds to minutes per megapixel).
"""

from __future__ import annotations

import math

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics.optics import coc_radius
from bokehdiff_jax.render.scatter import fft_size


def _np_coverage(dy, dx, radius, blades, rotation_deg):
    rho = np.sqrt(dx * dx + dy * dy)
    if blades >= 3:
        sector = 2.0 * np.pi / blades
        phi = np.mod(np.arctan2(dy, dx) - np.deg2rad(rotation_deg), sector)
        inside = radius * np.cos(np.pi / blades) - rho * np.cos(phi - np.pi / blades)
    else:
        inside = radius - rho
    return np.clip(inside + 0.5, 0.0, 1.0)


def numpy_scatter(
    image_hwc: np.ndarray,
    disparity_hw: np.ndarray,
    focus: float,
    strength: float,
    *,
    max_radius: int = 32,
    num_layers: int = 24,
    fill_holes: bool = True,
    blades: float = 0.0,
    rotation: float = 0.0,
    highlight_boost: float = 0.0,
    highlight_threshold: float = 0.9,
    gamma: float = 2.2,
    method: str = "fft",
) -> np.ndarray:
    """The scatter renderer in plain NumPy (float32): sRGB ``[H, W, 3]`` -> sRGB ``[H, W, 3]``.

    ``method="fft"`` spreads each layer with ``numpy.fft`` like the JAX renderer; ``"direct"`` is the
    textbook scatter: every kernel tap adds a shifted, weighted copy of the layer (same result, cost
    proportional to the disc area)."""
    if method not in ("fft", "direct"):
        raise InputError(f"method must be 'fft' or 'direct', got {method!r}")
    img = np.asarray(image_hwc, np.float32)
    disp = np.asarray(disparity_hw, np.float32)
    h, w = disp.shape
    lin = np.maximum(img, 0.0) ** gamma
    ramp = np.clip(
        (img.max(-1, keepdims=True) - highlight_threshold) / max(1 - highlight_threshold, 1e-3), 0, 1
    )
    lin = lin * (1.0 + highlight_boost * ramp)

    # Layers: evenly spaced over the disparity range, one exactly on the focus.
    dmin, dmax = float(disp.min()), float(disp.max())
    delta = max(dmax - dmin, 1e-6) / (num_layers - 2)
    anchor = min(max(focus, dmin), dmax)
    k = min(max(math.ceil((anchor - dmin) / delta - 1e-4), 0), num_layers - 2)
    d0 = anchor - k * delta
    position = np.clip((disp - d0) / delta, 0.0, num_layers - 1.0)
    index = np.round(position).astype(np.int64).reshape(-1)
    count = np.bincount(index, minlength=num_layers)
    total = np.bincount(index, weights=disp.reshape(-1).astype(np.float64), minlength=num_layers)

    support = max_radius + 1
    hp, wp = fft_size(h + 2 * support), fft_size(w + 2 * support)
    pads = ((support, hp - h - support), (support, wp - w - support))
    lin_p = np.stack([np.pad(lin[..., c], pads, mode="edge") for c in range(3)])
    layer_p = np.pad(np.round(position), pads, mode="edge")
    iy, ix = np.arange(hp), np.arange(wp)
    dy = np.where(iy < hp // 2 + 1, iy, iy - hp).astype(np.float32)[:, None]
    dx = np.where(ix < wp // 2 + 1, ix, ix - wp).astype(np.float32)[None, :]
    mask = (np.abs(dy) <= support) & (np.abs(dx) <= support)

    c_acc = np.zeros((3, hp, wp), np.float32)
    a_acc = np.zeros((hp, wp), np.float32)
    for layer in range(num_layers):
        # The layer's radius: from the mean disparity of its pixels (its grid level when empty).
        level = total[layer] / count[layer] if count[layer] else d0 + layer * delta
        radius = min(max(float(coc_radius(level, focus, strength, spatial_dims=0)), 0.0), float(max_radius))
        kernel = _np_coverage(dy, dx, radius, blades, rotation) * mask
        kernel_f = np.fft.rfft2(kernel / kernel.sum())
        weight = (layer_p == layer).astype(np.float32)

        def blur(x, kernel=kernel, kernel_f=kernel_f):
            if method == "fft":
                return np.fft.irfft2(np.fft.rfft2(x) * kernel_f, s=(hp, wp))
            # Circular convolution, tap by tap (kernel offsets t = (ty, tx), |t| <= support).
            ext = np.pad(x, support, mode="wrap")
            out = np.zeros_like(x)
            norm = kernel / kernel.sum()
            for ty in range(-support, support + 1):
                for tx in range(-support, support + 1):
                    wt = norm[ty % hp, tx % wp]
                    if wt > 0:
                        out += wt * ext[support - ty : support - ty + hp, support - tx : support - tx + wp]
            return out

        c_layer = np.stack([blur(lin_p[c] * weight) for c in range(3)])
        a_layer = np.clip(blur(weight), 0.0, 1.0)
        if fill_holes:
            gap = (layer_p >= layer) * (1.0 - a_acc)
            c_back = np.stack([blur(c_acc[c]) for c in range(3)])
            a_back = blur(a_acc)
            c_acc = c_acc + gap * c_back
            a_acc = a_acc + gap * a_back
        c_acc = c_acc * (1.0 - a_layer) + c_layer
        a_acc = a_acc * (1.0 - a_layer) + a_layer
    out = np.maximum(c_acc / np.maximum(a_acc, 1e-6), 0.0)[:, support : support + h, support : support + w]
    return np.clip(np.moveaxis(out, 0, -1) ** (1.0 / gamma), 0.0, 1.0).astype(np.float32)
