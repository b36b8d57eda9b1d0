"""``bokehdiff-jax bench render``: throughput of the scatter renderer and the layered ray tracer on CPU,
against a straightforward NumPy implementation of the same scatter algorithm run in the same process
(:func:`bokehdiff_jax.render.reference.numpy_scatter`, the slow reference also used by the tests).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import float_in, int_in
from bokehdiff_jax.physics.focus import needed_radius
from bokehdiff_jax.render.reference import numpy_scatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="512,1024", help="comma-separated square image sides, 16..8192 px")
    parser.add_argument(
        "--strength",
        type=float_in(0, 4096, above=True),
        default=24.0,
        help="blur K in pixels (CoC per unit disparity)",
    )
    parser.add_argument("--layers", type=int_in(3, 256), default=24, help="scatter depth layers, 3..256")
    parser.add_argument(
        "--rays", type=int_in(1, 4096), default=32, help="ray tracer aperture samples per pixel"
    )
    parser.add_argument(
        "--repeats", type=int_in(1, 1000), default=3, help="timed runs per JAX measurement (median)"
    )
    parser.add_argument(
        "--numpy-repeats", type=int_in(1, 1000), default=1, help="timed runs of the NumPy references"
    )
    parser.add_argument(
        "--direct-max-size",
        type=int_in(0, 8192),
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
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise InputError(f"--sizes expects comma-separated integers, got {args.sizes!r}") from None
    if min(sizes) < 16 or max(sizes) > 8192:
        raise InputError(f"--sizes must be 16..8192 px each, got {args.sizes}")
    # The parser range-checks these; kept for callers that build args without it.
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
        radius = needed_radius(disp, focus, args.strength)
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
        lcfg = LayeredConfig(sampling="points", num_rays=args.rays)  # a fixed ray count: rays/s
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
