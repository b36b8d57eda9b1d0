"""``bokehdiff-jax bench render``: throughput of the scatter renderer and the layered ray tracer on CPU,
against a straightforward NumPy implementation of the same scatter algorithm run in the same process.

The NumPy reference (:func:`numpy_scatter`) follows the algorithm of
:mod:`bokehdiff_jax.render.scatter` step by step (same layers, kernels, hole filling and compositing,
``numpy.fft``), one layer after another in plain Python: it is also the parity reference in the tests.
"""

from __future__ import annotations

import argparse
import math

import numpy as np


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
        raise ValueError(f"method must be 'fft' or 'direct', got {method!r}")
    from bokehdiff_jax.render.scatter import fft_size

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
        radius = min(max(strength * abs(level - focus), 0.0), float(max_radius))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="512,1024", help="comma-separated square sizes")
    parser.add_argument("--strength", type=float, default=24.0, help="K in pixels")
    parser.add_argument("--layers", type=int, default=24, help="scatter depth layers")
    parser.add_argument("--rays", type=int, default=32, help="ray tracer aperture samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per JAX measurement (median)")
    parser.add_argument("--numpy-repeats", type=int, default=1, help="timed runs of the NumPy references")
    parser.add_argument(
        "--direct-max-size",
        type=int,
        default=1024,
        help="largest size for the (slow) tap-by-tap NumPy scatter",
    )


def _scene(size: int, seed: int = 0):
    """A two-layer synthetic scene: smooth textured background plane, a disc-shaped foreground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg = np.ones((size, size, 4), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(0, 6)
        bg[..., c] = 0.5 + 0.4 * np.sin(fx * xx * 6.28 + ph) * np.cos(fy * yy * 6.28)
    fg = np.zeros_like(bg)
    inside = (xx - 0.5) ** 2 + (yy - 0.55) ** 2 < 0.25**2
    fg[inside] = [0.9, 0.3, 0.2, 1.0]
    planes = np.array([[0.2, 0.1, 0.05], [0.75, 0.0, 0.0]], np.float32)
    return np.stack([bg, fg]), planes


def _check_args(args: argparse.Namespace) -> list[int]:
    """The sizes to run; bad flags are an ``InputError`` (one line, exit 2) before any work."""
    from bokehdiff_jax.errors import InputError

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise InputError(f"--sizes expects comma-separated integers, got {args.sizes!r}") from None
    if min(sizes) < 16:
        raise InputError(f"--sizes must be >= 16 px each, got {args.sizes}")
    if not (0 < args.strength < math.inf) or args.layers < 3 or args.rays < 1:
        raise InputError("need --strength > 0 (finite), --layers >= 3 and --rays >= 1")
    if args.repeats < 1 or args.numpy_repeats < 1:
        raise InputError("--repeats and --numpy-repeats must be >= 1")
    return sizes


def run(args: argparse.Namespace) -> int:
    import jax

    from bokehdiff_jax.bench.common import median_time, peak_rss_bytes
    from bokehdiff_jax.render import (
        LayeredConfig,
        ScatterConfig,
        composite_layers,
        render_layers,
        render_scatter,
    )

    sizes = _check_args(args)
    focus = 0.2
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; K = {args.strength} px, focus {focus}, "
        f"{args.layers} layers, {args.rays} rays"
    )
    rows = []
    for size in sizes:
        rgba, planes = _scene(size)
        aif, disp = composite_layers(rgba, planes)
        aif, disp = np.asarray(aif), np.asarray(disp)
        radius = math.ceil(args.strength * float(np.abs(disp - focus).max()))
        cfg = ScatterConfig(max_radius=radius, num_layers=args.layers)
        mp = size * size / 1e6
        common = dict(max_radius=radius, num_layers=args.layers)

        def jax_scatter(aif=aif, disp=disp, cfg=cfg):
            return jax.block_until_ready(render_scatter(aif, disp, focus, args.strength, config=cfg))

        t_jax = median_time(jax_scatter, repeats=args.repeats)
        t_fft = median_time(
            lambda aif=aif, disp=disp, common=common: numpy_scatter(
                aif, disp, focus, args.strength, **common
            ),
            repeats=args.numpy_repeats,
            warmup=0,
        )
        t_direct = None
        if size <= args.direct_max_size:
            t_direct = median_time(
                lambda aif=aif, disp=disp, common=common: numpy_scatter(
                    aif, disp, focus, args.strength, method="direct", **common
                ),
                repeats=args.numpy_repeats,
                warmup=0,
            )
        lcfg = LayeredConfig(num_rays=args.rays)
        t_ray = median_time(
            lambda rgba=rgba, planes=planes, lcfg=lcfg: jax.block_until_ready(
                render_layers(rgba, planes, focus, args.strength, config=lcfg)
            ),
            repeats=args.repeats,
        )
        rows.append((size, radius, mp, t_jax, t_fft, t_direct, t_ray))
        direct = "skipped" if t_direct is None else f"{t_direct:.2f} s ({t_direct / t_jax:.1f}x)"
        print(
            f"{size}^2 (max CoC {radius} px): JAX scatter {t_jax:.3f} s | NumPy FFT scatter {t_fft:.3f} s "
            f"({t_fft / t_jax:.2f}x) | NumPy tap-by-tap scatter {direct} | JAX ray tracer {t_ray:.3f} s",
            flush=True,
        )
    print(f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB\n")
    print(
        "| size | JAX scatter MP/s | NumPy FFT scatter MP/s (JAX x) | NumPy tap-by-tap MP/s (JAX x) "
        "| JAX ray tracer MP/s | Mrays/s |"
    )
    print("|---|---|---|---|---|---|")
    for size, _, mp, t_jax, t_fft, t_direct, t_ray in rows:
        direct = "-" if t_direct is None else f"{mp / t_direct:.4f} ({t_direct / t_jax:.1f}x)"
        print(
            f"| {size}^2 | {mp / t_jax:.3f} | {mp / t_fft:.3f} ({t_fft / t_jax:.2f}x) | {direct} "
            f"| {mp / t_ray:.3f} | {mp * args.rays / t_ray:.1f} |"
        )
    return 0
