"""The layered thin-lens ray tracer: exact box integrals, pinhole limit, discs and energy, tilted planes,
compositing, disparity labels, per-tile ray counts, convergence against many rays, batching, no
recompiles, and its role as the reference of the scatter renderer (a PSNR floor)."""

import jax
import numpy as np
import pytest

from bokehdiff_jax.data.procedural import procedural_foreground, procedural_lights
from bokehdiff_jax.render import (
    LayeredConfig,
    ScatterConfig,
    composite_layers,
    layered,
    render_layers,
    render_scatter,
)

S = 48
RAYS = LayeredConfig()  # one plan for the 48 px scenes: one compilation shared by the tests


def smooth_bg(seed=0, size=S):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / S
    bg = np.ones((size, size, 4), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(3, 7, 3)
        bg[..., c] = 0.5 + 0.4 * np.sin(fx * xx + ph) * np.cos(fy * yy - ph)
    return bg


def square_fg(colour=(0.9, 0.2, 0.1), box=(12, 36, 14, 34)):
    fg = np.zeros((S, S, 4), np.float32)
    y0, y1, x0, x1 = box
    fg[y0:y1, x0:x1, :3] = colour
    fg[y0:y1, x0:x1, 3] = 1.0
    return fg


def scene():
    rgba = np.stack([smooth_bg(), square_fg()])
    planes = np.array([[0.2, 0.1, -0.05], [0.7, 0.0, 0.0]], np.float32)
    return rgba, planes


def psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_box_means_are_exact_integrals():
    # Large values far from the origin make the int32 tables wrap many times: the box sums stay exact.
    rng = np.random.default_rng(0)
    h, w = 70, 90
    img = rng.random((1, h, w, 4)).astype(np.float32)
    img[0, :, :, 0] = 1.0
    table = layered._tables(img)
    q = np.round(img[0].astype(np.float64) * 2**18) / 2**18  # the tables' fixed point
    n = 200
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    ex, ey = rng.uniform(0.05, 20, n), rng.uniform(0.05, 20, n)
    box_mean = jax.jit(layered._box_mean, static_argnums=(1, 2, 3))
    got = np.asarray(box_mean(table, 0, w, h, cx, cy, ex, ey))

    def overlap(lo, hi, cells):  # length of [lo, hi] inside each unit cell
        return np.clip(np.minimum(hi, np.arange(cells) + 1) - np.maximum(lo, np.arange(cells)), 0, None)

    for k in range(n):
        x0, x1 = max(cx[k] - ex[k], 0), min(cx[k] + ex[k], w)
        y0, y1 = max(cy[k] - ey[k], 0), min(cy[k] + ey[k], h)
        wx, wy = overlap(x0, x1, w), overlap(y0, y1, h)
        want = np.einsum("y,x,yxc->c", wy, wx, q) / ((x1 - x0) * (y1 - y0))
        np.testing.assert_allclose(got[k], want, rtol=2e-6, atol=2e-6)


def test_aperture_cells_tile_the_disc_and_respect_the_ray_bounds():
    @jax.jit
    def cells(m):  # every cell of grid side m (traced), padded to a fixed length
        first, counts = layered._grid_rows(m, 64, jax.numpy)
        k = jax.numpy.arange(4096, dtype=jax.numpy.int32)
        return layered._cells(m, jax.numpy.minimum(k, counts.sum() - 1), first, counts)

    for m in (1, 2, 5, 16, 33, 64):
        n = layered.grid_cells(m)
        centre, half, weight = (np.asarray(v)[:n] for v in cells(jax.numpy.int32(m)))
        assert weight.sum() == pytest.approx(np.pi, rel=5e-3 / m)  # the cells cover the disc
        assert (weight > 0).all() and (np.hypot(*centre.T) < 1).all()
        # a box per cell with the area of its part inside the disc
        np.testing.assert_allclose(4 * half[:, 0] * half[:, 1], weight, rtol=1e-5)
    for lo, hi in ((1, 1), (1, 100), (50, 60), (8192, 8192), (300, 10_000)):
        m_lo, m_hi = layered.grid_bounds(lo, hi)
        assert layered.grid_cells(m_hi) <= hi < layered.grid_cells(m_hi + 1)
        assert m_lo <= m_hi and (layered.grid_cells(m_lo) >= lo or m_lo == m_hi)


def test_pinhole_equals_composite():
    rgba, planes = scene()
    rgba[1, 20:24, 20:24, 3] = 0.4  # a semi-transparent patch
    aif, disp = composite_layers(rgba, planes)
    out = render_layers(rgba, planes, 0.5, 0.0, config=RAYS)
    np.testing.assert_allclose(out, aif, atol=3e-5)  # the tracer's tables are fixed point (2^-18)
    # Colour: linear-light over-compositing of red at 0.4 over the background.
    lin = 0.4 * 0.9**2.2 + 0.6 * rgba[0, 22, 22, 0] ** 2.2
    assert float(aif[22, 22, 0]) == pytest.approx(lin ** (1 / 2.2), abs=1e-5)


def test_disparity_labels_at_semi_transparent_pixels():
    rgba, planes = scene()
    rgba[1, 20:24, 20:24, 3] = 0.4  # fractional alpha, as at a hair strand
    rgba[1, 24:26, 20:24, 3] = 0.7
    x, y = (22 + 0.5) / S - 0.5, (22 + 0.5) / S - 0.5
    back = 0.2 + 0.1 * x - 0.05 * y
    labels = {
        label: np.asarray(composite_layers(rgba, planes, label=label)[1])
        for label in layered.DISPARITY_LABELS
    }
    for label, disp in labels.items():  # an opaque pixel and a bare one agree everywhere
        assert disp[15, 15] == pytest.approx(0.7) and disp[40, 5] < 0.3, label
    assert labels["blend"][22, 22] == pytest.approx(0.4 * 0.7 + 0.6 * back, abs=1e-6)  # released
    assert labels["threshold"][22, 22] == pytest.approx(back, abs=1e-6)  # 0.4 < 0.5: the background
    assert labels["threshold"][24, 22] == pytest.approx(0.7)
    assert labels["front"][22, 22] == pytest.approx(0.7)  # any alpha: the foreground
    thr = np.asarray(composite_layers(rgba, planes, label="threshold", threshold=0.3)[1])
    assert thr[22, 22] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="label"):
        composite_layers(rgba, planes, label="nearest")


