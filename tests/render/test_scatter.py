"""Physics of the scatter renderer (issue 4, section 1): discs, energy, focus, borders, occlusion,
aperture shape, traced settings (no recompiles), gradients, batching, and NumPy parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.render import ScatterConfig, focal_stack, render_scatter
from bokehdiff_jax.render import scatter as scatter_mod
from bokehdiff_jax.render.reference import numpy_scatter

S = 64
# One static config for most tests (one compile); gamma 1 makes output values equal linear energy.
LINEAR = ScatterConfig(max_radius=16, num_layers=12, gamma=1.0)
SRGB = ScatterConfig(max_radius=16, num_layers=12)


def point_scene(d_point, d_bg=0.1, value=1.0, at=(32, 32)):
    img = np.zeros((S, S, 3), np.float32)
    img[at] = value
    disp = np.full((S, S), d_bg, np.float32)
    disp[at] = d_point
    return img, disp


def texture(seed=0, smooth=False):
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.uniform(0.05, 0.95, (S, S, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:S, 0:S] / S
    return np.stack([0.5 + 0.4 * np.sin(6 * xx + c) * np.cos(5 * yy - c) for c in range(3)], -1).astype(
        np.float32
    )


@pytest.mark.parametrize(
    "d_point,focus,strength", [(0.8, 0.1, 20.0), (0.5, 0.1, 16.0), (0.9, 0.35, 12.0), (0.6, 0.6, 30.0)]
)
def test_point_light_disc_radius_and_energy(d_point, focus, strength):
    img, disp = point_scene(d_point)
    out = np.asarray(render_scatter(img, disp, focus, strength, config=LINEAR))[..., 0]
    radius = strength * abs(d_point - focus)
    # Energy: one unit in, one unit out (within 1%).
    assert out.sum() == pytest.approx(1.0, rel=0.01)
    # Extent: the farthest lit pixel centre lies within radius + 1 and at least radius - 1.
    yy, xx = np.mgrid[0:S, 0:S]
    dist = np.hypot(yy - 32, xx - 32)
    lit = out > 1e-3 * out.max()
    assert dist[lit].max() <= radius + 1.0
    assert dist[lit].max() >= radius - 1.0
    # Area of the fully lit part matches the disc area (radius within 1 px).
    if radius >= 3:
        full = out > 0.5 * np.median(out[dist < radius / 2])
        assert np.sqrt(full.sum() / np.pi) == pytest.approx(radius, abs=1.0)
        # A uniform disc: flat inside.
        inner = out[dist < radius - 1.5]
        assert inner.std() < 0.05 * inner.mean()


def test_in_focus_plane_unchanged():
    img = texture(1)
    disp = np.full((S, S), 0.4, np.float32)
    out = np.asarray(render_scatter(img, disp, 0.4, 30.0, config=SRGB))
    np.testing.assert_allclose(out, img, atol=2e-4)
    # Zero strength leaves any scene in focus.
    disp2 = np.random.default_rng(2).random((S, S)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(render_scatter(img, disp2, 0.3, 0.0, config=SRGB)), img, atol=2e-4)


def test_constant_image_stays_constant_at_borders():
    img = np.full((S, S, 3), 0.37, np.float32)
    disp = np.random.default_rng(3).random((S, S)).astype(np.float32)
    for focus in (0.0, 0.5, 1.0):
        out = np.asarray(render_scatter(img, disp, focus, 25.0, config=SRGB))
        np.testing.assert_allclose(out, 0.37, atol=1e-4)


def fg_bg_scene():
    """A sharp-textured background far away (0.1) and a flat red square foreground near (0.8)."""
    img = texture(4)
    img[..., 0] *= 0.3  # background has little red
    disp = np.full((S, S), 0.1, np.float32)
    img[20:44, 20:44] = [0.95, 0.1, 0.1]
    disp[20:44, 20:44] = 0.8
    return img, disp


def test_in_focus_foreground_stays_sharp_over_blurred_background():
    img, disp = fg_bg_scene()
    out = np.asarray(render_scatter(img, disp, 0.8, 20.0, config=SRGB))
    np.testing.assert_allclose(out[20:44, 20:44], img[20:44, 20:44], atol=2e-3)  # edges included
    far = np.ones((S, S), bool)
    far[6:58, 6:58] = False  # background 12+ px from the square: blurred, so smoother than the input
    assert out[far].std(0).mean() < 0.5 * img[far].std(0).mean()


def test_blurred_foreground_spreads_over_sharp_background():
    img, disp = fg_bg_scene()
    out = np.asarray(render_scatter(img, disp, 0.1, 20.0, config=SRGB))  # fg CoC radius 14
    # The background far from the square is in focus: unchanged.
    far = np.ones((S, S), bool)
    far[4:60, 4:60] = False
    np.testing.assert_allclose(out[far], img[far], atol=2e-3)
    # Just outside the square, the blurred red foreground partly covers the background ...
    ring = out[16:18, 24:40, 0]
    assert ring.mean() > img[16:18, 24:40, 0].mean() + 0.15
    # ... and lets it through (partial occlusion): neither pure background nor pure foreground.
    assert ring.mean() < 0.9
    # The square's edge is soft: its own colour mixes with the background there.
    assert out[20, 32, 0] < 0.9


def extents(out):
    ys, xs = np.nonzero(out > 0.3 * out.max())
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_six_blade_aperture_is_a_hexagon():
    img, disp = point_scene(0.8)
    circle = np.asarray(render_scatter(img, disp, 0.1, 20.0, config=LINEAR))[..., 0]
    hexa = np.asarray(
        render_scatter(img, disp, 0.1, 20.0, config=ScatterConfig(16, 12, gamma=1.0, blades=6.0))
    )[..., 0]
    hexa_rot = np.asarray(
        render_scatter(
            img, disp, 0.1, 20.0, config=ScatterConfig(16, 12, gamma=1.0, blades=6.0, rotation=30.0)
        )
    )[..., 0]
    wx, wy = extents(circle)
    assert abs(wx - wy) <= 1
    # Vertex on the x axis: width 2r, height 2r cos 30 (ratio 1.155); rotated 30 degrees: swapped.
    hx, hy = extents(hexa)
    assert hx / hy == pytest.approx(2 / np.sqrt(3), abs=0.06)
    rx, ry = extents(hexa_rot)
    assert ry / rx == pytest.approx(2 / np.sqrt(3), abs=0.06)
    assert hexa.sum() == pytest.approx(1.0, rel=0.01)  # energy still conserved
    # A hexagon inscribed in the circle covers 3 sqrt(3) / (2 pi) = 83% of its area.
    ratio = (hexa > 0.5 * hexa.max()).sum() / (circle > 0.5 * circle.max()).sum()
    assert ratio == pytest.approx(3 * np.sqrt(3) / (2 * np.pi), abs=0.06)


def test_highlight_boost_off_by_default_and_adds_energy():
    img, disp = point_scene(0.8, value=1.0)
    base = np.asarray(render_scatter(img, disp, 0.1, 10.0, config=LINEAR))
    boosted = np.asarray(
        render_scatter(img, disp, 0.1, 10.0, config=ScatterConfig(16, 12, gamma=1.0, highlight_boost=2.0))
    )
    assert base[..., 0].sum() == pytest.approx(1.0, rel=0.01)
    assert boosted[..., 0].sum() == pytest.approx(3.0, rel=0.01)  # full-white pixel gains 1 + boost
    dim, _ = point_scene(0.8, value=0.5)  # below the threshold: untouched
    a = np.asarray(
        render_scatter(dim, disp, 0.1, 10.0, config=ScatterConfig(16, 12, gamma=1.0, highlight_boost=2.0))
    )
    assert a[..., 0].sum() == pytest.approx(0.5, rel=0.01)


def test_traced_settings_do_not_recompile():
    img, disp = fg_bg_scene()
    render_scatter(img, disp, 0.3, 10.0, config=SRGB).block_until_ready()
    size = scatter_mod._render_scatter_jit._cache_size()
    outs = [
        render_scatter(img, disp, 0.7, 18.5, config=SRGB),
        render_scatter(img, disp, np.float32(0.2), 3, config=SRGB),
        render_scatter(
            img,
            disp,
            0.5,
            12.0,
            config=ScatterConfig(
                16, 12, blades=7, rotation=12.5, highlight_boost=1.5, highlight_threshold=0.8, gamma=2.4
            ),
        ),
    ]
    jax.block_until_ready(outs)
    assert scatter_mod._render_scatter_jit._cache_size() == size
    assert not np.allclose(outs[0], outs[1])


def test_gradients_are_finite():
    img, disp = fg_bg_scene()

    def loss(image, disparity, focus, strength):
        return jnp.mean(render_scatter(image, disparity, focus, strength, config=SRGB) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.asarray(img), jnp.asarray(disp), 0.4, 12.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.abs(np.asarray(g)).sum() > 0  # every input reaches the output


def test_batched_matches_single():
    img, disp = fg_bg_scene()
    img2 = texture(5)
    imgs = np.stack([img, img2])
    disps = np.stack([disp, disp[::-1]])
    out = np.asarray(render_scatter(imgs, disps, jnp.array([0.1, 0.8]), jnp.array([10.0, 14.0]), config=SRGB))
    np.testing.assert_allclose(out[0], render_scatter(img, disp, 0.1, 10.0, config=SRGB), atol=1e-5)
    np.testing.assert_allclose(out[1], render_scatter(img2, disp[::-1], 0.8, 14.0, config=SRGB), atol=1e-5)


def test_focal_stack_focuses_across_the_range():
    img, disp = fg_bg_scene()
    focus_n, stack = focal_stack(img, disp, 12.0, 3, config=SRGB)
    np.testing.assert_allclose(focus_n, [0.1, 0.45, 0.8], atol=1e-6)
    assert stack.shape == (3, S, S, 3)
    np.testing.assert_allclose(stack[2], render_scatter(img, disp, 0.8, 12.0, config=SRGB), atol=1e-5)
    # Focused on the foreground, the square is sharp; focused on the background, it is not.
    sq = slice(20, 44)
    assert np.abs(np.asarray(stack[2])[sq, sq] - img[sq, sq]).max() < 2e-3
    assert np.abs(np.asarray(stack[0])[sq, sq] - img[sq, sq]).max() > 0.1


@pytest.mark.parametrize(
    "kw", [{}, {"blades": 5.0, "rotation": 17.0, "highlight_boost": 1.0, "gamma": 2.0}, {"fill_holes": False}]
)
def test_matches_numpy_reference(kw):
    img = texture(6, smooth=True)
    disp = np.random.default_rng(7).random((S, S)).astype(np.float32) * 0.6 + 0.2
    cfg = ScatterConfig(max_radius=16, num_layers=12, **kw)
    out = np.asarray(render_scatter(img, disp, 0.35, 15.0, config=cfg))
    ref = numpy_scatter(img, disp, 0.35, 15.0, max_radius=16, num_layers=12, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_bad_shapes_raise():
    with pytest.raises(InputError, match="does not match"):
        render_scatter(np.zeros((8, 8, 3)), np.zeros((8, 9)), 0.5, 1.0)
    with pytest.raises(InputError, match=r"\[\.\.\., H, W, 3\]"):
        render_scatter(np.zeros((8, 8, 4)), np.zeros((8, 8)), 0.5, 1.0)
    with pytest.raises(InputError, match="num_layers"):
        ScatterConfig(num_layers=2)
    with pytest.raises(InputError, match="max_radius"):
        ScatterConfig(max_radius=0)
    with pytest.raises(InputError, match="n >= 1"):
        focal_stack(np.zeros((8, 8, 3)), np.zeros((8, 8)), 1.0, 0)
    with pytest.raises(InputError, match="one image"):
        focal_stack(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8)), 1.0, 2)
    with pytest.raises(InputError, match="method"):
        numpy_scatter(np.zeros((8, 8, 3)), np.zeros((8, 8)), 0.5, 1.0, method="exact")


def test_numpy_tap_by_tap_reference_matches_fft_reference():
    img = texture(8)[:32, :40]
    disp = np.random.default_rng(9).random((32, 40)).astype(np.float32)
    kw = dict(max_radius=6, num_layers=8, blades=6.0, rotation=5.0)
    fft = numpy_scatter(img, disp, 0.6, 9.0, **kw)
    direct = numpy_scatter(img, disp, 0.6, 9.0, method="direct", **kw)
    np.testing.assert_allclose(direct, fft, atol=2e-5)
    assert np.abs(fft - img).max() > 0.05  # it did blur
