"""The layered thin-lens ray tracer: pinhole limit, discs and energy, tilted planes, compositing, batching,
no recompiles, and its role as the reference of the scatter renderer (a PSNR floor)."""

import jax
import numpy as np
import pytest

from bokehdiff_jax.render import (
    LayeredConfig,
    ScatterConfig,
    composite_layers,
    layered,
    render_layers,
    render_scatter,
)

S = 48
RAYS = LayeredConfig(num_rays=128, row_chunk=16, ray_chunk=32)


def smooth_bg(seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S] / S
    bg = np.ones((S, S, 4), np.float32)
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


def test_pinhole_equals_composite():
    rgba, planes = scene()
    rgba[1, 20:24, 20:24, 3] = 0.4  # a semi-transparent patch
    aif, disp = composite_layers(rgba, planes)
    out = render_layers(rgba, planes, 0.5, 0.0, config=RAYS)
    np.testing.assert_allclose(out, aif, atol=1e-5)
    # Disparity: the foreground where its alpha >= 0.5, else the tilted background plane.
    assert float(disp[15, 15]) == pytest.approx(0.7)
    x, y = (22 + 0.5) / S - 0.5, (22 + 0.5) / S - 0.5
    assert float(disp[22, 22]) == pytest.approx(0.2 + 0.1 * x - 0.05 * y, abs=1e-6)
    # Colour: linear-light over-compositing of red at 0.4 over the background.
    lin = 0.4 * 0.9**2.2 + 0.6 * rgba[0, 22, 22, 0] ** 2.2
    assert float(aif[22, 22, 0]) == pytest.approx(lin ** (1 / 2.2), abs=1e-5)


@pytest.mark.parametrize("d,focus,strength", [(0.8, 0.2, 15.0), (0.3, 0.8, 20.0)])
def test_point_light_disc_and_energy(d, focus, strength):
    layer = np.zeros((1, S, S, 4), np.float32)
    layer[0, ..., 3] = 1.0
    layer[0, 24, 24, :3] = 1.0
    cfg = LayeredConfig(num_rays=512, row_chunk=16, ray_chunk=64, gamma=1.0)
    out = np.asarray(render_layers(layer, np.array([[d, 0, 0]], np.float32), focus, strength, config=cfg))[
        ..., 0
    ]
    radius = strength * abs(d - focus)
    assert out.sum() == pytest.approx(1.0, rel=0.01)
    yy, xx = np.mgrid[0:S, 0:S]
    dist = np.hypot(yy - 24, xx - 24)
    lit = out > 0.05 * out.max()
    assert radius - 1 <= dist[lit].max() <= radius + 1


def test_tilted_plane_in_focus_only_where_its_disparity_is_the_focus():
    bg = smooth_bg(3)
    rng = np.random.default_rng(1)
    bg[..., :3] = rng.uniform(0.1, 0.9, (S, S, 3))  # sharp texture shows any blur
    planes = np.array([[0.5, 0.8, 0.0]], np.float32)  # disparity 0.1 (left) .. 0.9 (right)
    out = np.asarray(render_layers(bg[None], planes, 0.5, 10.0, config=RAYS))
    err = np.abs(out - bg[..., :3]).mean(axis=(0, 2))  # per column
    # The two centre columns (CoC 0.08 px: only bilinear smoothing) are nearly exact; the error grows
    # symmetrically away from them, as the CoC does (3-4 px at both ends).
    assert err[S // 2 - 1 : S // 2 + 1].max() < 0.03
    assert err[S // 2 - 4] > 2 * err[S // 2 - 1] and err[S // 2 + 3] > 2 * err[S // 2]
    assert err[:6].mean() > 0.15 and err[-6:].mean() > 0.15


def test_foreground_occludes_background_per_ray():
    rgba, planes = scene()
    # Focused on the foreground: it stays sharp (rays from its pixels all hit it first).
    aif, _ = composite_layers(rgba, planes)
    out = np.asarray(render_layers(rgba, planes, 0.7, 12.0, config=RAYS))
    np.testing.assert_allclose(out[14:34, 16:32], np.asarray(aif)[14:34, 16:32], atol=1e-3)
    # Focused on the background, the foreground's blurred edge lets the background through.
    out_bg = np.asarray(render_layers(rgba, planes, 0.2, 12.0, config=RAYS))
    assert 0.3 < out_bg[24, 14, 0] < 0.85


def test_batched_and_no_recompile():
    rgba, planes = scene()
    rgba2 = np.stack([smooth_bg(5), square_fg((0.1, 0.8, 0.2))])
    cfg = LayeredConfig(num_rays=16, row_chunk=16, ray_chunk=8)
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


def psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# Measured on this scene (48 px, two layers, smooth tilted background, K = 12): 40.1 / 36.8 / 37.2 dB
# at focus 0.2 / 0.45 / 0.7 (the error sits at the foreground's blurred edge, where the tracer sees the
# true background behind it and the scatter renderer must guess it). Without hole filling: 25.1 dB at
# focus 0.2 (reported in BENCHMARKS.md).
PSNR_FLOOR = 34.0


@pytest.mark.parametrize("focus", [0.2, 0.45, 0.7])
def test_scatter_matches_ray_tracer_on_layered_scene(focus):
    rgba, planes = scene()
    aif, disp = composite_layers(rgba, planes)
    truth = render_layers(rgba, planes, focus, 12.0, config=LayeredConfig(num_rays=256, ray_chunk=64))
    approx = render_scatter(aif, disp, focus, 12.0, config=ScatterConfig(max_radius=8, num_layers=24))
    assert psnr(approx, truth) > PSNR_FLOOR
    # Without hole filling the blurred foreground would amplify itself over the background.
    if focus == 0.2:
        no_fill = render_scatter(
            aif, disp, focus, 12.0, config=ScatterConfig(max_radius=8, num_layers=24, fill_holes=False)
        )
        assert psnr(no_fill, truth) < PSNR_FLOOR


def test_aperture_samples_fill_the_disc():
    u = layered.aperture_samples(256)
    r = np.hypot(u[:, 0], u[:, 1])
    assert r.max() < 1.0
    assert np.mean(r < np.sqrt(0.5)) == pytest.approx(0.5, abs=0.01)  # equal-area rings
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.01)
    assert np.array_equal(layered.aperture_samples(1), np.zeros((1, 2)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="planes"):
        render_layers(np.zeros((2, 8, 8, 4)), np.zeros((3, 3)), 0.5, 1.0)
    with pytest.raises(ValueError, match="RGBA"):
        composite_layers(np.zeros((2, 8, 8, 3)), np.zeros((2, 3)))


def test_jit_cache_key_ignores_python_vs_numpy_scalars():
    rgba, planes = scene()
    cfg = LayeredConfig(num_rays=4, row_chunk=48, ray_chunk=4)
    jax.block_until_ready(render_layers(rgba, planes, 0.5, 4.0, config=cfg))
    size = layered._render_layers_jit._cache_size()
    jax.block_until_ready(render_layers(rgba, planes, np.float64(0.5), 4, config=cfg))
    assert layered._render_layers_jit._cache_size() == size
