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

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import float_in, int_in

# Every name the demo writes into its folder, and the marker proving a folder is an earlier demo: only
# such a folder, holding nothing else, is replaced.
DEMO_FILES = (
    r"index\.html|samples\.json|inputs|motorcycle(_disparity)?\.png|stack_\d+\.png|sample_\d+_[a-z]+\.png"
)
DEMO_MARKER, DEMO_FORMAT = "demo.json", "bokehdiff_jax.demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="outputs/demo",
        help="output folder; an existing one is replaced only if it is an earlier demo (outputs/demo)",
    )
    parser.add_argument(
        "--image-size",
        type=int_in(8, 4096),
        default=384,
        help="longer side of the motorcycle after downscaling, 8..4096 px (384)",
    )
    parser.add_argument("--stack", type=int_in(1, 64), default=5, help="focal-stack length, 1..64 (5)")
    parser.add_argument(
        "--strength", type=float_in(0, 256), default=12.0, help="focal-stack blur K, 0..256 px (12.0)"
    )
    parser.add_argument(
        "--synth-size", type=int_in(16, 2048), default=256, help="synthesized canvas side, 16..2048 px (256)"
    )
    parser.add_argument(
        "--samples", type=int_in(0, 1000), default=6, help="synthesized training pairs, 0..1000 (6)"
    )
    parser.add_argument(
        "--rays-max", type=int_in(1, 4096), default=64, help="cap on rays per pixel, 1..4096 (64)"
    )
    parser.add_argument(
        "--procedural", type=int_in(0, 100), default=3, help="procedural foregrounds, 0..100 (3)"
    )
    parser.add_argument("--seed", type=int_in(0), default=0, help="seed of the synthesized set, >= 0 (0)")


def _save(path: Path, x: np.ndarray) -> str:
    from PIL import Image

    from bokehdiff_jax.io.images import to_uint8

    x = np.asarray(x)
    Image.fromarray(to_uint8(x if x.ndim == 3 else x[..., None].repeat(3, -1))).save(path)
    return path.name


def motorcycle(longer_side: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The motorcycle's left view ``[H, W, 3]`` and disparity ``[H, W]`` in [0, 1] (near = 1), with its
    longer side area-downscaled to ``longer_side`` px, and a note on the filled pixels."""
    from bokehdiff_jax.data import samples

    scene = samples.motorcycle(samples.fit_longer_side(samples.motorcycle_shape(), longer_side))
    pct = 100 * scene.n_filled / scene.n_pixels
    note = f"{scene.n_filled} unknown disparity pixels ({pct:.1f}%) filled from neighbours"
    return scene.image, scene.disparity, note


def _embedded_inputs(folder: Path, n_procedural: int, seed: int) -> tuple[Path, Path]:
    """Writes the packaged foregrounds (RGBA) and backgrounds into ``folder/fg`` and ``folder/bg``."""
    from PIL import Image

    from bokehdiff_jax.data import samples
    from bokehdiff_jax.data.procedural import procedural_foreground
    from bokehdiff_jax.io.images import to_uint8

    fg, bg = folder / "fg", folder / "bg"
    fg.mkdir(parents=True)
    bg.mkdir(parents=True)
    Image.fromarray(to_uint8(samples.horse_rgba()), "RGBA").save(fg / "horse.png")
    Image.fromarray(to_uint8(samples.logo_rgba()), "RGBA").save(fg / "logo.png")
    kinds = ("mixed", "hair", "fur", "whiskers")
    for i in range(n_procedural):
        rgba = procedural_foreground((320, 320), seed * 1000 + i, kind=kinds[i % len(kinds)])
        Image.fromarray(to_uint8(rgba), "RGBA").save(fg / f"procedural_{i}.png")
    for path in samples.photo_paths():
        shutil.copy(path, bg / path.name)
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
    from bokehdiff_jax.data.synthesis import scan_inputs, synthesize_with_meta
    from bokehdiff_jax.physics.focus import needed_radius
    from bokehdiff_jax.render import ScatterConfig, focal_stack

    t0 = time.perf_counter()
    sections: list[tuple[str, str]] = []

    # 1. Motorcycle focal stack (classical scatter renderer).
    img, disp, note = motorcycle(args.image_size)
    a = _save(out / "motorcycle.png", img)
    b = _save(out / "motorcycle_disparity.png", disp)
    config = ScatterConfig(max_radius=max(1, needed_radius(disp, None, args.strength)))
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
    synth = synth_config(args)
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
    (out / DEMO_MARKER).write_text(json.dumps({"format": DEMO_FORMAT, **summary}, indent=1) + "\n")
    return summary


def synth_config(args: argparse.Namespace):
    """The demo's synthesis settings; a combination ``SynthConfig`` rejects is an ``InputError``."""
    from bokehdiff_jax.data.synthesis import SynthConfig

    try:
        # Blur scaled with the canvas, so the released range (K in [3, 96] px at 768) keeps its look.
        return SynthConfig(
            size=args.synth_size,
            base_strength=12.0 * args.synth_size / 768,
            rays_max=args.rays_max,
            min_bg_side=16,
        )
    except ValueError as e:  # SynthConfig's checks raise ValueError (InputError is one too)
        raise InputError(f"{e} (from --synth-size / --rays-max)") from None


def run(args: argparse.Namespace) -> int:
    import sys

    from bokehdiff_jax.io.atomic import atomic_path, check_replaceable, check_writable, recover, sweep_stale

    synth_config(args)  # every flag checked before any work (each one's range by the parser)
    out = Path(args.out)
    for note in recover(out) + sweep_stale(out.absolute().parent):  # leftovers of a killed run
        print(f"note: {note}", file=sys.stderr)
    # Replaced whole: only an earlier demo holding nothing else may be there.
    check_replaceable(out, marker=DEMO_MARKER, format=DEMO_FORMAT, names=DEMO_FILES, what="demo")
    check_writable(out)
    with atomic_path(out, is_dir=True) as tmp:
        summary = build(tmp, args)
    print(f"demo written to {out / 'index.html'} ({summary['total_seconds']} s)")
    return 0