@pytest.mark.parametrize("d,focus,strength", [(0.8, 0.2, 15.0), (0.3, 0.8, 20.0)])
def test_point_light_disc_and_energy(d, focus, strength):
    layer = np.zeros((2, S, S, 4), np.float32)  # the second layer is empty (two: the shared plan)
    layer[0, ..., 3] = 1.0
    layer[0, 24, 24, :3] = 1.0
    cfg = LayeredConfig(gamma=1.0)
    planes = np.array([[d, 0, 0], [0.99, 0, 0]], np.float32)
    out = np.asarray(render_layers(layer, planes, focus, strength, config=cfg))[..., 0]
    radius = strength * abs(d - focus)
    assert out.sum() == pytest.approx(1.0, rel=1e-4)  # cells integrate exactly: no energy lost
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    dist = np.hypot(yy - 24.5, xx - 24.5)
    lit = out > 0.05 * out.max()
    assert radius - 1 <= dist[lit].max() <= radius + 1.5
    # A uniform disc, not a speckle pattern: exact inside (the cells' footprints tile the disc) up to the
    # cells cut by its rim (a footprint, 2 r / 8 px, from the rim).
    inner = out[dist < radius - 4]
    np.testing.assert_allclose(inner, 1 / (np.pi * radius**2), rtol=2e-3)


