"""``bokehdiff-jax demo``: the main job on the embedded default data, viewable as one HTML page.

1. scikit-image's Middlebury motorcycle (left view + ground-truth disparity; unknown pixels filled
   from valid neighbours, normalised to [0, 1] with near = 1, downscaled): a focal stack with the
   classical scatter renderer.
2. A small synthesized training set (SPEC section 4 scenes, the layered ray tracer) from packaged
   images: foregrounds made from scikit-image's horse silhouette and logo plus procedural hair/fur/
   whisker foregrounds, backgrounds astronaut, chelsea, coffee and rocket.
3. ``OUT/index.html`` showing inputs, disparity, renders and samples side by side.

The whole folder is written atomically: it appears complete or not at all. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import time
from pathlib import Path

import numpy as np

BACKGROUNDS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
# Every name the demo writes into its folder (an earlier demo there may be replaced, nothing else).
DEMO_FILES = (
    r"index\.html|samples\.json|inputs|motorcycle(_disparity)?\.png|stack_\d+\.png|sample_\d+_[a-z]+\.png"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (outputs/demo)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=384,
        help="longer side of the motorcycle after downscaling, px (384)",
    )
    parser.add_argument("--stack", type=int, default=5, help="focal-stack length (5)")
    parser.add_argument("--strength", type=float, default=12.0, help="focal-stack blur K, px (12)")
    parser.add_argument("--synth-size", type=int, default=256, help="synthesized canvas side, px (256)")
    parser.add_argument("--samples", type=int, default=6, help="synthesized training pairs (6)")
    parser.add_argument("--rays-max", type=int, default=64, help="cap on rays per pixel (64)")
    parser.add_argument("--procedural", type=int, default=3, help="procedural foregrounds (3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesized set (0)")


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save(path: Path, x: np.ndarray) -> str:
    from PIL import Image

    x = np.asarray(x)
    Image.fromarray(_u8(x if x.ndim == 3 else x[..., None].repeat(3, -1))).save(path)
    return path.name


def motorcycle(longer_side: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The motorcycle's left view ``[H, W, 3]`` and disparity ``[H, W]`` in [0, 1] (near = 1), with its
    longer side area-downscaled to ``longer_side`` px, and a note on the filled pixels."""
    import skimage.data

    from bokehdiff_jax.io.images import fill_invalid
    from bokehdiff_jax.physics.optics import area_resize

    left, _, disp = skimage.data.stereo_motorcycle()
    img = left.astype(np.float32) / 255.0
    disp = np.asarray(disp, np.float32)
    filled, n_bad = fill_invalid(disp)
    disp = np.asarray(filled, np.float32)
    note = f"{n_bad} unknown disparity pixels ({100 * n_bad / disp.size:.1f}%) filled from neighbours"
    lo, hi = float(disp.min()), float(disp.max())
    disp = (disp - lo) / max(hi - lo, 1e-6)  # stereo disparity grows with nearness: near = 1 already
    h, w = disp.shape
    s = min(1.0, longer_side / max(h, w))
    size = (max(8, round(h * s)), max(8, round(w * s)))
    img = np.asarray(area_resize(np.moveaxis(img, -1, 0), size)).transpose(1, 2, 0)
    disp = np.asarray(area_resize(disp, size))
    return np.clip(img, 0, 1), np.clip(disp, 0, 1), note


def _embedded_inputs(folder: Path, n_procedural: int, seed: int) -> tuple[Path, Path]:
    """Writes the packaged foregrounds (RGBA) and backgrounds into ``folder/fg`` and ``folder/bg``.

    scikit-image ships the horse and logo as opaque RGBA (alpha 255 nearly everywhere), so mattes are
    derived: the horse is a black silhouette on white, the logo sits on white.
    """
    import skimage.data
    from PIL import Image

    from bokehdiff_jax.data.procedural import procedural_foreground

    fg, bg = folder / "fg", folder / "bg"
    fg.mkdir(parents=True)
    bg.mkdir(parents=True)
    horse = skimage.data.horse()  # bool, True = white paper around the silhouette
    alpha = (~horse).astype(np.float32)
    rgb = np.broadcast_to(np.array([0.36, 0.22, 0.12], np.float32), horse.shape + (3,))
    Image.fromarray(_u8(np.concatenate([rgb, alpha[..., None]], -1)), "RGBA").save(fg / "horse.png")
    logo = skimage.data.logo().astype(np.float32) / 255.0
    whiteness = logo[..., :3].min(-1)
    alpha = np.clip((1.0 - whiteness) * 4.0, 0.0, 1.0)  # soft matte from the distance to white
    Image.fromarray(_u8(np.concatenate([logo[..., :3], alpha[..., None]], -1)), "RGBA").save(fg / "logo.png")
    kinds = ("mixed", "hair", "fur", "whiskers")
    for i in range(n_procedural):
        rgba = procedural_foreground((320, 320), seed * 1000 + i, kind=kinds[i % len(kinds)])
        Image.fromarray(_u8(rgba), "RGBA").save(fg / f"procedural_{i}.png")
    for name in BACKGROUNDS:
        shutil.copy(Path(skimage.data.data_dir) / name, bg / name)
    return fg, bg


