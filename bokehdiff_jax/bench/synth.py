"""``bokehdiff-jax bench synth``: cost and convergence of synthesized targets, and their blur distribution.

Three parts (``--parts``):

- ``conv``: scenes at the largest blur of the default range (``times = 2 ** log2_times[1]``), a
  procedural night scene of saturated point lights behind a procedural hairy foreground, focus on
  either layer. In a window of each (centred on the foreground's top edge: strands over lights), the
  default tracer settings and the earlier sampler (``21 * times`` golden-angle points, 8..256) are
  compared with renders of ``--ref-rays`` rays per pixel of the same sampler and of the cells sampler:
  the largest error of any pixel and channel (in 1/255) and the PSNR (dB, peak 1).
- ``time``: seconds per example (wall and process CPU, the jit cache warm) of the default synthesis on
  the default distribution, against the earlier sampler rendering the same scenes as it did (the whole
  padded canvas, ``21 * times`` points).
- ``dist``: the CoC radii of the targets (``K |d - d_f|`` over the output frame) over many sampled scenes,
  no rendering: median and 90th percentile of each image's largest radius, the mean radius, the median
  foreground area (its box in the frame, and its alpha's sum, over the frame's area) and the median of
  the background's smallest disparity in the frame; beside the same figures for the released sampling,
  re-implemented from SPEC section 4 here and given the same draws of ``times``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import int_in

PARTS = ("conv", "time", "dist")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default="conv,time,dist", help="comma-separated subset of conv,time,dist")
    parser.add_argument("--size", type=int_in(16, 4096), default=768, help="output canvas side, px (768)")
    parser.add_argument("--scenes", type=int_in(1, 1000), default=4, help="convergence scenes (4)")
    parser.add_argument(
        "--window", type=int_in(0, 4096), default=128, help="side of the compared window, px; 0 = frame"
    )
    parser.add_argument(
        "--ref-rays", type=int_in(1, 65536), default=8192, help="rays per pixel of the references"
    )
    parser.add_argument("--timing-scenes", type=int_in(1, 1000), default=6, help="examples timed (6)")
    parser.add_argument(
        "--dist-scenes", type=int_in(1, 100_000), default=300, help="scenes of the distribution (300)"
    )
    parser.add_argument("--seed", type=int_in(0), default=0, help="seed of every scene stream (0)")


def _check(args: argparse.Namespace) -> list[str]:
    parts = [p for p in args.parts.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        raise InputError(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    if args.size < 16 or args.window < 0 or args.ref_rays < 1:
        raise InputError("need --size >= 16, --window >= 0 and --ref-rays >= 1")
    if min(args.scenes, args.timing_scenes, args.dist_scenes) < 1:
        raise InputError("--scenes, --timing-scenes and --dist-scenes must be >= 1")
    return parts


def old_ray_count(times: float) -> int:
    """Rays per pixel of the earlier sampler: ``21 * times`` rounded up to a multiple of 8, in 8..256."""
    return int(np.clip(math.ceil(21.0 * times / 8) * 8, 8, 256))


def _errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Largest abs error in 1/255 and PSNR in dB (peak 1)."""
    diff = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    mse = float(np.mean(diff**2))
    return float(np.abs(diff).max() * 255.0), (math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse))


