"""Paired-data synthesis (paper Sec. 3.3, SPEC section 4): layered scenes rendered by the ray tracer.

A scene is, back to front, a real all-in-focus background and one or more RGBA foregrounds, each on a
tilted plane whose disparity is linear in the image position. The all-in-focus image and disparity map
come from compositing the layers; the bokeh target from ray tracing them through a thin lens
(``bokehdiff_jax.render.render_layers``). Every random choice of an example comes from ONE generator,
``np.random.default_rng([seed, index])``, so an example depends only on ``(config, inputs, seed, index)``.

Units. ``K`` (``strength``) is the CoC radius in pixels of the *output* canvas per unit of defocus:
``r = K |d - d_f|``; ``K = base_strength * times`` with ``times = 2 ** U(log2_times)``, so the released
ranges give ``K`` in [3, 96] px at 768 px. The conditioning ``strength`` is exactly the ``K`` the target
was rendered with (the original adds an unrecorded factor; SPEC section 6).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif")

# A foreground or background given as a file, or as an in-memory array (``[H, W, 4]`` / ``[H, W, 3]``).
Source = str | os.PathLike | np.ndarray


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the scene model; the defaults are the released ranges (SPEC section 4).

    Disparities are in [0, 1] (1 = near). Tilts are the total disparity change across the output
    canvas, ``|gx| + |gy|`` of the plane ``d0 + gx (x / W - 0.5) + gy (y / H - 0.5)``.
    """

    size: int = 768  # output canvas side, pixels (square)
    base_strength: float = 12.0  # K at times = 1, pixels of the output canvas
    log2_times: tuple[float, float] = (-2.0, 3.0)  # times = 2 ** U(lo, hi): K in [3, 96] px by default
    # Padding per side, in units of K. The CoC radius never exceeds K (|d - d_f| <= 1), so 1 K per side
    # gives every ray landing in the crop real content; the released code pads 2 K per side (+4K).
    pad_factor: float = 1.0
    pad_multiple: int = 16  # padding rounded up to a multiple: a handful of shapes, few recompilations
    rays_per_times: float = 21.0  # rays ~ 21 * times (released)
    rays_min: int = 8
    rays_max: int = 256
    ray_multiple: int = 8  # ray count rounded up to a multiple (static in the tracer: bounds recompiles)
    bg_disparity: tuple[float, float] = (0.0, 0.5)  # the background plane stays inside this range
    bg_tilt: tuple[float, float] = (0.0, 0.25)  # up to 1/4 of the disparity range (released)
    fg_disparity_max: float = 0.95  # foregrounds lie above the background, below this (never 1)
    fg_tilt: tuple[float, float] = (0.0, 0.25)  # a real foreground tilt (the original's was a no-op)
    fg_count: tuple[int, int] = (1, 2)  # inclusive range of foregrounds per scene
    fg_scale: tuple[float, float] = (0.35, 0.9)  # fg bounding box's longer side / canvas side
    fg_flip_prob: float = 0.5  # horizontal flip
    fg_focus_prob: float = 0.5  # focus on a foreground's mean disparity, else the background's
    bg_zoom: tuple[float, float] = (1.0, 1.5)  # crop side = shorter image side / zoom (aspect kept)
    max_input_side: int = 4096  # larger inputs are downscaled on load (area filter)
    min_fg_side: int = 8  # foregrounds whose opaque part is smaller are skipped
    min_bg_side: int = 64  # backgrounds smaller than this are skipped

    def __post_init__(self) -> None:
        checks = [
            (self.size >= 16, f"size must be >= 16, got {self.size}"),
            (self.base_strength >= 0, "base_strength must be >= 0"),
            (self.log2_times[0] <= self.log2_times[1], "log2_times must be (lo, hi) with lo <= hi"),
            (
                0 <= self.bg_disparity[0] <= self.bg_disparity[1] < self.fg_disparity_max < 1,
                "need 0 <= bg_disparity lo <= hi < fg_disparity_max < 1",
            ),
            (1 <= self.fg_count[0] <= self.fg_count[1], "fg_count must be (lo, hi) with 1 <= lo <= hi"),
            (
                0 < self.fg_scale[0] <= self.fg_scale[1] <= 1,
                "fg_scale must be (lo, hi) with 0 < lo <= hi <= 1",
            ),
            (1 <= self.rays_min <= self.rays_max, "need 1 <= rays_min <= rays_max"),
            (self.ray_multiple >= 1 and self.pad_multiple >= 1, "ray_multiple and pad_multiple must be >= 1"),
            (
                0 <= self.fg_flip_prob <= 1 and 0 <= self.fg_focus_prob <= 1,
                "fg_flip_prob and fg_focus_prob must be in [0, 1]",
            ),
            (
                1 <= self.bg_zoom[0] <= self.bg_zoom[1],
                "bg_zoom must be (lo, hi) with 1 <= lo <= hi (crops only)",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthConfig: {msg}")


@dataclasses.dataclass
class InputReport:
    """What a scan of input folders found: usable files, skipped ones and converted ones, with reasons."""

    used: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def summary(self, role: str = "inputs") -> str:
        lines = [
            f"{role}: {len(self.used)} usable, {len(self.skipped)} skipped, {len(self.converted)} converted"
        ]
        lines += [f"  skipped {p}: {r}" for p, r in self.skipped]
        lines += [f"  converted {p}: {r}" for p, r in self.converted]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A sampled scene, ready for the renderer. Canvas = output canvas + ``pad`` pixels per side.

    ``rgba_lhwc``: ``[L, Hp, Wp, 4]`` sRGB + straight alpha, back to front (layer 0 the background);
    ``planes_l3``: ``[L, 3]`` ``(d0, gx, gy)`` on the padded canvas; ``focus`` a disparity; ``strength``
    K in pixels; ``n_rays`` aperture samples; ``meta`` a JSON-ready description.
    """

    rgba_lhwc: np.ndarray
    planes_l3: np.ndarray
    focus: float
    strength: float
    n_rays: int
    pad: int
    meta: dict[str, Any]


# ----------------------------------------------------------------------------------------- inputs


def _pil_note(path: Path, max_side: int) -> str:
    """Describes the conversions a file needs (mode, bit depth, EXIF rotation, size), from its header."""
    from PIL import Image

    with Image.open(path) as im:
        notes = []
        if max(im.size) > max_side:
            notes.append(f"downscaled from {im.size[0]}x{im.size[1]} to at most {max_side} px")
        if im.mode not in ("RGB", "RGBA"):
            notes.append(f"{im.mode} converted")
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block is not worth a skip; the pixels decide
            orientation = 1
        if orientation not in (1, None):
            notes.append(f"EXIF orientation {orientation} applied")
        return ", ".join(notes)


def _downscale(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    return _resize(img, (max(1, round(h * s)), max(1, round(w * s))), premultiply=img.shape[-1] == 4)


def _resize(img: np.ndarray, hw: tuple[int, int], *, premultiply: bool = False) -> np.ndarray:
    """Resizes ``[H, W, C]`` float32 to ``hw`` with PIL's Lanczos filter on float planes.

    RGBA is resized premultiplied (transparent pixels' colours must not bleed into edges), then the
    alpha is clipped to [0, 1] (Lanczos overshoots; the original forgot this) and unpremultiplied.
    """
    from PIL import Image

    h, w = hw
    x = img.astype(np.float32)
    if premultiply:
        x = np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], axis=-1)
    filt = Image.Resampling.BOX if (h < img.shape[0] and w < img.shape[1]) else Image.Resampling.LANCZOS
    out = np.stack(
        [np.asarray(Image.fromarray(x[..., c], mode="F").resize((w, h), filt)) for c in range(x.shape[-1])],
        axis=-1,
    )
    if premultiply:
        a = np.clip(out[..., 3:], 0.0, 1.0)
        rgb = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
        out = np.concatenate([rgb, a], axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _alpha_bbox(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive-exclusive ``(r0, r1, c0, c1)`` of ``alpha > 0`` (no off-by-one), or None if empty."""
    rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def load_foreground(src: Source, config: SynthConfig) -> np.ndarray:
    """A foreground as ``[h, w, 4]`` float32, cropped to its alpha's bounding box, downscaled if huge.

    Raises ``InputError`` with the reason when it cannot be used (unreadable, no transparency, fully
    transparent, too small).
    """
    if isinstance(src, np.ndarray):
        rgba = np.asarray(src, np.float32)
        if rgba.ndim != 3 or rgba.shape[-1] != 4:
            raise InputError(f"in-memory foreground must be [H, W, 4], got {rgba.shape}")
    else:
        from bokehdiff_jax.io.images import read_rgba

        rgba = np.asarray(read_rgba(src), np.float32)
    alpha = np.clip(rgba[..., 3], 0.0, 1.0)
    if alpha.min() >= 1.0 - 1e-6:
        raise InputError(
            "no transparency (no alpha channel, or alpha is 1 everywhere): a foreground needs an alpha matte"
        )
    box = _alpha_bbox(alpha > 1e-3)
    if box is None:
        raise InputError("fully transparent (alpha is 0 everywhere)")
    r0, r1, c0, c1 = box
    if min(r1 - r0, c1 - c0) < config.min_fg_side:
        raise InputError(
            f"too small: visible part {c1 - c0}x{r1 - r0} px, need at least {config.min_fg_side} px per side"
        )
    rgba = np.concatenate([rgba[r0:r1, c0:c1, :3], alpha[r0:r1, c0:c1, None]], axis=-1)
    return _downscale(rgba, config.max_input_side)


def load_background(src: Source, config: SynthConfig) -> np.ndarray:
    """A background as ``[h, w, 3]`` float32, downscaled if huge; ``InputError`` if unusable."""
    if isinstance(src, np.ndarray):
        rgb = np.asarray(src, np.float32)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise InputError(f"in-memory background must be [H, W, 3], got {rgb.shape}")
    else:
        from bokehdiff_jax.io.images import read_image

        rgb = np.asarray(read_image(src), np.float32)
    if min(rgb.shape[:2]) < config.min_bg_side:
        raise InputError(
            f"too small: {rgb.shape[1]}x{rgb.shape[0]} px, need at least {config.min_bg_side} px per side"
        )
    return _downscale(rgb, config.max_input_side)


def scan_folder(folder: str | os.PathLike, role: str, config: SynthConfig) -> tuple[list[Path], InputReport]:
    """Checks every file of ``folder`` (sorted, non-recursive) as a foreground or background.

    Each file is fully decoded once, so corrupt files are found now rather than mid-run. Returns the
    usable paths (sorted) and the report. ``role``: ``"fg"`` or ``"bg"``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{role} folder {folder} does not exist or is not a folder")
    load = load_foreground if role == "fg" else load_background
    report, usable = InputReport(), []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            report.skipped.append((str(path), f"not an image file (suffix {path.suffix or 'none'})"))
            continue
        try:
            load(path, config)
            note = _pil_note(path, config.max_input_side)
        except InputError as e:
            reason = str(e)  # the report names the file already
            report.skipped.append((str(path), reason.removeprefix(f"{path}: ")))
            continue
        except Exception as e:  # a decoder failure on a bad file must never stop the scan
            report.skipped.append((str(path), f"unreadable: {type(e).__name__}: {e}"))
            continue
        if note:
            report.converted.append((str(path), note))
        usable.append(path)
        report.used.append(str(path))
    return usable, report


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Scanned, usable inputs (sorted) and the reports of both folders."""

    fg: tuple[Path, ...]
    bg: tuple[Path, ...]
    fg_report: InputReport
    bg_report: InputReport

    def summary(self) -> str:
        return self.fg_report.summary("foregrounds") + "\n" + self.bg_report.summary("backgrounds")


def scan_inputs(fg_dir: str | os.PathLike, bg_dir: str | os.PathLike, config: SynthConfig) -> Inputs:
    """Scans both folders; an empty usable set is an ``InputError`` that lists why files were skipped."""
    fg, fg_rep = scan_folder(fg_dir, "fg", config)
    bg, bg_rep = scan_folder(bg_dir, "bg", config)
    for role, paths, rep, folder in (("foreground", fg, fg_rep, fg_dir), ("background", bg, bg_rep, bg_dir)):
        if not paths:
            why = "; ".join(f"{Path(p).name}: {r}" for p, r in rep.skipped[:5]) or "the folder has no files"
            raise InputError(f"no usable {role} image in {folder} ({why})")
    return Inputs(tuple(fg), tuple(bg), fg_rep, bg_rep)


# ----------------------------------------------------------------------------------------- scenes


def _round_up(x: float, m: int) -> int:
    return int(math.ceil(x / m) * m) if m > 1 else int(math.ceil(x))


def _sample_plane(rng: np.random.Generator, lo: float, hi: float, tilt: tuple[float, float], extent: float):
    """A plane ``(d0, gx, gy)`` in output-canvas coordinates whose values over the padded canvas
    (``extent`` = padded side / output side) stay within ``[lo, hi]``; total tilt ``|gx| + |gy|``
    ~ U(tilt), capped by the room the range leaves."""
    room = (hi - lo) / extent
    total = min(rng.uniform(*tilt), room)
    share = rng.uniform()
    gx = total * share * rng.choice((-1.0, 1.0))
    gy = total * (1 - share) * rng.choice((-1.0, 1.0))
    half = total * extent / 2
    d0 = rng.uniform(lo + half, hi - half)
    return float(d0), float(gx), float(gy)


def _load_with_fallback(
    sources: Sequence[Source], start: int, load, config, skipped: list
) -> tuple[int, Any]:
    """Loads ``sources[start]``, or, if it fails now (e.g. changed on disk since the scan), the next
    ones in order: deterministic, never a crash mid-run while any input is usable."""
    n = len(sources)
    for k in range(n):
        i = (start + k) % n
        try:
            return i, load(sources[i], config)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this input"
            skipped.append((str(sources[i]) if not isinstance(sources[i], np.ndarray) else f"#{i}", str(e)))
    raise InputError(f"none of the {n} inputs could be loaded: {skipped[-1][1] if skipped else ''}")


def sample_scene(
    config: SynthConfig,
    fg_sources: Sequence[Source],
    bg_sources: Sequence[Source],
    seed: int,
    index: int,
) -> Scene:
    """Samples scene ``index`` of the stream ``seed``: layers, planes, focus, strength, rays.

    Inputs are used in the given order (pass sorted lists, e.g. from ``scan_inputs``). All randomness
    comes from ``np.random.default_rng([seed, index])``.
    """
    if not fg_sources or not bg_sources:
        raise InputError("need at least one foreground and one background")
    rng = np.random.default_rng([int(seed), int(index)])
    s = config.size

    times = float(2.0 ** rng.uniform(*config.log2_times))
    strength = config.base_strength * times
    pad = _round_up(config.pad_factor * strength, config.pad_multiple) if strength > 0 else 0
    p_side = s + 2 * pad
    extent = p_side / s
    n_rays = int(
        np.clip(
            _round_up(config.rays_per_times * times, config.ray_multiple), config.rays_min, config.rays_max
        )
    )
    skipped: list[tuple[str, str]] = []

    # Background: an aspect-preserving square crop (zoomed in by bg_zoom), resized to the padded canvas.
    bi, bg = _load_with_fallback(
        bg_sources, int(rng.integers(len(bg_sources))), load_background, config, skipped
    )
    h, w = bg.shape[:2]
    side = max(1, int(round(min(h, w) / rng.uniform(*config.bg_zoom))))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    bg_rgb = _resize(bg[y0 : y0 + side, x0 : x0 + side], (p_side, p_side))
    bg_plane = _sample_plane(rng, *config.bg_disparity, config.bg_tilt, extent)
    bg_hi = bg_plane[0] + (abs(bg_plane[1]) + abs(bg_plane[2])) * extent / 2

    # Foregrounds: each in its own disparity band above the background, so planes never cross and
    # the back-to-front order of layers is the depth order everywhere.
    n_fg = int(rng.integers(config.fg_count[0], config.fg_count[1] + 1))
    edges = np.linspace(bg_hi, config.fg_disparity_max, n_fg + 1)
    layers = [np.concatenate([bg_rgb, np.ones((p_side, p_side, 1), np.float32)], axis=-1)]
    planes = [bg_plane]
    meta_layers: list[dict[str, Any]] = [
        {
            "kind": "background",
            "source": _name(bg_sources[bi]),
            "crop_xywh": [x0, y0, side, side],
            "plane": list(bg_plane),
        }
    ]
    for k in range(n_fg):
        fi, fg = _load_with_fallback(
            fg_sources, int(rng.integers(len(fg_sources))), load_foreground, config, skipped
        )
        scale = rng.uniform(*config.fg_scale) * s / max(fg.shape[:2])
        fh = int(np.clip(round(fg.shape[0] * scale), 1, s))
        fw = int(np.clip(round(fg.shape[1] * scale), 1, s))
        fg = _resize(fg, (fh, fw), premultiply=True)
        flip = bool(rng.uniform() < config.fg_flip_prob)
        if flip:
            fg = fg[:, ::-1]
        ty, tx = int(rng.integers(s - fh + 1)), int(rng.integers(s - fw + 1))
        layer = np.zeros((p_side, p_side, 4), np.float32)
        layer[pad + ty : pad + ty + fh, pad + tx : pad + tx + fw] = fg
        layers.append(layer)
        plane = _sample_plane(rng, float(edges[k]), float(edges[k + 1]), config.fg_tilt, extent)
        planes.append(plane)
        meta_layers.append(
            {
                "kind": "foreground",
                "source": _name(fg_sources[fi]),
                "scale": scale,
                "flip": flip,
                "box_xywh": [tx, ty, fw, fh],
                "plane": list(plane),
            }
        )

    # Focus on the mean disparity of one layer: alpha-weighted over the visible canvas.
    target = int(rng.integers(1, n_fg + 1)) if rng.uniform() < config.fg_focus_prob else 0
    d0, gx, gy = planes[target]
    alpha = layers[target][pad : pad + s, pad : pad + s, 3].astype(np.float64)
    u = (np.arange(s) + 0.5) / s - 0.5
    plane_map = d0 + gx * u[None, :] + gy * u[:, None]
    focus = float((plane_map * alpha).sum() / max(alpha.sum(), 1e-12))

    # Planes on the padded canvas: x_pad / Wp - 0.5 = (x / W - 0.5) W / Wp, so gradients scale by extent.
    planes_l3 = np.asarray([(d, gx_ * extent, gy_ * extent) for d, gx_, gy_ in planes], np.float32)
    meta = {
        "seed": int(seed),
        "index": int(index),
        "size": s,
        "pad": pad,
        "times": times,
        "strength": strength,
        "focus": focus,
        "focus_layer": target,
        "n_rays": n_rays,
        "layers": meta_layers,
        "skipped_inputs": skipped,
        "plane_convention": "d(x, y) = d0 + gx (x / W - 0.5) + gy (y / H - 0.5), output canvas",
    }
    return Scene(np.stack(layers), planes_l3, focus, strength, n_rays, pad, meta)


def _name(src: Source) -> str:
    return f"<array {src.shape}>" if isinstance(src, np.ndarray) else str(src)


def render_scene(scene: Scene, config: SynthConfig) -> dict[str, np.ndarray]:
    """Renders a scene and crops the padding: ``{aif [S,S,3], bokeh [S,S,3], disparity [S,S], focus (),
    strength (), coc [S,S]}`` (float32 NumPy; ``coc`` = ``strength * |disparity - focus|`` in pixels)."""
    from bokehdiff_jax.render import composite_layers, render_layers

    rgba = scene.rgba_lhwc
    aif, disp = composite_layers(rgba, scene.planes_l3)
    bokeh = render_layers(
        rgba, scene.planes_l3, scene.focus, scene.strength, config=_layered_config(scene.n_rays)
    )
    p, s = scene.pad, config.size
    crop = (slice(p, p + s), slice(p, p + s))
    aif = np.asarray(aif, np.float32)[crop]
    disp = np.asarray(disp, np.float32)[crop]
    bokeh = np.asarray(bokeh, np.float32)[crop]
    return {
        "aif": np.clip(aif, 0.0, 1.0),
        "bokeh": np.clip(bokeh, 0.0, 1.0),
        "disparity": disp,
        "focus": np.float32(scene.focus),
        "strength": np.float32(scene.strength),
        "coc": (np.float32(scene.strength) * np.abs(disp - np.float32(scene.focus))).astype(np.float32),
    }


def _layered_config(n_rays: int):
    from bokehdiff_jax.render import LayeredConfig

    return dataclasses.replace(LayeredConfig(), num_rays=n_rays)


def synthesize_with_meta(
    config: SynthConfig, fg_sources: Sequence[Source], bg_sources: Sequence[Source], seed: int, index: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``synthesize`` plus the scene's JSON-ready metadata (layers, planes, sources, rays, padding)."""
    scene = sample_scene(config, fg_sources, bg_sources, seed, index)
    return render_scene(scene, config), scene.meta


def synthesize(
    config: SynthConfig, fg_sources: Sequence[Source], bg_sources: Sequence[Source], seed: int, index: int
) -> dict[str, np.ndarray]:
    """Example ``index`` of stream ``seed``: ``{aif, bokeh, disparity, focus, strength, coc}``.

    ``aif``, ``bokeh``: ``[S, S, 3]`` sRGB in [0, 1]; ``disparity``: ``[S, S]`` in [0, 1] (1 near);
    ``focus``: disparity; ``strength``: K in pixels (the one that rendered ``bokeh``); ``coc``: ``[S, S]``
    CoC radius in pixels. Identical for identical ``(config, inputs, seed, index)``.
    """
    return synthesize_with_meta(config, fg_sources, bg_sources, seed, index)[0]