def test_tilted_plane_in_focus_only_where_its_disparity_is_the_focus():
    bg = smooth_bg(3)
    rng = np.random.default_rng(1)
    bg[..., :3] = rng.uniform(0.1, 0.9, (S, S, 3))  # sharp texture shows any blur
    planes = np.array([[0.5, 0.8, 0.0], [0.99, 0, 0]], np.float32)  # 0.1 (left) .. 0.9 (right)
    out = np.asarray(render_layers(np.stack([bg, np.zeros_like(bg)]), planes, 0.5, 10.0, config=RAYS))
    err = np.abs(out - bg[..., :3]).mean(axis=(0, 2))  # per column
    # The two centre columns (CoC 0.08 px) are nearly exact; the error grows symmetrically away from
    # them, as the CoC does (3-4 px at both ends).
    assert err[S // 2 - 1 : S // 2 + 1].max() < 0.03
    assert err[S // 2 - 4] > 2 * err[S // 2 - 1] and err[S // 2 + 3] > 2 * err[S // 2]
    assert err[:6].mean() > 0.15 and err[-6:].mean() > 0.15


def test_foreground_occludes_background_per_ray():
    rgba, planes = scene()
    # Focused on the foreground: it stays sharp (rays from its pixels all hit it first).
    aif, _ = composite_layers(rgba, planes)
    out, rays = render_layers(rgba, planes, 0.7, 12.0, config=RAYS, return_rays=True)
    np.testing.assert_allclose(np.asarray(out)[14:34, 16:32], np.asarray(aif)[14:34, 16:32], atol=1e-5)
    # The tile inside the opaque, in-focus square hides the background: one ray is enough there.
    assert int(rays[1, 1]) == 1 and int(rays[0, 0]) > 30
    # Focused on the background, the foreground's blurred edge lets the background through.
    out_bg = np.asarray(render_layers(rgba, planes, 0.2, 12.0, config=RAYS))
    assert 0.3 < out_bg[24, 14, 0] < 0.85


def test_rays_follow_the_local_coc_and_crop_is_a_window():
    # A sharp background with a small blurred foreground: tiles far from it need almost no rays. On a
    # 96 px canvas with 48 px windows: the plan of the convergence test below, no compilation of its own.
    n = 2 * S
    rgba = np.stack([smooth_bg(2, n), np.zeros((n, n, 4), np.float32)])
    rgba[1, 26:30, 26:30] = (0.2, 0.9, 0.3, 1.0)
    planes = np.array([[0.3, 0.0, 0.0], [0.9, 0.0, 0.0]], np.float32)
    a, rays = render_layers(rgba, planes, 0.3, 10.0, config=RAYS, crop=(24, 24, S, S), return_rays=True)
    rays = np.asarray(rays)  # fg CoC 6 px: a grid of 8 cells a side near it, one cell far from it
    assert rays.shape == (3, 3) and rays[2, 2] == 1 and rays[0, 0] == layered.grid_cells(8)
    # The window's place is traced (same compilation); windows whose tiles coincide agree exactly.
    size = layered._render_layers_jit._cache_size()
    b = render_layers(rgba, planes, 0.3, 10.0, config=RAYS, crop=(40, 24, S, S))
    assert layered._render_layers_jit._cache_size() == size
    np.testing.assert_array_equal(np.asarray(a)[16:], np.asarray(b)[:32])
    with pytest.raises(ValueError, match="crop"):
        render_layers(rgba, planes, 0.3, 10.0, config=RAYS, crop=(60, 0, S, S))


def _hard_scene(size=48, pad=24):
    """Saturated point lights on a dark background behind hair strands (layer 1), on a padded canvas."""
    p = size + 2 * pad
    bg = np.concatenate([procedural_lights(p, 3, density=4.0), np.ones((p, p, 1), np.float32)], -1)
    fg = np.zeros((p, p, 4), np.float32)
    fg[pad : pad + size, pad - 8 : pad + size - 8] = procedural_foreground(size, 5, kind="hair")
    planes = np.array([[0.08, 0.1, -0.05], [0.85, 0.0, 0.06]], np.float32)
    return np.stack([bg, fg]), planes, (pad, pad, size, size)


@pytest.mark.parametrize("focus", [0.08, 0.85])
def test_default_targets_converged_against_many_rays(focus):
    # Largest CoC 20 px (K = 24 / max(d_f, 1 - d_f)); the reference traces 4096 rays per pixel.
    rgba, planes, crop = _hard_scene()
    strength = 24.0 / max(focus, 1 - focus)
    ref = np.asarray(
        render_layers(
            rgba, planes, focus, strength, config=LayeredConfig(rays_min=4096, rays_max=4096), crop=crop
        )
    )
    out, rays = render_layers(
        rgba, planes, focus, strength, config=LayeredConfig(), crop=crop, return_rays=True
    )
    err = np.abs(np.asarray(out) - ref).max() * 255
    assert err < 8 and psnr(out, ref) >= 50, (err, psnr(out, ref))
    assert np.asarray(rays).mean() < 200  # converged with a few dozen rays, not thousands
    # Far too few rays (one cell per disc: a box blur) fail the same bar: the test can fail.
    coarse = render_layers(rgba, planes, focus, strength, config=LayeredConfig(rays_max=1), crop=crop)
    assert np.abs(np.asarray(coarse) - ref).max() * 255 > 8


def test_batched_and_no_recompile():
    rgba, planes = scene()
    rgba2 = np.stack([smooth_bg(5), square_fg((0.1, 0.8, 0.2))])
    cfg = RAYS
    one = render_layers(rgba, planes, 0.3, 8.0, config=cfg)
    size = layered._render_layers_jit._cache_size()
    two = render_layers(rgba2, planes, 0.6, 5.0, config=cfg)
    assert layered._render_layers_jit._cache_size() == size  # focus/strength are traced
    both = render_layers(
        np.stack([rgba, rgba2]),
        np.stack([planes, planes]),
        np.array([0.3, 0.6]),
        np.array([8.0, 5.0]),
        config=cfg,
    )
    np.testing.assert_allclose(both[0], one, atol=1e-5)
    np.testing.assert_allclose(both[1], two, atol=1e-5)


# Measured on this scene (48 px, two layers, smooth tilted background, K = 12, the tracer's defaults):
# 40.0 / 36.7 / 37.1 dB at focus 0.2 / 0.45 / 0.7 (the error sits at the foreground's blurred edge, where
# the tracer sees the true background behind it and the scatter renderer must guess it). Without hole
# filling: 25.2 dB at focus 0.2 (BENCHMARKS.md).
PSNR_FLOOR = 34.0


@pytest.mark.parametrize("focus", [0.2, 0.45, 0.7])
def test_scatter_matches_ray_tracer_on_layered_scene(focus):
    rgba, planes = scene()
    aif, disp = composite_layers(rgba, planes)
    truth = render_layers(rgba, planes, focus, 12.0, config=LayeredConfig())
    approx = render_scatter(aif, disp, focus, 12.0, config=ScatterConfig(max_radius=8, num_layers=24))
    assert psnr(approx, truth) > PSNR_FLOOR
    # Without hole filling the blurred foreground would amplify itself over the background.
    if focus == 0.2:
        no_fill = render_scatter(
            aif, disp, focus, 12.0, config=ScatterConfig(max_radius=8, num_layers=24, fill_holes=False)
        )
        assert psnr(no_fill, truth) < PSNR_FLOOR


def test_points_sampler_kept_for_comparison():
    u = layered.aperture_samples(256)
    r = np.hypot(u[:, 0], u[:, 1])
    assert r.max() < 1.0
    assert np.mean(r < np.sqrt(0.5)) == pytest.approx(0.5, abs=0.01)  # equal-area rings
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.01)
    assert np.array_equal(layered.aperture_samples(1), np.zeros((1, 2)))
    rgba, planes = scene()
    pts = LayeredConfig(sampling="points", num_rays=256, ray_chunk=64)
    full = np.asarray(render_layers(rgba, planes, 0.2, 12.0, config=pts))
    assert psnr(full, render_layers(rgba, planes, 0.2, 12.0)) > 35
    window = render_layers(rgba, planes, 0.2, 12.0, config=pts, crop=(5, 9, 30, 20))
    np.testing.assert_allclose(window, full[5:35, 9:29], atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="planes"):
        render_layers(np.zeros((2, 8, 8, 4)), np.zeros((3, 3)), 0.5, 1.0)
    with pytest.raises(ValueError, match="RGBA"):
        composite_layers(np.zeros((2, 8, 8, 3)), np.zeros((2, 3)))
    for bad in (dict(sampling="random"), dict(rays_min=9, rays_max=8), dict(cell_px=0.0), dict(tile=0)):
        with pytest.raises(ValueError):
            LayeredConfig(**bad)


def test_jit_cache_key_ignores_scalars_and_ray_bounds():
    rgba, planes = scene()
    jax.block_until_ready(render_layers(rgba, planes, 0.5, 4.0, config=RAYS))
    size = layered._render_layers_jit._cache_size()
    jax.block_until_ready(render_layers(rgba, planes, np.float64(0.5), 4, config=RAYS))
    # Ray bounds, cell size and gamma are traced: other values reuse the compiled tracer.
    other = LayeredConfig(rays_min=2, rays_max=4, cell_px=3.0, min_grid=4, gamma=2.0)
    jax.block_until_ready(render_layers(rgba, planes, 0.5, 4.0, config=other))
    assert layered._render_layers_jit._cache_size() == size
