"""Paired-data synthesis (paper Sec. 3.3, SPEC section 4): layered scenes rendered by the ray tracer.

A scene is, back to front, a real all-in-focus background and one or more RGBA foregrounds, each on a
tilted plane whose disparity is linear in the image position. The all-in-focus image and disparity map
come from compositing the layers; the bokeh target from ray tracing them through a thin lens
(``bokehdiff_jax.render.render_layers``). Every random choice of an example comes from ONE generator,
``np.random.default_rng([seed, index])``, so an example depends only on ``(config, inputs, seed, index)``.

Units. ``K`` (``strength``) is the CoC radius in pixels of the *output* canvas per unit of defocus:
``r = K |d - d_f|``; ``K = 12 * times / max(d_f, 1 - d_f)`` at 768 px (scaled with the canvas), as
released, so the largest radius is at most ``12 * times`` (3 to 96 px) and ``K`` lies in [3, 192] px.
The conditioning ``strength`` is exactly the ``K`` the target was rendered with (the original tells
the model another, unrecorded one; SPEC section 6).
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
    """Every parameter of the scene model. The defaults follow the released sampling (SPEC section 4);
    each deliberate difference is listed at the end with its reason.

    Blur: ``times = 2 ** U(log2_times)`` and, as released, ``K = base_strength * times / max(d_f, 1 - d_f)``
    with ``base_strength`` 12 px at 768 px (``None``: ``12 * size / 768``, so blur scales with the canvas).
    The CoC radius ``r = K |d - d_f|`` (``physics.optics.coc_radius``) is then at most
    ``base_strength * times`` (3 to 96 px at 768 px): the largest radius of a scene depends on ``times``
    and little else; ``K`` itself lies in [3, 192] px at 768 px. The recorded ``strength`` is exactly the
    ``K`` that rendered the target (SPEC section 6).

    Disparity (1 = near): the background is a tilted plane whose farthest point, over the padded canvas,
    is at ``U(bg_far)`` (released: 0) and whose total change across the padded canvas is ``U(bg_tilt)``
    (released: up to 1/4); each foreground is a plane lying, over the padded canvas, in its own band
    between the background's nearest point and ``fg_disparity_max`` (one foreground, released: uniform
    above the background). Tilts are ``|gx| + |gy|`` of ``d0 + gx (x / W - 0.5) + gy (y / H - 0.5)``.
    Focus: the mean disparity of a foreground (probability ``fg_focus_prob``) or of the background.

    Foregrounds (released): the alpha's bounding box gets the area ``U(fg_scale)**2`` of the frame (aspect
    kept), shrunk by 0.9 until it fits; its centre is the frame's centre moved by up to a quarter of the
    frame per axis, then the box is moved inside the frame.

    Labels: ``disparity_label`` is how the disparity map labels pixels several layers share (fractional
    alpha; ``render.layered.composite_layers``): ``"blend"`` (alpha-blended, as released), ``"threshold"``
    (the nearest layer with alpha >= ``label_threshold``) or ``"front"`` (the nearest with any alpha).

    Rendering: the layered tracer's aperture cells (``render.layered``), ``rays_min``..``rays_max`` rays per
    pixel, each cell at most ``cell_px`` pixels wide on a layer: converged targets (BENCHMARKS.md).

    Deliberate differences from the released sampling, and why:

    - real foreground tilts (released: a no-op): progressive blur across a foreground (paper Sec. 3.3);
    - foreground disparity at most ``fg_disparity_max`` = 0.99 (released: up to 1): disparity 1 is
      singular in the occlusion ray formula (SPEC section 6);
    - foreground size and placement relative to the output frame, kept inside it (released: relative to
      the padded canvas, so the crop may cut a foreground off);
    - backgrounds are aspect-preserving square crops zoomed by ``U(bg_zoom)`` (released: stretched);
    - foregrounds are flipped left-right with ``fg_flip_prob`` (released: whole examples flipped in
      training, the same augmentation);
    - padding is the largest possible CoC radius (released: a fixed 24 px, so larger blurs read
      edge-clamped pixels);
    - rays: aperture cells with footprint averages, converged (released: ``(21 * times)**2`` points).
    """

    size: int = 768  # output canvas side, pixels (square)
    base_strength: float | None = None  # largest CoC radius at times = 1, px; None: 12 * size / 768
    log2_times: tuple[float, float] = (-2.0, 3.0)  # times = 2 ** U(lo, hi) (released)
    # Padding per side, in units of the largest possible CoC radius: 1 gives every ray landing in the
    # crop real content.
    pad_factor: float = 1.0
    pad_multiple: int = 16  # padding rounded up to a multiple: a handful of shapes, few recompilations
    rays_min: int = 1  # rays (aperture cells) per pixel, lower bound
    rays_max: int = 4096  # upper bound; the tracer picks per 16 x 16 tile from the local CoC
    cell_px: float = 8.0  # largest footprint of one aperture cell on a layer, px
    bg_far: tuple[float, float] = (0.0, 0.0)  # disparity of the background's farthest point (released: 0)
    bg_tilt: tuple[float, float] = (0.0, 0.25)  # up to 1/4 of the disparity range (released)
    fg_disparity_max: float = 0.99  # foregrounds lie above the background, below this (never 1)
    fg_tilt: tuple[float, float] = (0.0, 0.25)  # a real foreground tilt (the original's was a no-op)
    fg_count: tuple[int, int] = (1, 1)  # inclusive range of foregrounds per scene (released: 1)
    fg_scale: tuple[float, float] = (0.5, 1.0)  # sqrt of the fg box's area / frame area (released)
    fg_shift: float = 0.25  # the fg centre moves up to this fraction of the frame per axis (released)
    fg_flip_prob: float = 0.5  # horizontal flip
    fg_focus_prob: float = 0.5  # focus on a foreground's mean disparity, else the background's
    bg_zoom: tuple[float, float] = (1.0, 1.5)  # crop side = shorter image side / zoom (aspect kept)
    disparity_label: str = "blend"  # "blend" (released), "threshold" or "front"
    label_threshold: float = 0.5  # alpha bar of the "threshold" label
    max_input_side: int = 4096  # larger inputs are downscaled on load (area filter)
    min_fg_side: int = 8  # foregrounds whose opaque part is smaller are skipped
    min_bg_side: int = 64  # backgrounds smaller than this are skipped

    def __post_init__(self) -> None:
        from bokehdiff_jax.render.layered import DISPARITY_LABELS

        checks = [
            (self.size >= 16, f"size must be >= 16, got {self.size}"),
            (
                self.base_strength is None or 0 <= self.base_strength < math.inf,
                "base_strength must be None or a finite number >= 0",
            ),
            (self.log2_times[0] <= self.log2_times[1], "log2_times must be (lo, hi) with lo <= hi"),
            (
                0 <= self.bg_far[0] <= self.bg_far[1] < self.fg_disparity_max < 1,
                "need 0 <= bg_far lo <= hi < fg_disparity_max < 1",
            ),
            (
                0 <= self.bg_tilt[0] <= self.bg_tilt[1] and 0 <= self.fg_tilt[0] <= self.fg_tilt[1],
                "bg_tilt and fg_tilt must be (lo, hi) with 0 <= lo <= hi",
            ),
            (1 <= self.fg_count[0] <= self.fg_count[1], "fg_count must be (lo, hi) with 1 <= lo <= hi"),
            (
                0 < self.fg_scale[0] <= self.fg_scale[1] <= 1,
                "fg_scale must be (lo, hi) with 0 < lo <= hi <= 1",
            ),
            (0 <= self.fg_shift <= 0.5, "fg_shift must be in [0, 0.5]"),
            (1 <= self.rays_min <= self.rays_max, "need 1 <= rays_min <= rays_max"),
            (0 < self.cell_px < math.inf, "cell_px must be > 0"),
            (self.pad_factor >= 0 and self.pad_multiple >= 1, "need pad_factor >= 0 and pad_multiple >= 1"),
            (
                0 <= self.fg_flip_prob <= 1 and 0 <= self.fg_focus_prob <= 1,
                "fg_flip_prob and fg_focus_prob must be in [0, 1]",
            ),
            (
                1 <= self.bg_zoom[0] <= self.bg_zoom[1],
                "bg_zoom must be (lo, hi) with 1 <= lo <= hi (crops only)",
            ),
            (
                self.disparity_label in DISPARITY_LABELS,
                f"disparity_label must be one of {', '.join(DISPARITY_LABELS)}, got {self.disparity_label!r}",
            ),
            (0 < self.label_threshold <= 1, "label_threshold must be in (0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthConfig: {msg}")

    @property
    def strength_scale(self) -> float:
        """The largest CoC radius at ``times = 1``, px of the output canvas."""
        return 12.0 * self.size / 768.0 if self.base_strength is None else float(self.base_strength)


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
    K in pixels; ``meta`` a JSON-ready description (keys sorted at every level).
    """

    rgba_lhwc: np.ndarray
    planes_l3: np.ndarray
    focus: float
    strength: float
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
    """Resizes ``[H, W, C]`` float32 to ``hw`` with PIL filters on float planes.

    RGBA (``premultiply``) is resized premultiplied, so transparent pixels' colours never bleed into
    edges, with a filter whose weights are never negative: a box when both sides shrink, else PIL's
    bilinear (a tent, widened when a side shrinks). Every output pixel is then a convex combination of
    input pixels with the same weights for colour and alpha: alpha stays in [0, 1] without clipping
    (no ring of alpha outside an edge) and ``colour = premultiplied / alpha`` is exactly the colour of a
    uniformly coloured foreground up to its edge (Lanczos rings, and clipping its alpha shifted the
    edge colours). Opaque RGB uses Lanczos when enlarging (sharper; its overshoot is clipped).
    """
    from PIL import Image

    h, w = hw
    x = img.astype(np.float32)
    shrink = h <= img.shape[0] and w <= img.shape[1]
    if premultiply:
        x = np.concatenate([x[..., :3] * x[..., 3:], x[..., 3:]], axis=-1)
        filt = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    else:
        filt = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
    out = np.stack(
        [np.asarray(Image.fromarray(x[..., c], mode="F").resize((w, h), filt)) for c in range(x.shape[-1])],
        axis=-1,
    )
    if premultiply:
        a = out[..., 3:]
        # Rounding can leave a premultiplied value a hair above its alpha: the ratio is clipped to 1.
        rgb = np.where(a > 0, out[..., :3] / np.where(a > 0, a, 1.0), 0.0)
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
    over the padded canvas ~ U(tilt), capped by the room the range leaves; ``d0`` uniform in the rest."""
    total = min(rng.uniform(*tilt), hi - lo)
    share = rng.uniform()
    sign_x, sign_y = rng.choice((-1.0, 1.0)), rng.choice((-1.0, 1.0))
    d0 = rng.uniform(lo + total / 2, hi - total / 2)
    gx, gy = total * share * sign_x / extent, total * (1 - share) * sign_y / extent
    return float(d0), float(gx), float(gy)


def _plane_range(plane: tuple[float, float, float], extent: float) -> tuple[float, float]:
    """Smallest and largest value of a plane over the padded canvas."""
    d0, gx, gy = plane
    half = (abs(gx) + abs(gy)) * extent / 2
    return d0 - half, d0 + half


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


def _place_foreground(rng: np.random.Generator, fg_hw: tuple[int, int], config: SynthConfig):
    """Size and top-left corner of a foreground in the frame (released rule, see ``SynthConfig``):
    ``(scale, fh, fw, ty, tx)``."""
    s = config.size
    scale = rng.uniform(*config.fg_scale) * s / math.sqrt(fg_hw[0] * fg_hw[1])
    while round(fg_hw[0] * scale) > s or round(fg_hw[1] * scale) > s:
        scale *= 0.9
    fh, fw = max(1, round(fg_hw[0] * scale)), max(1, round(fg_hw[1] * scale))
    reach = int(config.fg_shift * s)
    cy = s // 2 + int(rng.integers(-reach, reach + 1))
    cx = s // 2 + int(rng.integers(-reach, reach + 1))
    ty = int(np.clip(cy - fh // 2, 0, s - fh))
    tx = int(np.clip(cx - fw // 2, 0, s - fw))
    return float(scale), fh, fw, ty, tx


def sample_scene(
    config: SynthConfig,
    fg_sources: Sequence[Source],
    bg_sources: Sequence[Source],
    seed: int,
    index: int,
) -> Scene:
    """Samples scene ``index`` of the stream ``seed``: layers, planes, focus, strength (see
    ``SynthConfig``).

    Inputs are used in the given order (pass sorted lists, e.g. from ``scan_inputs``). All randomness
    comes from ``np.random.default_rng([seed, index])``.
    """
    if not fg_sources or not bg_sources:
        raise InputError("need at least one foreground and one background")
    rng = np.random.default_rng([int(seed), int(index)])
    s = config.size

    times = float(2.0 ** rng.uniform(*config.log2_times))
    # |d - d_f| <= max(d_f, 1 - d_f) for every d in [0, 1], so no CoC radius exceeds this, whatever the
    # focus turns out to be: the padding can be fixed before the planes are drawn.
    r_bound = config.strength_scale * times
    pad = _round_up(config.pad_factor * r_bound, config.pad_multiple) if r_bound > 0 else 0
    p_side = s + 2 * pad
    extent = p_side / s
    skipped: list[tuple[str, str]] = []

    # Background: an aspect-preserving square crop (zoomed in by bg_zoom), resized to the padded canvas;
    # its plane's farthest point at U(bg_far), total tilt U(bg_tilt), both over the padded canvas.
    bi, bg = _load_with_fallback(
        bg_sources, int(rng.integers(len(bg_sources))), load_background, config, skipped
    )
    h, w = bg.shape[:2]
    side = max(1, int(round(min(h, w) / rng.uniform(*config.bg_zoom))))
    y0, x0 = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    bg_rgb = _resize(bg[y0 : y0 + side, x0 : x0 + side], (p_side, p_side))
    far = rng.uniform(*config.bg_far)
    tilt = min(rng.uniform(*config.bg_tilt), config.fg_disparity_max - far)
    bg_plane = _sample_plane(rng, far, far + tilt, (tilt, tilt), extent)
    bg_hi = _plane_range(bg_plane, extent)[1]

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
        scale, fh, fw, ty, tx = _place_foreground(rng, fg.shape[:2], config)
        fg = _resize(fg, (fh, fw), premultiply=True)
        flip = bool(rng.uniform() < config.fg_flip_prob)
        if flip:
            fg = fg[:, ::-1]
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
    strength = r_bound / max(focus, 1.0 - focus)  # released: K = 12 times / max(d_f, 1 - d_f)

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
        "layers": meta_layers,
        "skipped_inputs": [list(x) for x in skipped],
        "plane_convention": "d(x, y) = d0 + gx (x / W - 0.5) + gy (y / H - 0.5), output canvas",
    }
    return Scene(np.stack(layers), planes_l3, focus, strength, pad, _sorted(meta))


def _sorted(tree: Any) -> Any:
    """JSON-ready ``tree`` with every dict's keys sorted: the same bytes whichever process made it (grain's
    workers hand dicts back with their keys sorted)."""
    if isinstance(tree, dict):
        return {k: _sorted(tree[k]) for k in sorted(tree)}
    if isinstance(tree, list | tuple):
        return [_sorted(v) for v in tree]
    return tree


def _name(src: Source) -> str:
    return f"<array {src.shape}>" if isinstance(src, np.ndarray) else str(src)


def layered_config(config: SynthConfig):
    """The tracer settings of ``config``: ``render.LayeredConfig`` with its ray bounds and cell size."""
    from bokehdiff_jax.render import LayeredConfig

    return LayeredConfig(rays_min=config.rays_min, rays_max=config.rays_max, cell_px=float(config.cell_px))


def render_scene(scene: Scene, config: SynthConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Renders a scene's output canvas: ``{aif [S,S,3], bokeh [S,S,3], disparity [S,S], focus (),
    strength (), coc [S,S]}`` (float32 NumPy; ``coc`` the CoC radius in pixels, ``coc_radius``) and the
    rays per pixel actually traced (``{"n_rays": max, "rays_mean": mean}``)."""
    from bokehdiff_jax.physics.optics import coc_radius
    from bokehdiff_jax.render import composite_layers, render_layers

    p, s = scene.pad, config.size
    aif, disp = composite_layers(
        scene.rgba_lhwc, scene.planes_l3, label=config.disparity_label, threshold=config.label_threshold
    )
    bokeh, rays = render_layers(
        scene.rgba_lhwc,
        scene.planes_l3,
        scene.focus,
        scene.strength,
        config=layered_config(config),
        crop=(p, p, s, s),
        return_rays=True,
    )
    crop = (slice(p, p + s), slice(p, p + s))
    disp = np.asarray(disp, np.float32)[crop]
    focus, strength = np.float32(scene.focus), np.float32(scene.strength)
    sample = {
        "aif": np.clip(np.asarray(aif, np.float32)[crop], 0.0, 1.0),
        "bokeh": np.clip(np.asarray(bokeh, np.float32), 0.0, 1.0),
        "disparity": disp,
        "focus": focus,
        "strength": strength,
        "coc": coc_radius(disp, focus, strength).astype(np.float32),
    }
    # Rays per pixel: per tile of the tracer, weighted by the tile's pixels inside the canvas.
    rays = np.asarray(rays, np.float64)
    t = layered_config(config).tile
    cover = np.outer(_tile_pixels(s, t, rays.shape[0]), _tile_pixels(s, t, rays.shape[1]))
    stats = {"n_rays": int(rays.max()), "rays_mean": round(float((rays * cover).sum() / cover.sum()), 2)}
    return sample, stats


