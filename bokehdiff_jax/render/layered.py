"""The layered thin-lens ray tracer: ground truth for paired-data synthesis (SPEC section 4).

A scene is ``L`` RGBA layers on one ``H x W`` canvas, back to front, each on a tilted plane whose
disparity at image point ``(x, y)`` (pixel-centre convention, ``x`` in ``[0, W]``) is
``d0 + gx (x / W - 0.5) + gy (y / H - 0.5)`` (disparity linear in ``x, y`` <=> depth
``z = c / (1 - a x - b y)``).

For sensor pixel ``p`` and an aperture point ``u`` in the unit disc, the ray meets layer ``l`` at the
image point ``x`` solving ``x = p + K u (disp_l(x) - d_f)``. With ``disp_l(x) - d_f = c0 + a x + b y``
this is linear, and ``D = c0 + a p_x + b p_y`` over ``1 - K (a u_x + b u_y)`` gives the closed form
``x = p + K u D``. Layers are composited front to back (nearest first) per ray in premultiplied linear
light; rays are averaged; the mean colour is divided by the mean coverage, then converted back to sRGB.
A fronto-parallel layer thus renders as its image convolved with a uniform disc of radius
``K |d - d_f|``, the CoC of ``physics.optics.coc_radius``.

Aperture sampling, ``sampling="cells"`` (the default). The aperture disc is cut by an ``m x m`` square
grid (the released code's square aperture grid); every grid cell that meets the disc is one ray,
weighted by the area of its part inside the disc. Where the ray meets a layer it reads the layer's
*mean over the cell's footprint* (an axis-aligned box about ``2 r / m`` pixels wide), not one point,
using exact summed-area tables. For one fronto-parallel layer the weighted sum over the cells is then
exactly the layer's integral over the CoC disc, except in the cells cut by the disc's rim (each read as
a box of the same area and centroid). What stays approximate shrinks with the footprint: the disc's
rim, the product of two layers' coverage within one cell (occlusion), a tilted plane's slightly
non-affine footprint. ``m`` is chosen per tile of ``tile x tile`` pixels from the largest CoC radius
``r`` that matters in the tile (a layer with no alpha within reach of the tile, or hidden there behind
a layer opaque throughout its own reach, does not): a footprint of at most ``cell_px`` pixels, and at
least ``min_grid`` cells a side once the disc reaches past its pixel (``r >= 0.5``), so that even a
disc a pixel wide has a round rim; bounded so the rays per pixel stay within ``[rays_min, rays_max]``.
Pixels are reconstructed as little squares of constant colour, which the tables integrate exactly; a
layer in focus is read at the pixel itself, so it stays exactly sharp. Deterministic: no random numbers.

``sampling="points"``: the earlier sampler, kept to measure against: ``num_rays`` golden-angle points
(the same for every pixel), bilinear point lookups. A bright point needs about ``pi r^2`` rays there
before its disc stops being a speckle pattern.

Summed-area tables are int32 fixed point (``2^-18`` of the linear premultiplied value) and wrap around:
a box sum is a difference of table entries, exact modulo ``2^32``, so exact whenever the true sum is
below ``2^31`` (boxes are capped at 88 px per side). float32 tables would lose a small box's sum
against the canvas-sized running totals.

Memory: ``16 * 4`` bytes per canvas pixel and layer for the tables; the tracer works on one tile and
``ray_chunk`` cells at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.physics.optics import bilinear_sample, coc_radius, linear_to_srgb, srgb_to_linear

SAMPLINGS = ("cells", "points")
_FRAC_BITS = 18  # fixed point of the summed-area tables
_MAX_HALF_BOX = 44.0  # px: a box sum must stay below 2^31 / 2^18 = 8192 px^2
_MIN_HALF_BOX = 1e-3  # px: a zero-width box (a layer in focus) is read as a 0.002 px one
_RIM_COLUMNS = 16  # sub-columns per cell to measure its part inside the disc


@dataclasses.dataclass(frozen=True)
class LayeredConfig:
    """Settings of :func:`render_layers` (the tile, chunk and ``"points"`` sizes are static; changing
    them recompiles).

    ``sampling``: ``"cells"`` or ``"points"`` (module docstring). Cells: ``rays_min``/``rays_max``
    bound the rays (aperture cells) per pixel; ``cell_px`` is the largest footprint of one cell on a
    layer, in pixels (smaller: closer to converged, slower); ``min_grid`` the fewest cells across a disc
    wider than its pixel; ``tile`` pixels per tile side (one ray count per tile); ``ray_chunk`` cells
    traced at once. Points: ``num_rays`` per pixel, ``row_chunk`` image rows and ``ray_chunk`` rays at
    a time. The defaults keep synthesis targets within 8/255 of 8192-ray renders (BENCHMARKS.md).
    """

    sampling: str = "cells"
    rays_min: int = 1
    rays_max: int = 4096
    cell_px: float = 8.0
    min_grid: int = 8
    tile: int = 16
    ray_chunk: int = 16
    num_rays: int = 64
    row_chunk: int = 32
    gamma: float = 2.2

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        for name in ("rays_min", "rays_max", "min_grid", "tile", "ray_chunk", "num_rays", "row_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.rays_min > self.rays_max:
            raise ValueError(f"need rays_min <= rays_max, got {self.rays_min} > {self.rays_max}")
        if not (isinstance(self.cell_px, int | float) and 0 < self.cell_px < math.inf):
            raise ValueError(f"cell_px must be a positive number, got {self.cell_px!r}")


class _Plan(NamedTuple):
    """The static part of a render (shapes and loop sizes): one compilation per distinct plan. Ray
    bounds, ``cell_px``, ``min_grid`` and ``gamma`` are traced, so they never recompile, except that the
    grid's array length ``grid_cap`` (a power of two >= 128 and >= the largest grid side) follows a
    ``rays_max`` above 12,800."""

    sampling: str
    tile: int
    ray_chunk: int
    num_rays: int
    row_chunk: int
    grid_cap: int
    out_hw: tuple[int, int]


def _plan_and_params(config: LayeredConfig, crop: tuple[int, int, int, int]):
    """``config`` split into its static ``_Plan`` and a dict of traced scalars."""
    m_lo, m_hi = grid_bounds(config.rays_min, config.rays_max)
    cells = config.sampling == "cells"
    cap = 128  # grids up to 128 cells a side (12,800 rays) share one compilation
    while cap < m_hi:
        cap *= 2
    plan = _Plan(
        config.sampling,
        config.tile if cells else 0,
        config.ray_chunk,
        0 if cells else config.num_rays,
        0 if cells else config.row_chunk,
        cap if cells else 0,
        (crop[2], crop[3]),
    )
    f32, i32 = jnp.float32, jnp.int32
    params = {
        "gamma": jnp.asarray(config.gamma, f32),
        "cell_px": jnp.asarray(config.cell_px, f32),
        "min_grid": jnp.asarray(config.min_grid, f32),
        "m_lo": jnp.asarray(m_lo, i32),
        "m_hi": jnp.asarray(m_hi, i32),
        "top": jnp.asarray(crop[0], i32),  # the window's place is traced, its size static
        "left": jnp.asarray(crop[1], i32),
    }
    return plan, params


# ------------------------------------------------------------------------------------- aperture grid


def _grid_rows(m, m_cap: int, xp=np):
    """For grid side ``m`` (int, or traced int32 with ``m <= m_cap``): per row ``iy < m_cap``, the first
    column meeting the open unit disc and the number of such columns (0 for rows ``>= m``)."""
    h = 2.0 / xp.asarray(m, xp.float32)
    iy = xp.arange(m_cap, dtype=xp.float32)
    y_lo = -1.0 + iy * h
    y_hi = y_lo + h
    nearest = xp.where((y_lo < 0) & (y_hi > 0), 0.0, xp.minimum(xp.abs(y_lo), xp.abs(y_hi)))
    half = xp.sqrt(xp.maximum(1.0 - nearest * nearest, 0.0))
    first = xp.floor((1.0 - half) / h)
    last = xp.ceil((1.0 + half) / h) - 1.0
    count = xp.where((iy < m) & (nearest < 1.0), xp.maximum(last - first + 1.0, 0.0), 0.0)
    return first.astype(xp.int32), count.astype(xp.int32)


def grid_cells(m: int) -> int:
    """Number of rays (cells of the ``m x m`` aperture grid meeting the disc) for grid side ``m``."""
    return int(_grid_rows(m, m)[1].sum())


@functools.lru_cache(maxsize=64)
def grid_bounds(rays_min: int, rays_max: int) -> tuple[int, int]:
    """``(m_lo, m_hi)``: the grid sides allowed by ``rays_min <= rays <= rays_max``. ``m_hi`` is the
    largest side with at most ``rays_max`` cells (at least 1); ``m_lo`` the smallest with at least
    ``rays_min`` cells, capped at ``m_hi`` (so ``rays_max`` wins when no side fits both)."""
    m_hi = 1
    while grid_cells(m_hi + 1) <= rays_max:
        m_hi += 1
    m_lo = 1
    while m_lo < m_hi and grid_cells(m_lo) < rays_min:
        m_lo += 1
    return m_lo, m_hi


def _cells(m, k, first, count, n_sub: int = _RIM_COLUMNS):
    """Geometry of cells ``k`` (``[C]`` int32 flat indices over the cells meeting the disc) of grid side
    ``m``: centres ``[C, 2]`` and half sizes ``[C, 2]`` in aperture units, and weights ``[C]`` (area
    inside the disc). A rim cell becomes the box with its part's area and centroid, shaped like that
    part's bounding box."""
    h = 2.0 / m.astype(jnp.float32)
    ends = jnp.cumsum(count)
    iy = jnp.clip(jnp.searchsorted(ends, k, side="right"), 0, count.shape[0] - 1)
    ix = first[iy] + k - (ends[iy] - count[iy])
    x0 = -1.0 + ix.astype(jnp.float32) * h
    y0 = -1.0 + iy.astype(jnp.float32) * h
    # Sub-columns across the cell: the part inside the disc is exact in y for each column.
    xs = x0[:, None] + (jnp.arange(n_sub, dtype=jnp.float32) + 0.5) * (h / n_sub)  # [C, n]
    s = jnp.sqrt(jnp.maximum(1.0 - xs * xs, 0.0))
    lo = jnp.maximum(y0[:, None], -s)
    hi = jnp.minimum(y0[:, None] + h, s)
    length = jnp.maximum(hi - lo, 0.0)
    inside = length > 0
    area = length.sum(1) * (h / n_sub)
    safe = jnp.maximum(length.sum(1), 1e-12)
    cx = (xs * length).sum(1) / safe
    cy = (0.5 * (lo + hi) * length).sum(1) / safe
    big = jnp.float32(2.0)
    bx0 = jnp.maximum(jnp.min(jnp.where(inside, xs, big), 1) - 0.5 * h / n_sub, x0)
    bx1 = jnp.minimum(jnp.max(jnp.where(inside, xs, -big), 1) + 0.5 * h / n_sub, x0 + h)
    by0 = jnp.min(jnp.where(inside, lo, big), 1)
    by1 = jnp.max(jnp.where(inside, hi, -big), 1)
    bw, bh = jnp.maximum(bx1 - bx0, 1e-9), jnp.maximum(by1 - by0, 1e-9)
    shrink = jnp.sqrt(jnp.clip(area / (bw * bh), 0.0, 1.0))
    width, height = bw * shrink, bh * shrink
    centre = jnp.stack([cx, cy], -1)
    half = 0.5 * jnp.stack([width, height], -1)
    return centre, half, area


