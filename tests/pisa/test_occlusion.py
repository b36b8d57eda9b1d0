"""Visibility (paper Eq. 7-9) on analytic scenes, through PISA's own geometry (token centres, 3x map)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.physics.occlusion import ray_point, visibility
from bokehdiff_jax.pisa import PisaConfig
from bokehdiff_jax.pisa.geometry import pair_terms, prepare

GRID = (16, 16)
IMAGE = 48  # = 3 x grid: the visibility map is the image itself, pixel for pixel
FAR, NEAR = 0.25, 0.75
SQUARE = (15, 33)  # pixel rows/columns [15, 33) = tokens 5..10 exactly


@functools.partial(jax.jit, static_argnums=(1, 2))
def _vis_jit(disparity, segments, supersample):
    cfg = PisaConfig(softmax_q=False, coc=False, occlusion=True, segments=segments, supersample=supersample)
    st, arrays, tokens = prepare(cfg, GRID, 1, disparity[None], jnp.zeros(1), jnp.ones(1), None, None, False)
    _, post = pair_terms(st, arrays, tokens, tokens)
    return post[0, 0], tokens


def _vis(disparity: np.ndarray, segments: int, supersample: int = 1) -> tuple[np.ndarray, object]:
    vis, tokens = _vis_jit(jnp.asarray(disparity), segments, supersample)
    return np.asarray(vis), tokens


def test_ray_point_endpoints():
    p_q, p_s = jnp.asarray([3.0, 4.0]), jnp.asarray([10.0, -2.0])
    d_s = jnp.asarray(0.4)
    np.testing.assert_allclose(ray_point(p_q, p_s, d_s, d_s), p_s, rtol=1e-6)
    np.testing.assert_allclose(ray_point(p_q, p_s, d_s, jnp.asarray(1.0)), p_q, rtol=1e-6)
    # Disparity 1 is clamped, not a division by zero.
    assert np.all(np.isfinite(np.asarray(ray_point(p_q, p_s, jnp.asarray(1.0), jnp.asarray(0.99)))))


def test_fronto_parallel_plane_is_fully_visible():
    for level in (0.0, 0.3, 0.7, 0.95):
        vis, _ = _vis(np.full((IMAGE, IMAGE), level, np.float32), segments=7, supersample=3)
        assert vis.shape == (256, 256)
        np.testing.assert_array_equal(vis, 1.0)


def test_near_square_blocks_exactly_the_crossing_rays():
    disparity = np.full((IMAGE, IMAGE), FAR, np.float32)
    lo, hi = SQUARE
    disparity[lo:hi, lo:hi] = NEAR
    segments = 5
    vis, tokens = _vis(disparity, segments)
    assert set(np.unique(vis)) <= {0.0, 1.0}

    # Expected, from the SPEC's ray formula in float64 (independent of the code): a sample point blocks
    # for sure when it lies where the bilinear look-up only sees square pixels (centres >= 0.5 px inside),
    # and cannot block when it only sees background pixels or when t >= NEAR (nothing is nearer than t).
    xy = np.asarray(tokens.xy, np.float64)
    d_k = np.asarray(tokens.disp[0], np.float64)
    c = np.linspace(0.1, 0.9, segments)
    t = c[None, :] * d_k[:, None] + (1 - c[None, :])  # [key, T]
    factor = (1 - t) * d_k[:, None] / ((1 - d_k[:, None]) * t)  # [key, T]
    pts = xy[:, None, None, :] + factor[None, :, :, None] * (xy[None, :, None, :] - xy[:, None, None, :])
    x, y = pts[..., 0], pts[..., 1]  # [query, key, T]
    inside = (x >= lo + 0.5) & (x <= hi - 0.5) & (y >= lo + 0.5) & (y <= hi - 0.5)
    outside = (x < lo - 0.5) | (x >= hi + 0.5) | (y < lo - 0.5) | (y >= hi + 0.5)
    can_block = t[None] < NEAR - 1e-6
    surely_blocked = np.any(inside & can_block, axis=-1)
    surely_free = np.all(outside | ~can_block, axis=-1)
    assert surely_blocked.sum() > 1000 and surely_free.sum() > 10000
    assert (surely_blocked | surely_free).mean() > 0.9  # the undecided band at the edges is thin
    np.testing.assert_array_equal(vis[surely_blocked], 0.0)
    np.testing.assert_array_equal(vis[surely_free], 1.0)
    # Keys on the square itself are never blocked (nothing is nearer), whoever looks at them.
    on_square = np.isclose(d_k, NEAR)
    assert on_square.sum() == 36
    np.testing.assert_array_equal(vis[:, on_square], 1.0)


def test_more_segments_never_unblock():
    rng = np.random.default_rng(0)
    disparity = rng.uniform(0.0, 1.0, (6, 6)).repeat(8, 0).repeat(8, 1).astype(np.float32)
    previous = None
    # linspace(0.1, 0.9, T) nests for T = 2, 3, 5, 9: each set of samples contains the previous one.
    for segments in (2, 3, 5, 9):
        vis, _ = _vis(disparity, segments, supersample=3)
        if previous is not None:
            assert np.all(vis <= previous)
        previous = vis
    first, _ = _vis(disparity, 2, supersample=3)
    assert np.sum(previous < first) > 0  # and they do block more


def test_visibility_shapes_and_t_from_query():
    fine = jnp.full((12, 12), 0.5)
    p = jnp.asarray([[2.0, 2.0], [9.0, 9.0], [5.0, 1.0]])
    offsets = jnp.zeros((2, 4, 2))
    vis = visibility(fine, (12, 12), p, p[:2], jnp.asarray([0.5, 0.5]), offsets, 3)
    assert vis.shape == (3, 2)
    np.testing.assert_array_equal(vis, 1.0)
    # With t sampled from a far query's disparity, rays pass below the plane: blocked.
    vis_q = visibility(fine, (12, 12), p, p[:2], jnp.asarray([0.5, 0.5]), offsets, 3, jnp.zeros(3))
    np.testing.assert_array_equal(vis_q, 0.0)