def _tile_pixels(n: int, t: int, tiles: int) -> np.ndarray:
    return np.minimum(t, n - t * np.arange(tiles)).astype(np.float64)


def synthesize_with_meta(
    config: SynthConfig, fg_sources: Sequence[Source], bg_sources: Sequence[Source], seed: int, index: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``synthesize`` plus the scene's JSON-ready metadata (layers, planes, sources, padding, the rays
    traced), keys sorted at every level."""
    scene = sample_scene(config, fg_sources, bg_sources, seed, index)
    sample, stats = render_scene(scene, config)
    return sample, _sorted(dict(scene.meta, **stats))


def synthesize(
    config: SynthConfig, fg_sources: Sequence[Source], bg_sources: Sequence[Source], seed: int, index: int
) -> dict[str, np.ndarray]:
    """Example ``index`` of stream ``seed``: ``{aif, bokeh, disparity, focus, strength, coc}``.

    ``aif``, ``bokeh``: ``[S, S, 3]`` sRGB in [0, 1]; ``disparity``: ``[S, S]`` in [0, 1] (1 near);
    ``focus``: disparity; ``strength``: K in pixels (the one that rendered ``bokeh``); ``coc``: ``[S, S]``
    CoC radius in pixels. Identical for identical ``(config, inputs, seed, index)``.
    """
    return synthesize_with_meta(config, fg_sources, bg_sources, seed, index)[0]