def aperture_samples(n: int) -> np.ndarray:
    """``n`` deterministic, evenly spread points in the unit disc (Vogel's golden-angle spiral,
    equal-area rings): ``[n, 2]`` as ``(u_x, u_y)``. One sample is the centre (a pinhole). The
    ``"points"`` sampler's pattern."""
    if n == 1:
        return np.zeros((1, 2), np.float32)
    k = np.arange(n, dtype=np.float64)
    r = np.sqrt((k + 0.5) / n)
    theta = k * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------- summed-area tables


def _tables(prem_lhw4):
    """``[L, H, W, 4]`` premultiplied values in [0, 1] -> ``[L * (H + 1) * (W + 1), 16]`` int32 rows
    ``(F, C, R, f)`` x 4 channels at grid corner ``(j, i)``: ``F = sum_{y<j, x<i} f``, ``C = sum_{y<j}
    f[y, i]``, ``R = sum_{x<i} f[j, x]``, ``f`` (zero on the extra last row and column)."""
    q = jnp.round(jnp.clip(prem_lhw4, 0.0, 1.0) * float(2**_FRAC_BITS)).astype(jnp.int32)
    q = jnp.pad(q, ((0, 0), (0, 1), (0, 1), (0, 0)))
    row = jnp.cumsum(q, axis=2) - q  # wraps: exact modulo 2^32
    col = jnp.cumsum(q, axis=1) - q
    full = jnp.cumsum(row, axis=1) - row
    t = jnp.concatenate([full, col, row, q], axis=-1)
    return t.reshape(-1, 16)


