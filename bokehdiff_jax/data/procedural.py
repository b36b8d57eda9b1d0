"""Procedural RGBA foregrounds: a soft body with hair, fur and whisker-like thin strands.

These are the depth discontinuities BokehDiff targets (paper Fig. 1: a horse's tail, hair, a cat's
whiskers): strands thinner than a pixel with fractional alpha, in front of a far background. The
generator needs no files, so tests and the demo's embedded default data can use it.

Everything is NumPy on the host and seeded: the same ``(seed, size)`` gives the same image.
"""

from __future__ import annotations

import numpy as np


def _splat(acc: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
    """Adds weights ``w`` at continuous positions ``(x, y)`` (pixel-centre convention) into
    ``acc[H, W, C]`` with bilinear footprints; points outside the image are dropped."""
    h, wd = acc.shape[:2]
    fx, fy = x - 0.5, y - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    ax, ay = (fx - x0)[:, None], (fy - y0)[:, None]
    for dx, dy, k in (
        (0, 0, (1 - ax) * (1 - ay)),
        (1, 0, ax * (1 - ay)),
        (0, 1, (1 - ax) * ay),
        (1, 1, ax * ay),
    ):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < wd) & (yi >= 0) & (yi < h)
        np.add.at(acc, (yi[ok], xi[ok]), (k * w)[ok])