def _figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(src)}" loading="lazy">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _page(sections: list[tuple[str, str]]) -> str:
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
        ".row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:10px}"
        "figure{margin:0}img{max-width:320px;display:block}"
        "figcaption{font-size:12px;color:#444;max-width:320px}pre{font-size:12px;background:#f4f4f4}"
    )
    body = "".join(f"<h2>{html.escape(t)}</h2>{content}" for t, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>bokehdiff_jax demo</title>"
        f"<style>{style}</style></head><body><h1>bokehdiff_jax demo</h1>{body}</body></html>\n"
    )


def build(out: Path, args: argparse.Namespace) -> dict:
    """Writes every file of the demo into ``out`` (a fresh folder) and returns a summary."""
    from bokehdiff_jax.data.synthesis import SynthConfig, scan_inputs, synthesize_with_meta
    from bokehdiff_jax.render import ScatterConfig, focal_stack

    t0 = time.perf_counter()
    sections: list[tuple[str, str]] = []

    # 1. Motorcycle focal stack (classical scatter renderer).
    img, disp, note = motorcycle(args.image_size)
    a = _save(out / "motorcycle.png", img)
    b = _save(out / "motorcycle_disparity.png", disp)
    config = ScatterConfig(max_radius=max(1, int(np.ceil(args.strength))))
    focus_n, stack = focal_stack(img, disp, args.strength, args.stack, config=config)
    figs = [
        _figure(a, "all-in-focus input (Middlebury motorcycle, left view)"),
        _figure(b, f"disparity, near = white ({note})"),
    ]
    for k, (f, im) in enumerate(zip(np.asarray(focus_n), np.asarray(stack), strict=True)):
        figs.append(
            _figure(_save(out / f"stack_{k}.png", im), f"focus d_f = {f:.2f}, K = {args.strength:g} px")
        )
    sections.append(
        (
            f"Focal stack, scatter renderer ({img.shape[1]}x{img.shape[0]})",
            f'<div class="row">{"".join(figs)}</div>',
        )
    )
    t_stack = time.perf_counter() - t0

    # 2. Synthesized training pairs (layered ray tracer).
    fg_dir, bg_dir = _embedded_inputs(out / "inputs", args.procedural, args.seed)
    # Blur scaled with the canvas, so the released range (K in [3, 96] px at 768) keeps its look.
    synth = SynthConfig(
        size=args.synth_size,
        base_strength=12.0 * args.synth_size / 768,
        rays_max=args.rays_max,
        min_bg_side=16,
    )
    inputs = scan_inputs(fg_dir, bg_dir, synth)
    figs = [_figure(f"inputs/fg/{p.name}", f"foreground {p.name}") for p in inputs.fg]
    figs += [_figure(f"inputs/bg/{p.name}", f"background {p.name}") for p in inputs.bg]
    sections.append(
        (
            "Synthesis inputs",
            f'<div class="row">{"".join(figs)}</div><pre>{html.escape(inputs.summary())}</pre>',
        )
    )
    rows, metas = [], []
    for i in range(args.samples):
        sample, meta = synthesize_with_meta(synth, inputs.fg, inputs.bg, args.seed, i)
        metas.append(meta)
        cap = f"#{i}: focus {meta['focus']:.2f} on layer {meta['focus_layer']}, K = {meta['strength']:.1f} px"
        coc = sample["coc"] / max(float(sample["strength"]), 1e-6)  # |d - d_f| in [0, 1]
        figs = [
            _figure(_save(out / f"sample_{i}_aif.png", sample["aif"]), cap + " - all in focus"),
            _figure(
                _save(out / f"sample_{i}_disparity.png", sample["disparity"]), "disparity (near = white)"
            ),
            _figure(_save(out / f"sample_{i}_coc.png", coc), "defocus |d - d_f| (CoC / K)"),
            _figure(
                _save(out / f"sample_{i}_bokeh.png", sample["bokeh"]),
                f"ray-traced bokeh, {meta['n_rays']} rays",
            ),
        ]
        rows.append(f'<div class="row">{"".join(figs)}</div>')
    sections.append((f"Synthesized training pairs ({args.synth_size} px)", "".join(rows)))
    (out / "samples.json").write_text(json.dumps(metas, indent=1))
    summary = {
        "stack_seconds": round(t_stack, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "stack": len(focus_n),
        "samples": args.samples,
    }
    sections.append(("Run", f"<pre>{html.escape(json.dumps(summary, indent=1))}</pre>"))
    (out / "index.html").write_text(_page(sections))
    return summary


def run(args: argparse.Namespace) -> int:
    from bokehdiff_jax.errors import InputError
    from bokehdiff_jax.io.atomic import atomic_path, check_output_folder

    for name in ("image_size", "stack", "synth_size", "rays_max"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.samples < 0 or args.procedural < 0 or not (0 <= args.strength < float("inf")):
        raise InputError("--samples, --procedural and --strength must be >= 0")
    out = Path(args.out)
    check_output_folder(out, DEMO_FILES)  # replaced whole: only an earlier demo may be there
    with atomic_path(out, is_dir=True) as tmp:
        summary = build(tmp, args)
    print(f"demo written to {out / 'index.html'} ({summary['total_seconds']} s)")
    return 0