def _box_mean(table, base, w, h, cx, cy, ex, ey):
    """Mean of the box-reconstructed layer over ``[cx - ex, cx + ex] x [cy - ey, cy + ey]`` (clipped to
    the canvas ``[0, w] x [0, h]``): ``[..., 4]``. ``base``: the layer's first row in ``table``
    (broadcasts against ``cx``)."""
    eps = 2 * _MIN_HALF_BOX
    x0 = jnp.clip(cx - ex, 0.0, w - eps)
    x1 = jnp.clip(cx + ex, x0 + eps, float(w))
    y0 = jnp.clip(cy - ey, 0.0, h - eps)
    y1 = jnp.clip(cy + ey, y0 + eps, float(h))
    i0, i1 = jnp.floor(x0), jnp.floor(x1)
    j0, j1 = jnp.floor(y0), jnp.floor(y1)
    a0, a1, b0, b1 = ((x0 - i0)[..., None], (x1 - i1)[..., None], (y0 - j0)[..., None], (y1 - j1)[..., None])
    i0, i1, j0, j1 = (v.astype(jnp.int32) for v in (i0, i1, j0, j1))
    stride = w + 1

    def at(j, i):
        t = jnp.take(table, base + j * stride + i, axis=0, mode="clip")
        return t[..., 0:4], t[..., 4:8], t[..., 8:12], t[..., 12:16]

    f00, c00, r00, v00 = at(j0, i0)
    f10, c10, r10, v10 = at(j0, i1)
    f01, c01, r01, v01 = at(j1, i0)
    f11, c11, r11, v11 = at(j1, i1)
    f32 = jnp.float32
    dx, dy = (x1 - x0)[..., None], (y1 - y0)[..., None]
    # Where both edges fall in one pixel column (row), a1 - a0 is dx (dy): written so, a box a hundredth
    # of a pixel wide keeps full precision (a1 * v - a0 * v would cancel).
    same_i, same_j = (i0 == i1)[..., None], (j0 == j1)[..., None]
    core = (f11 - f01 - f10 + f00).astype(f32)  # exact integer box sum, then rounded once
    col1, col0 = (c11 - c10).astype(f32), (c01 - c00).astype(f32)
    cols = jnp.where(same_i, dx * col1, a1 * col1 - a0 * col0)
    row1, row0 = (r11 - r01).astype(f32), (r10 - r00).astype(f32)
    rows = jnp.where(same_j, dy * row1, b1 * row1 - b0 * row0)
    top = jnp.where(same_i, dx * v11.astype(f32), a1 * v11.astype(f32) - a0 * v01.astype(f32))
    bottom = jnp.where(same_i, dx * v10.astype(f32), a1 * v10.astype(f32) - a0 * v00.astype(f32))
    corners = jnp.where(same_j, dy * top, b1 * top - b0 * bottom)
    return (core + cols + rows + corners) / (float(2**_FRAC_BITS) * dx * dy)