def _strands(
    rng: np.random.Generator,
    roots_xy: np.ndarray,
    normals_xy: np.ndarray,
    length: np.ndarray,
    curl: float,
    spread: float,
    step: float = 0.35,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polylines grown from ``roots`` along ``normals`` with a random smooth bend.

    Returns sample points ``x, y`` (flattened) and, per point, the index of its strand. Samples are
    ``step`` pixels apart so a splat of constant weight per sample draws a line of even density.
    """
    n = len(roots_xy)
    n_steps = max(int(np.ceil(length.max() / step)), 2)
    ang0 = np.arctan2(normals_xy[:, 1], normals_xy[:, 0]) + rng.normal(0, spread, n)
    # The heading drifts as a smooth random walk: curls for hair, nearly straight for whiskers.
    turn = rng.normal(0, curl, (n, 1)) + np.cumsum(rng.normal(0, curl * 0.15, (n, n_steps)), axis=1)
    heading = ang0[:, None] + np.cumsum(turn * step / max(length.mean(), 1.0), axis=1)
    dx, dy = np.cos(heading) * step, np.sin(heading) * step
    xs = roots_xy[:, 0:1] + np.cumsum(dx, axis=1)
    ys = roots_xy[:, 1:2] + np.cumsum(dy, axis=1)
    t = np.arange(1, n_steps + 1)[None, :] * step
    keep = t <= length[:, None]
    strand = np.broadcast_to(np.arange(n)[:, None], keep.shape)
    return xs[keep], ys[keep], strand[keep]


def procedural_foreground(
    size: tuple[int, int] | int,
    seed: int,
    *,
    kind: str = "mixed",
) -> np.ndarray:
    """A seeded RGBA foreground ``[H, W, 4]`` float32 in [0, 1] (sRGB colour, straight alpha).

    ``kind``: ``"hair"`` (long wavy strands on top), ``"fur"`` (short dense strands all round),
    ``"whiskers"`` (a few long straight light strands), or ``"mixed"`` (all three). The body is an
    opaque noisy ellipse with a smooth shaded colour; strands have fractional alpha (sub-pixel
    width), and colour outside the alpha is the nearby strand/body colour (no black fringes).
    """
    if kind not in ("hair", "fur", "whiskers", "mixed"):
        raise ValueError(f"kind must be hair, fur, whiskers or mixed, got {kind!r}")
    h, w = (size, size) if isinstance(size, int) else size
    if h < 8 or w < 8:
        raise ValueError(f"procedural foregrounds need at least 8x8 pixels, got {w}x{h}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5

    # Body: an ellipse whose radius wobbles with angle (a few low harmonics), softened by 1 px.
    cx, cy = w * rng.uniform(0.42, 0.58), h * rng.uniform(0.5, 0.62)
    rx, ry = w * rng.uniform(0.2, 0.28), h * rng.uniform(0.2, 0.3)
    theta = np.arctan2((yy - cy) / ry, (xx - cx) / rx)
    wobble = 1 + sum(
        rng.uniform(-0.06, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    rad = np.hypot((xx - cx) / rx, (yy - cy) / ry) / wobble
    scale = min(rx, ry)
    body_alpha = np.clip((1 - rad) * scale + 0.5, 0, 1)

    base = rng.uniform(0.15, 0.85, 3)
    shade = 0.75 + 0.25 * np.clip(1 - rad, 0, 1)[..., None]  # brighter centre reads as a rounded body
    light = 0.5 + 0.5 * ((xx - cx) / (w * 0.6))[..., None] * rng.uniform(-0.4, 0.4)
    body_rgb = np.clip(base * shade * (0.85 + 0.3 * light), 0, 1)

    # Strand roots on the body's rim, normals pointing outward.
    def roots(n: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        a = rng.uniform(lo, hi, n)
        pts = np.stack([cx + rx * np.cos(a) * 0.97, cy + ry * np.sin(a) * 0.97], 1)
        nrm = np.stack([np.cos(a) / rx, np.sin(a) / ry], 1)
        return pts, nrm / np.linalg.norm(nrm, axis=1, keepdims=True)

    layers = []  # (x, y, strand, colours[n_strands, 3], weight per sample)
    diag = float(np.hypot(h, w))
    if kind in ("hair", "mixed"):
        n = int(30 + diag * 0.25)
        r, nrm = roots(n, -np.pi * 0.95, -np.pi * 0.05)  # upper rim (y grows downward)
        x, y, s = _strands(rng, r, nrm, rng.uniform(0.12, 0.3, n) * diag, curl=1.2, spread=0.35)
        tone = np.clip(base * rng.uniform(0.5, 1.3) + rng.normal(0, 0.05, (n, 3)), 0, 1)
        layers.append((x, y, s, tone, rng.uniform(0.35, 0.8)))
    if kind in ("fur", "mixed"):
        n = int(100 + diag * 1.0)
        r, nrm = roots(n, -np.pi, np.pi)
        x, y, s = _strands(rng, r, nrm, rng.uniform(0.02, 0.07, n) * diag, curl=1.0, spread=0.35)
        tone = np.clip(base * 1.1 + rng.normal(0, 0.06, (n, 3)), 0, 1)
        layers.append((x, y, s, tone, rng.uniform(0.3, 0.6)))
    if kind in ("whiskers", "mixed"):
        n = int(rng.integers(6, 14))
        side = np.where(rng.random(n) < 0.5, 0.0, np.pi) + rng.uniform(-0.5, 0.5, n)
        r = np.stack([cx + np.cos(side) * rx * 0.6, cy + ry * 0.25 + np.sin(side) * ry * 0.3], 1)
        nrm = np.stack([np.cos(side), np.sin(side) * 0.4], 1)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        x, y, s = _strands(rng, r, nrm, rng.uniform(0.25, 0.45, n) * diag, curl=0.4, spread=0.15)
        tone = np.clip(np.full((n, 3), rng.uniform(0.8, 0.97)) + rng.normal(0, 0.02, (n, 3)), 0, 1)
        layers.append((x, y, s, tone, rng.uniform(0.5, 0.9)))

    # Accumulate strand coverage (premultiplied colour + density), then alpha = 1 - exp(-density):
    # overlapping strands saturate smoothly instead of exceeding 1.
    acc = np.zeros((h, w, 4), np.float64)
    for x, y, s, tone, weight in layers:
        # ``weight`` is the coverage of one strand crossing a pixel: a sub-pixel strand's alpha.
        vals = np.concatenate([tone[s], np.ones((len(s), 1))], axis=1) * (weight * 0.35)
        _splat(acc, x, y, vals)
    density = acc[..., 3]
    strand_alpha = 1 - np.exp(-density)
    strand_rgb = acc[..., :3] / np.maximum(density, 1e-8)[..., None]

    # Strands over the body ("over" compositing with straight alpha).
    alpha = strand_alpha + body_alpha * (1 - strand_alpha)
    prem = strand_rgb * strand_alpha[..., None] + body_rgb * (body_alpha * (1 - strand_alpha))[..., None]
    rgb = prem / np.maximum(alpha, 1e-8)[..., None]
    # Where alpha is zero the colour is irrelevant, but resampling mixes it in: use the body colour.
    rgb = np.where(alpha[..., None] > 1e-6, rgb, body_rgb)
    return np.concatenate([np.clip(rgb, 0, 1), np.clip(alpha, 0, 1)[..., None]], axis=-1).astype(np.float32)


def procedural_lights(size: tuple[int, int] | int, seed: int, *, density: float = 1.0) -> np.ndarray:
    """A seeded night scene ``[H, W, 3]`` float32 sRGB: a dark, smooth gradient with bright point lights.

    The hardest content for a lens-blur target: every light (1-6 px, values up to 1, i.e. saturated)
    must become a uniform bright disc of its CoC, and the dark surround shows any noise (sRGB lifts
    small linear errors). ``density``: lights per 1000 pixels, about.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h < 8 or w < 8:
        raise ValueError(f"procedural backgrounds need at least 8x8 pixels, got {w}x{h}")
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None]
    tint = rng.uniform(0.02, 0.12, 3)
    rgb = tint * (0.4 + 0.6 * (1 - yy[..., None])) * (0.8 + 0.4 * xx[..., None])
    n = max(1, int(density * h * w / 1000))
    sizes = np.minimum(rng.geometric(0.45, n), 6)  # mostly 1-2 px, a few larger
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    colours = np.clip(rng.uniform(0.55, 1.0, (n, 3)) * rng.uniform(0.7, 1.0, (n, 1)), 0, 1)
    colours[rng.random(n) < 0.4] = 1.0  # saturated white
    for y, x, s, c in zip(ys, xs, sizes, colours, strict=True):
        rgb[y : y + s, x : x + s] = c
    return np.clip(rgb, 0, 1).astype(np.float32)