def _inputs(size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Foregrounds (procedural hair and mixed, scikit-image's horse and logo when installed) and
    backgrounds (procedural lights, scikit-image's photos when installed) as arrays."""
    from bokehdiff_jax.data.procedural import procedural_foreground, procedural_lights

    fgs = [procedural_foreground(320, 1, kind="hair"), procedural_foreground(320, 2, kind="mixed")]
    bgs = [procedural_lights(size, 0)]
    try:
        from bokehdiff_jax.data import samples
        from bokehdiff_jax.io.images import read_image

        fgs += [samples.horse_rgba(), samples.logo_rgba()]
        bgs += [np.asarray(read_image(p), np.float32) for p in samples.photo_paths()]
    except (ImportError, InputError) as e:
        print(f"(scikit-image's samples not used: {e})")
    return fgs, bgs


def _conv(args: argparse.Namespace) -> None:
    import jax

    from bokehdiff_jax.data.procedural import procedural_foreground, procedural_lights
    from bokehdiff_jax.data.synthesis import SynthConfig, layered_config, sample_scene
    from bokehdiff_jax.render import LayeredConfig, render_layers

    base = SynthConfig(size=args.size)
    hi = base.log2_times[1]
    s = args.size
    win = min(args.window or s, s)
    print(
        f"## conv: {args.scenes} scenes at times = 2**{hi:g}, {s} px, window {win} px, references with "
        f"{args.ref_rays} rays per pixel"
    )
    print(
        "| scene | focus | K px | largest r px | sampler | rays/px | s | vs cells ref: max err /255, PSNR dB "
        "| vs same-sampler ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = {"new": [0.0, math.inf], "old": [0.0, math.inf]}
    for i in range(args.scenes):
        on_fg = i % 2 == 1
        cfg = dataclasses.replace(base, log2_times=(hi, hi), fg_focus_prob=1.0 if on_fg else 0.0)
        fg = procedural_foreground(320, 100 + i, kind="hair" if i % 4 < 2 else "mixed")
        bg = procedural_lights(s, 100 + i)
        scene = sample_scene(cfg, [fg], [bg], args.seed, i)
        p = scene.pad
        tx, ty, fw, fh = scene.meta["layers"][1]["box_xywh"]
        wy = int(np.clip(ty - win // 2, 0, s - win))
        wx = int(np.clip(tx + fw // 2 - win // 2, 0, s - win))
        crop = (p + wy, p + wx, win, win)
        # Largest radius in the frame: the planes are linear, so it is at a corner of the frame.
        e = 0.5 * s / (s + 2 * p)
        d = scene.planes_l3
        corners = np.stack([d[:, 0] + d[:, 1] * cx + d[:, 2] * cy for cx in (-e, e) for cy in (-e, e)])
        r_max = scene.strength * float(np.abs(corners - scene.focus).max())

        def render(lc: LayeredConfig, scene=scene, crop=crop):
            t0 = time.perf_counter()
            out, rays = render_layers(
                scene.rgba_lhwc,
                scene.planes_l3,
                scene.focus,
                scene.strength,
                config=lc,
                crop=crop,
                return_rays=True,
            )
            out = np.asarray(jax.block_until_ready(out))
            return out, float(np.asarray(rays).mean()), time.perf_counter() - t0

        # A fixed ray count does not depend on the tiles: larger ones mean fewer loop steps.
        ref_config = LayeredConfig(rays_min=args.ref_rays, rays_max=args.ref_rays, tile=64, ray_chunk=64)
        ref_cells, _, t_ref = render(ref_config)
        ref_points, _, _ = render(LayeredConfig(sampling="points", num_rays=args.ref_rays, ray_chunk=64))
        n_old = old_ray_count(scene.meta["times"])
        rows = (
            ("new", "cells (default)", layered_config(cfg), ref_cells),
            ("old", f"points, {n_old}", LayeredConfig(sampling="points", num_rays=n_old), ref_points),
        )
        for key, name, lc, own_ref in rows:
            render(lc)  # compile
            out, rays, secs = render(lc)
            e_c, p_c = _errors(out, ref_cells)
            e_s, p_s = _errors(out, own_ref)
            worst[key] = [max(worst[key][0], e_s), min(worst[key][1], p_s)]
            print(
                f"| {i} | {'fg' if on_fg else 'bg'} {scene.focus:.3f} | {scene.strength:.1f} | {r_max:.1f} "
                f"| {name} | {rays:.0f} | {secs:.2f} | {e_c:.2f}, {p_c:.1f} | {e_s:.2f}, {p_s:.1f} |",
                flush=True,
            )
        ref_gap = _errors(ref_points, ref_cells)
        print(
            f"|   | (the two {args.ref_rays}-ray references differ by {ref_gap[0]:.2f}/255, "
            f"{ref_gap[1]:.1f} dB; cells reference {t_ref:.1f} s) | | | | | | | |"
        )
    for key, (e, p) in worst.items():
        print(f"worst over scenes, {key} sampler vs its own reference: {e:.2f}/255, {p:.1f} dB")


def _time(args: argparse.Namespace) -> None:
    import jax

    from bokehdiff_jax.data.synthesis import SynthConfig, render_scene, sample_scene
    from bokehdiff_jax.render import LayeredConfig, composite_layers, render_layers

    cfg = SynthConfig(size=args.size)
    fgs, bgs = _inputs(args.size)
    print(
        f"## time: {args.timing_scenes} examples of the default distribution at {args.size} px "
        f"(jit cache warm; wall s / process CPU s)"
    )
    print("| example | times | rays/px (mean, max) | new: wall, CPU | old sampler: rays, wall, CPU |")
    print("|---|---|---|---|---|")
    new, old = [], []
    for i in range(args.timing_scenes):
        scene = sample_scene(cfg, fgs, bgs, args.seed, i)

        def timed(fn):
            fn()  # compile for this shape, if new
            t0, c0 = time.perf_counter(), time.process_time()
            res = fn()
            return res, time.perf_counter() - t0, time.process_time() - c0

        (_, stats), t_new, c_new = timed(lambda scene=scene: render_scene(scene, cfg))
        n_old = old_ray_count(scene.meta["times"])
        lc = LayeredConfig(sampling="points", num_rays=n_old)

        def old_render(scene=scene, lc=lc):
            aif, _ = composite_layers(scene.rgba_lhwc, scene.planes_l3)
            out = render_layers(scene.rgba_lhwc, scene.planes_l3, scene.focus, scene.strength, config=lc)
            return jax.block_until_ready((aif, out))

        _, t_old, c_old = timed(old_render)
        new.append((t_new, c_new))
        old.append((t_old, c_old))
        print(
            f"| {i} | {scene.meta['times']:.2f} | {stats['rays_mean']:.0f}, {stats['n_rays']} "
            f"| {t_new:.2f}, {c_new:.2f} | {n_old}, {t_old:.2f}, {c_old:.2f} |",
            flush=True,
        )
    med = lambda xs, k: float(np.median([x[k] for x in xs]))  # noqa: E731
    mean = lambda xs, k: float(np.mean([x[k] for x in xs]))  # noqa: E731
    print(
        f"median wall s per example: new {med(new, 0):.2f}, old {med(old, 0):.2f} "
        f"(ratio {med(new, 0) / med(old, 0):.2f}); mean wall: new {mean(new, 0):.2f}, old {mean(old, 0):.2f} "
        f"(ratio {mean(new, 0) / mean(old, 0):.2f}); mean CPU: new {mean(new, 1):.2f}, old {mean(old, 1):.2f}"
    )


def _released_scene(rng: np.random.Generator, fg: np.ndarray, size: int, times: float) -> dict:
    """One scene of the released sampling (SPEC section 4), as far as the radii need it: the disparity
    map of the output frame, focus, K and the foreground box. Canvas ``size + 4 k`` with ``k = 12`` px
    at 768 px; background plane from disparity 0 at its far corner up to ``U(0, 1/4)``; one fronto-parallel
    foreground at ``U(background max, 1)``, its box ``U(0.5, 1)**2`` of the padded canvas's area (shrunk
    by 0.9 until it fits), centred with a shift of up to a quarter frame; alpha-blended disparity; focus
    on the foreground's or the background's mean; ``K = 12 times / max(d_f, 1 - d_f)``."""
    from bokehdiff_jax.data.synthesis import _resize

    k = 12.0 * size / 768.0
    pad = int(round(2 * k))
    p = size + 2 * pad
    ax, by = rng.uniform(-1, 1, 2)
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float64)
    ramp = ax * xx + by * yy
    tilt = rng.uniform(0, 0.25)
    span = max(ramp.max() - ramp.min(), 1e-12)
    bg = (ramp.max() - ramp) / span * tilt  # 0 at the far corner
    fg_d = rng.uniform(bg.max(), 1.0)
    h, w = fg.shape[:2]
    s = rng.uniform(0.5, 1.0) * math.sqrt(p * p / (h * w))
    fh, fw = int(h * s), int(w * s)
    while not (fh < p and fw < p):
        fh, fw = int(0.9 * fh), int(0.9 * fw)
    alpha = _resize(fg, (fh, fw), premultiply=True)[..., 3]
    y0 = int(np.clip(p // 2 - fh // 2 + rng.integers(-size // 4, size // 4 + 1), 0, p - fh))
    x0 = int(np.clip(p // 2 - fw // 2 + rng.integers(-size // 4, size // 4 + 1), 0, p - fw))
    a = np.zeros((p, p))
    a[y0 : y0 + fh, x0 : x0 + fw] = alpha
    disp = bg * (1 - a) + fg_d * a
    focus = fg_d if rng.uniform() < 0.5 else float(bg.mean())
    strength = k * times / max(focus, 1 - focus)
    crop = disp[pad : pad + size, pad : pad + size]
    box_h = max(0, min(y0 + fh, pad + size) - max(y0, pad))
    box_w = max(0, min(x0 + fw, pad + size) - max(x0, pad))
    bg_min = float(bg[pad : pad + size, pad : pad + size].min())
    fg_alpha = float(a[pad : pad + size, pad : pad + size].mean())
    box = box_h * box_w / size**2
    return dict(disp=crop, focus=focus, strength=strength, fg_area=box, fg_alpha=fg_alpha, bg_min=bg_min)


def _ours_scene(cfg, fgs, bgs, seed: int, index: int) -> dict:
    from bokehdiff_jax.data.synthesis import sample_scene
    from bokehdiff_jax.render import composite_layers

    scene = sample_scene(cfg, fgs, bgs, seed, index)
    p, s = scene.pad, cfg.size
    _, disp = composite_layers(scene.rgba_lhwc, scene.planes_l3, label=cfg.disparity_label)
    tx, ty, fw, fh = scene.meta["layers"][1]["box_xywh"]
    bg = scene.planes_l3[0]
    u = (np.arange(p, p + s) + 0.5) / (s + 2 * p) - 0.5
    bg_map = bg[0] + bg[1] * u[None, :] + bg[2] * u[:, None]
    return dict(
        times=scene.meta["times"],
        disp=np.asarray(disp)[p : p + s, p : p + s],
        focus=scene.focus,
        strength=scene.strength,
        fg_area=fw * fh / s**2,
        fg_alpha=float(scene.rgba_lhwc[1, p : p + s, p : p + s, 3].mean()),
        bg_min=float(bg_map.min()),
    )


def _summary(scenes: list[dict]) -> dict:
    from bokehdiff_jax.physics.optics import coc_radius

    largest, mean = [], []
    for sc in scenes:
        r = coc_radius(sc["disp"], sc["focus"], sc["strength"])
        largest.append(float(r.max()))
        mean.append(float(r.mean()))
    return {
        "largest r median": float(np.median(largest)),
        "largest r p90": float(np.percentile(largest, 90)),
        "mean r": float(np.mean(mean)),
        "fg box area median": float(np.median([sc["fg_area"] for sc in scenes])),
        "fg alpha area median": float(np.median([sc["fg_alpha"] for sc in scenes])),
        "bg min disparity median": float(np.median([sc["bg_min"] for sc in scenes])),
    }


def _dist(args: argparse.Namespace) -> None:
    from bokehdiff_jax.data.synthesis import SynthConfig, load_foreground

    cfg = SynthConfig(size=args.size)
    fgs, bgs = _inputs(args.size)
    fgs = [load_foreground(f, cfg) for f in fgs]  # cropped to the alpha's box, as sampled
    ours = [_ours_scene(cfg, fgs, bgs, args.seed, i) for i in range(args.dist_scenes)]
    # The released sampling gets the same blur multipliers (times = 2 ** U(-2, 3) in both): the
    # comparison then shows the geometry, not the noise of two draws of times.
    rng = np.random.default_rng(args.seed)
    released = [_released_scene(rng, fgs[int(rng.integers(len(fgs)))], args.size, sc["times"]) for sc in ours]
    a, b = _summary(released), _summary(ours)
    print(f"## dist: {args.dist_scenes} scenes at {args.size} px, CoC radii in px over the output frame")
    print("| figure | released sampling (re-implemented) | ours |")
    print("|---|---|---|")
    for key in a:
        print(f"| {key} | {a[key]:.3f} | {b[key]:.3f} |")


def run(args: argparse.Namespace) -> int:
    import jax

    parts = _check(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    for part in parts:
        {"conv": _conv, "time": _time, "dist": _dist}[part](args)
    return 0