# ------------------------------------------------------------------------------------- the tracer


def _prepare(rgba_lhwc, gamma):
    """sRGB + alpha -> premultiplied linear RGBA (filtering premultiplied values never bleeds the colour
    of transparent pixels)."""
    alpha = jnp.clip(rgba_lhwc[..., 3:4], 0.0, 1.0)
    return jnp.concatenate([srgb_to_linear(rgba_lhwc[..., :3], gamma) * alpha, alpha], axis=-1)


def _plane_terms(planes_l3, focus, h, w):
    """``disp_l(x, y) - focus = c0 + a x + b y`` per layer."""
    d0, gx, gy = planes_l3[:, 0], planes_l3[:, 1], planes_l3[:, 2]
    a, b = gx / w, gy / h
    c0 = d0 - focus - 0.5 * gx - 0.5 * gy
    return c0, a, b


def _composite_front_to_back(prem_l4):
    """``prem_l4``: ``[L, ..., 4]`` premultiplied RGBA, index 0 = back. Front-to-back over-compositing:
    returns colour ``[..., 3]`` and coverage ``[...]``."""
    alpha = prem_l4[..., 3]
    # Transmittance in front of layer l: product of (1 - alpha) over the layers nearer than l.
    transmit = jnp.cumprod(jnp.flip(1.0 - alpha, 0), axis=0)
    in_front = jnp.flip(jnp.concatenate([jnp.ones_like(transmit[:1]), transmit[:-1]], 0), 0)
    colour = jnp.sum(in_front[..., None] * prem_l4[..., :3], axis=0)
    return colour, 1.0 - transmit[-1]


def _trace_cells(rgba, planes, focus, strength, params, plan):
    """``sampling="cells"``: ``rgba [L, H, W, 4]`` sRGB -> linear colour and coverage over ``crop``,
    and the rays per pixel of each tile ``[tiles_y, tiles_x]``."""
    n_layers, h, w, _ = rgba.shape
    top, left, (out_h, out_w) = params["top"], params["left"], plan.out_hw
    t = plan.tile
    prem = _prepare(rgba.astype(jnp.float32), params["gamma"])
    table = _tables(prem)
    c0, a, b = _plane_terms(planes.astype(jnp.float32), focus, h, w)
    base = jnp.arange(n_layers, dtype=jnp.int32) * ((h + 1) * (w + 1))  # each layer's first table row

    # Exact counts of pixels with any alpha and of opaque ones: a tile skips the layers with no alpha
    # within its reach, and the layers hidden behind a layer opaque throughout its reach.
    def counts_table(mask):
        return jnp.cumsum(jnp.cumsum(jnp.pad(mask.astype(jnp.int32), ((0, 0), (1, 0), (1, 0))), 1), 2)

    present = counts_table(prem[..., 3] > 0)  # [L, H + 1, W + 1]
    opaque = counts_table(prem[..., 3] >= 1.0 - 2.0**-_FRAC_BITS)  # opaque up to the tables' precision

    m_lo, m_hi = params["m_lo"], params["m_hi"]
    n_ty, n_tx = -(-out_h // t), -(-out_w // t)
    chunk = plan.ray_chunk
    offs = jnp.arange(t, dtype=jnp.float32) + 0.5

    def tile_fn(index):
        ty, tx = index // n_tx, index % n_tx
        y_start = (top + ty * t).astype(jnp.float32)
        x_start = (left + tx * t).astype(jnp.float32)
        py, px = y_start + offs, x_start + offs  # pixel centres [T]
        # Largest CoC radius per layer over the tile (the plane is linear: extremes at the corners).
        ys, xs = jnp.stack([py[0], py[-1]]), jnp.stack([px[0], px[-1]])
        corners = (
            c0[:, None, None] + a[:, None, None] * xs[None, None, :] + b[:, None, None] * ys[None, :, None]
        )
        radius = coc_radius(corners, 0.0, strength).max(axis=(1, 2))  # [L]
        # A layer matters if it has any alpha within reach of the tile (its CoC plus a footprint, at most
        # the CoC again) and no layer in front of it is opaque throughout that layer's own reach.
        reach = jnp.ceil(2.0 * radius + 2.0).astype(jnp.int32)
        ya = jnp.clip(top + ty * t - reach, 0, h)
        yb = jnp.clip(top + ty * t + t + reach, 0, h)
        xa = jnp.clip(left + tx * t - reach, 0, w)
        xb = jnp.clip(left + tx * t + t + reach, 0, w)
        li = jnp.arange(n_layers)

        def count(table):
            return table[li, yb, xb] - table[li, ya, xb] - table[li, yb, xa] + table[li, ya, xa]

        full = count(opaque) == (yb - ya) * (xb - xa)
        hidden = (jnp.cumsum(full[::-1])[::-1] - full) > 0  # an opaque layer nearer than this one
        relevant = (count(present) > 0) & ~hidden
        r_tile = jnp.max(jnp.where(relevant, radius, 0.0))
        # Footprints of at most cell_px pixels, and a grid of at least min_grid cells across any disc
        # that reaches past its pixel (r >= 0.5): the rim cells then draw a round CoC even a fraction of
        # a pixel wide (a bright neighbour seen by a 0.6 px disc is tens of 1/255 on a dark pixel). A
        # smaller disc stays inside its pixel, whose box-reconstructed value one cell reads exactly.
        need = jnp.maximum(
            jnp.ceil(2.0 * r_tile / params["cell_px"]), jnp.where(r_tile >= 0.5, params["min_grid"], 1.0)
        )
        m = jnp.clip(need, m_lo, m_hi).astype(jnp.int32)
        first, counts = _grid_rows(m, plan.grid_cap, jnp)
        n_cells = counts.sum()

        num = c0[:, None, None] + a[:, None, None] * px[None, None, :] + b[:, None, None] * py[None, :, None]

        def trace(carry, size):
            """Adds cells ``k0 .. k0 + size`` (those below ``n_cells``) to the sums."""
            k0, c_sum, a_sum = carry
            k = k0 + jnp.arange(size, dtype=jnp.int32)
            centre, half, weight = _cells(m, jnp.minimum(k, n_cells - 1), first, counts)
            weight = jnp.where(k < n_cells, weight, 0.0)
            ux, uy = centre[:, 0], centre[:, 1]
            den = 1.0 - strength * (a[:, None] * ux[None] + b[:, None] * uy[None])  # [L, C]
            # A plane tilted so steeply that the ray runs parallel to it has no hit; clamp (physically
            # plausible scenes keep den near 1).
            den = jnp.maximum(den, 1e-3)
            g = num[:, None] / den[:, :, None, None]  # [L, C, T, T]: disp - focus at the hit point
            kg = strength * g
            x = px + ux[None, :, None, None] * kg
            y = py[:, None] + uy[None, :, None, None] * kg
            # The cell's footprint: the Jacobian's diagonal d x / d u = K g (1 + K u a / den).
            jx = kg * (1.0 + strength * (ux[None] * a[:, None] / den)[..., None, None])
            jy = kg * (1.0 + strength * (uy[None] * b[:, None] / den)[..., None, None])
            ex = jnp.clip(jnp.abs(jx) * half[None, :, 0, None, None], _MIN_HALF_BOX, _MAX_HALF_BOX)
            ey = jnp.clip(jnp.abs(jy) * half[None, :, 1, None, None], _MIN_HALF_BOX, _MAX_HALF_BOX)

            def look(layer):
                return _box_mean(table, base[layer], w, h, x[layer], y[layer], ex[layer], ey[layer])

            # [C, T, T, 4] per layer; a layer absent or hidden near the tile is not read.
            looked = [
                jax.lax.cond(
                    relevant[layer], functools.partial(look, layer), lambda: jnp.zeros((size, t, t, 4))
                )
                for layer in range(n_layers)
            ]
            colour, cover = _composite_front_to_back(jnp.stack(looked))
            c_sum = c_sum + jnp.einsum("c,cyxk->yxk", weight, colour)
            a_sum = a_sum + jnp.einsum("c,cyx->yx", weight, cover)
            return k0 + size, c_sum, a_sum

        carry = (jnp.int32(0), jnp.zeros((t, t, 3), jnp.float32), jnp.zeros((t, t), jnp.float32))
        _, c_sum, a_sum = jax.lax.while_loop(lambda c: c[0] < n_cells, lambda c: trace(c, chunk), carry)
        return c_sum, a_sum, n_cells

    c_sum, a_sum, rays = jax.lax.map(tile_fn, jnp.arange(n_ty * n_tx, dtype=jnp.int32))
    c_sum = c_sum.reshape(n_ty, n_tx, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(n_ty * t, n_tx * t, 3)
    a_sum = a_sum.reshape(n_ty, n_tx, t, t).transpose(0, 2, 1, 3).reshape(n_ty * t, n_tx * t)
    return c_sum[:out_h, :out_w], a_sum[:out_h, :out_w], rays.reshape(n_ty, n_tx)


def _trace_points(rgba, planes, focus, strength, params, plan):
    """``sampling="points"``: the same ray geometry with ``num_rays`` golden-angle points and bilinear
    lookups, over the window."""
    n_layers, h, w, _ = rgba.shape
    prem = _prepare(rgba.astype(jnp.float32), params["gamma"])
    c0, a, b = _plane_terms(planes.astype(jnp.float32), focus, h, w)

    n_chunks = -(-plan.num_rays // plan.ray_chunk)
    n_pad = n_chunks * plan.ray_chunk
    u = np.zeros((n_pad, 2), np.float32)
    u[: plan.num_rays] = aperture_samples(plan.num_rays)
    valid = (np.arange(n_pad) < plan.num_rays).astype(np.float32)
    u_chunks = jnp.asarray(u.reshape(n_chunks, plan.ray_chunk, 2))
    v_chunks = jnp.asarray(valid.reshape(n_chunks, plan.ray_chunk))

    rows = plan.row_chunk
    (out_h, out_w), top, left = plan.out_hw, params["top"], params["left"]
    n_row_chunks = -(-out_h // rows)
    px = left.astype(jnp.float32) + jnp.arange(out_w, dtype=jnp.float32) + 0.5

    def trace_rows(row0):
        py = row0.astype(jnp.float32) + jnp.arange(rows, dtype=jnp.float32) + 0.5  # [R]
        num = c0[:, None, None] + a[:, None, None] * px[None, None, :] + b[:, None, None] * py[None, :, None]

        def ray_step(acc, chunk):
            uc, vc = chunk  # [n, 2], [n]
            ux, uy = uc[:, 0], uc[:, 1]
            den = 1.0 - strength * (a[:, None] * ux[None] + b[:, None] * uy[None])  # [L, n]
            den = jnp.maximum(den, 1e-3)
            dist = num[:, None] / den[:, :, None, None]  # [L, n, R, W]
            x = px + strength * ux[None, :, None, None] * dist
            y = py[:, None] + strength * uy[None, :, None, None] * dist
            looked = jax.vmap(bilinear_sample)(prem, x, y)  # [L, n, R, W, 4]
            colour, cover = _composite_front_to_back(looked)
            c_sum, a_sum = acc
            c_sum = c_sum + jnp.einsum("n,nrwc->rwc", vc, colour)
            return (c_sum, a_sum + jnp.einsum("n,nrw->rw", vc, cover)), None

        init = (jnp.zeros((rows, out_w, 3), jnp.float32), jnp.zeros((rows, out_w), jnp.float32))
        (c_sum, a_sum), _ = jax.lax.scan(ray_step, init, (u_chunks, v_chunks))
        return c_sum, a_sum

    starts = top + jnp.arange(n_row_chunks, dtype=jnp.int32) * rows
    c_sum, a_sum = jax.lax.map(trace_rows, starts)
    c_sum = c_sum.reshape(n_row_chunks * rows, out_w, 3)[:out_h]
    a_sum = a_sum.reshape(n_row_chunks * rows, out_w)[:out_h]
    rays = jnp.full((1, 1), plan.num_rays, jnp.int32)
    return c_sum, a_sum, rays


def _trace(rgba, planes, focus, strength, params, plan):
    """One scene -> sRGB ``[h, w, 3]`` over ``crop`` and the rays per pixel per tile."""
    trace = _trace_cells if plan.sampling == "cells" else _trace_points
    c_sum, a_sum, rays = trace(rgba, planes, focus, strength, params, plan)
    out = c_sum / jnp.maximum(a_sum, 1e-6)[..., None]
    return jnp.clip(linear_to_srgb(out, params["gamma"]), 0.0, 1.0), rays


@functools.partial(jax.jit, static_argnames="plan")
def _render_layers_jit(rgba, planes, focus, strength, params, plan):
    batch = rgba.shape[:-4]
    if not batch:
        return _trace(rgba, planes, focus, strength, params, plan)
    n = math.prod(batch)
    flat = lambda x, tail: jnp.broadcast_to(x, batch + tail).reshape((n,) + tail)
    # lax.map, not vmap: scenes one after another keep the memory bound of one scene.
    out, rays = jax.lax.map(
        lambda args: _trace(*args, params, plan),
        (flat(rgba, rgba.shape[-4:]), flat(planes, planes.shape[-2:]), flat(focus, ()), flat(strength, ())),
    )
    return out.reshape(batch + out.shape[1:]), rays.reshape(batch + rays.shape[1:])


def _check(rgba, planes):
    if rgba.ndim < 4 or rgba.shape[-1] != 4:
        raise ValueError(f"layers must be [..., L, H, W, 4] RGBA, got {rgba.shape}")
    if planes.shape[-2:] != (rgba.shape[-4], 3):
        raise ValueError(f"planes must be [..., L, 3] with L = {rgba.shape[-4]}, got {planes.shape}")


def render_layers(
    rgba_lhwc: jnp.ndarray,
    planes_l3: jnp.ndarray,
    focus: float | jnp.ndarray,
    strength: float | jnp.ndarray,
    *,
    config: LayeredConfig = LayeredConfig(),
    crop: tuple[int, int, int, int] | None = None,
    return_rays: bool = False,
):
    """Ray-traced lens blur of a layered scene. ``rgba_lhwc``: ``[..., L, H, W, 4]`` sRGB + alpha in
    [0, 1], index 0 = farthest layer; ``planes_l3``: ``[..., L, 3]`` rows ``(d0, gx, gy)`` (see module
    docstring); ``focus``: disparity in focus; ``strength``: ``K`` in pixels. Leading batch dims are
    rendered one scene at a time.

    ``crop``: ``(top, left, height, width)`` in canvas pixels: render only that window (the rays still
    see the whole canvas), e.g. the output canvas inside a padded one. Tiles start at the window's
    corner, so a window that is not aligned to the canvas's tiles may differ from the canvas's render
    by the (small) convergence error. Returns sRGB ``[..., h, w, 3]``
    (pixels no ray sees anything are 0); with ``return_rays``, also the rays per pixel of each tile
    (``[..., tiles_y, tiles_x]`` int32; ``[..., 1, 1]`` holding ``num_rays`` for ``"points"``).
    """
    rgba_lhwc = jnp.asarray(rgba_lhwc, jnp.float32)
    planes_l3 = jnp.asarray(planes_l3, jnp.float32)
    _check(rgba_lhwc, planes_l3)
    h, w = rgba_lhwc.shape[-3:-1]
    crop = (0, 0, h, w) if crop is None else tuple(int(v) for v in crop)
    top, left, ch, cw = crop
    if not (0 <= top and 0 <= left and ch >= 1 and cw >= 1 and top + ch <= h and left + cw <= w):
        raise ValueError(f"crop (top, left, height, width) = {crop} must lie inside the {w}x{h} canvas")
    plan, params = _plan_and_params(config, crop)
    focus, strength = jnp.asarray(focus, jnp.float32), jnp.asarray(strength, jnp.float32)
    out, rays = _render_layers_jit(rgba_lhwc, planes_l3, focus, strength, params, plan)
    return (out, rays) if return_rays else out


def layer_disparity(planes_l3: jnp.ndarray, h: int, w: int) -> jnp.ndarray:
    """Per-layer disparity maps ``[L, H, W]`` at pixel centres."""
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w - 0.5
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h - 0.5
    d0, gx, gy = (planes_l3[:, i, None, None] for i in range(3))
    return d0 + gx * x[None, None, :] + gy * y[None, :, None]


DISPARITY_LABELS = ("blend", "threshold", "front")


@functools.partial(jax.jit, static_argnames=("gamma", "label"))
def _composite_jit(rgba, planes, threshold, gamma, label):
    h, w = rgba.shape[1:3]
    prem = _prepare(rgba, gamma)
    colour, cover = _composite_front_to_back(prem)
    aif = linear_to_srgb(colour / jnp.maximum(cover, 1e-6)[..., None], gamma)
    disp_l = layer_disparity(planes, h, w)
    alpha = jnp.clip(rgba[..., 3], 0.0, 1.0)
    disparity = disp_l[0]
    for layer in range(1, rgba.shape[0]):  # back to front
        if label == "blend":  # over-composite the disparity like a colour
            disparity = alpha[layer] * disp_l[layer] + (1.0 - alpha[layer]) * disparity
        else:  # a nearer layer wins where its alpha passes the bar
            wins = alpha[layer] >= threshold if label == "threshold" else alpha[layer] > 0
            disparity = jnp.where(wins, disp_l[layer], disparity)
    return jnp.clip(aif, 0.0, 1.0), disparity


def composite_layers(
    rgba_lhwc: jnp.ndarray,
    planes_l3: jnp.ndarray,
    *,
    gamma: float = 2.2,
    label: str = "blend",
    threshold: float = 0.5,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pinhole (all-in-focus) view of a layered scene and its disparity map.

    ``rgba_lhwc``: ``[L, H, W, 4]`` sRGB + alpha, back to front; ``planes_l3``: ``[L, 3]``. The image is
    the front-to-back over-composite in linear light, normalised by coverage (equal to
    :func:`render_layers` at ``strength = 0``), as sRGB ``[H, W, 3]``. The disparity ``[H, W]`` at a
    pixel several layers share (fractional alpha) depends on ``label``:

    - ``"blend"``: the layers' disparities over-composited with their alphas, like a colour (the released
      code's labels; a monocular depth estimator also sees one mixed value there);
    - ``"threshold"``: the nearest layer whose alpha is >= ``threshold``, else the back layer;
    - ``"front"``: the nearest layer with any alpha (> 0).
    """
    if label not in DISPARITY_LABELS:
        raise ValueError(f"label must be one of {DISPARITY_LABELS}, got {label!r}")
    rgba_lhwc = jnp.asarray(rgba_lhwc, jnp.float32)
    planes_l3 = jnp.asarray(planes_l3, jnp.float32)
    _check(rgba_lhwc, planes_l3)
    if rgba_lhwc.ndim != 4:
        raise ValueError(f"composite_layers takes one scene [L, H, W, 4], got {rgba_lhwc.shape}")
    return _composite_jit(rgba_lhwc, planes_l3, jnp.float32(threshold), float(gamma), label)
