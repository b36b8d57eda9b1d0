"""PISA: energy, empty supports, gradients, determinism, and dense == blockwise == sparse."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from pisa_inputs import make_inputs

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa import INFERENCE_HARDNESS, PisaConfig, pisa_attention, training_hardness
from bokehdiff_jax.pisa.blockwise import sparse_pairs
from bokehdiff_jax.pisa.dense import dense_weights
from bokehdiff_jax.pisa.geometry import pad_tokens, prepare

IMPLS = ("dense", "blockwise", "sparse")


@functools.cache
def jitted(config: PisaConfig, grid, train=False):
    def fn(q, k, v, disparity, focus, strength, step=None, key=None):
        return pisa_attention(
            q,
            k,
            v,
            grid=grid,
            disparity=disparity,
            focus=focus,
            strength=strength,
            config=config,
            step=step,
            key=key,
            train=train,
        )

    return jax.jit(fn)


def weights(config, grid, q, k, disparity, focus, strength):
    st, arrays, tokens = prepare(config, grid, q.shape[2], disparity, focus, strength, None, None, False)
    w, post = dense_weights(st, arrays, tokens, tokens, q, k)
    return np.asarray(w), tokens


def test_all_switches_off_is_dot_product_attention():
    grid = (5, 7)
    q, k, v, disp, f, s = make_inputs(0, 2, grid, 2, 8, (20, 28))
    expected = jax.nn.dot_product_attention(q, k, v)
    for impl in IMPLS:
        cfg = PisaConfig(softmax_q=False, coc=False, occlusion=False, impl=impl, block_q=8, block_k=16)
        np.testing.assert_allclose(jitted(cfg, grid)(q, k, v, disp, f, s), expected, rtol=1e-5, atol=1e-6)


def test_energy_conservation_and_coc_support():
    grid = (6, 6)
    q, k, _, disp, f, s = make_inputs(1, 1, grid, 2, 8, (24, 24), scale=0.3)
    for cfg in (PisaConfig(coc=False, occlusion=False), PisaConfig(coc=True, occlusion=False)):
        w, _ = weights(cfg, grid, q, k, disp, f, s)
        np.testing.assert_allclose(w.sum(axis=-2), 1.0, atol=1e-5)  # every key spends energy 1
    w, _ = weights(PisaConfig(softmax_q=False, coc=False, occlusion=False), grid, q, k, disp, f, s)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)  # vanilla: rows sum to 1

    def dist_and_radius(tokens):
        xy = np.asarray(tokens.xy)
        dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        return dist, np.asarray(tokens.radius[0])[None, :]

    # Hard edge: exactly zero weight beyond the radius (SPEC 2: the support is dist <= r).
    w, tokens = weights(PisaConfig(occlusion=False, hardness=math.inf), grid, q, k, disp, f, s)
    dist, r = dist_and_radius(tokens)
    beyond = dist > r
    assert 0 < beyond.sum() < beyond.size
    np.testing.assert_array_equal(w[0][:, beyond], 0.0)
    # Soft edge: beyond r + margin(tol) the weight is below ~tol.
    cfg = PisaConfig(occlusion=False)
    w, _ = weights(cfg, grid, q, k, disp, f, s)
    margin = math.log((1 - 1e-6) / 1e-6) / cfg.hardness
    far = dist > r + margin
    assert far.sum() > 0
    assert np.max(w[0][:, far]) < 1e-5


@pytest.mark.parametrize(
    "impl,softmax_q", [("dense", True), ("dense", False), ("blockwise", True), ("sparse", False)]
)
def test_zero_strength_keeps_each_key_on_its_own_query(impl, softmax_q):
    """K = 0: every radius is 0. A hard edge means dist <= r (SPEC 2), so each key still reaches its own
    query and nothing else: without occlusion PISA returns v. The default soft edge gives the same (its
    off-diagonal sigmoid(-beta * 3 px) ~ 1e-21), and so does a very hard soft edge: the hard edge is its
    limit. Gradients stay finite, occlusion on (the padded keys of the blockwise runs have empty
    supports)."""
    grid = (4, 5)
    q, k, v, disp, f, _ = make_inputs(2, 1, grid, 2, 4, (12, 15))
    zero = jnp.zeros(1)
    for hardness in (math.inf, INFERENCE_HARDNESS, 1e4):
        cfg = PisaConfig(
            softmax_q=softmax_q, occlusion=False, hardness=hardness, impl=impl, block_q=8, block_k=8
        )
        fn = jitted(cfg, grid)
        np.testing.assert_allclose(fn(q, k, v, disp, f, zero), v, rtol=1e-6, atol=1e-6)
    hard = jitted(PisaConfig(softmax_q=softmax_q, hardness=math.inf, impl=impl, block_q=8, block_k=8), grid)
    grads = jax.grad(lambda q, k, v: jnp.sum(hard(q, k, v, disp, f, zero) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("impl", IMPLS)
def test_in_focus_plane_is_sharp_with_a_hard_edge(impl):
    """A fronto-parallel plane exactly at the focus (d = d_f) at K = 20: every radius is 0 and every ray
    is unblocked, so with all switches on each token outputs its own value, none outputs 0."""
    grid = (6, 10)
    q, k, v, _, _, _ = make_inputs(13, 2, grid, 2, 4, (24, 40))
    disp = jnp.full((2, 24, 40), 0.4, jnp.float32)
    focus, strength = jnp.full((2,), 0.4, jnp.float32), jnp.full((2,), 20.0, jnp.float32)
    cfg = PisaConfig(hardness=math.inf, impl=impl, block_q=16, block_k=16, supersample=2, segments=3)
    out = np.asarray(jitted(cfg, grid)(q, k, v, disp, focus, strength))
    assert np.all(np.abs(out).max(axis=-1) > 0)  # no token outputs 0
    np.testing.assert_allclose(out, v, rtol=1e-6, atol=1e-6)
    if impl == "sparse":  # radius 0: only block pairs whose boxes touch are visited, the diagonal among them
        st, arrays, tokens = prepare(cfg, grid, 2, disp, focus, strength, None, None, False)
        t = pad_tokens(tokens, 64)
        pairs = sparse_pairs(st, arrays, t, t, 16, 16)
        assert 4 <= int(pairs.count) < 16
        n = int(pairs.count)
        visited = set(zip(np.asarray(pairs.qb)[:n].tolist(), np.asarray(pairs.kb)[:n].tolist(), strict=True))
        assert {(i, i) for i in range(4)} <= visited


def test_invisible_key_contributes_nothing():
    """A source at infinity (d = 0) is seen along the query's own line of sight (Eq. 7 with d_s = 0 gives
    P(t) = P_q), so any query on a surface nearer than the lowest sample t = 0.1 hides it completely."""
    grid = (4, 6)
    disparity = np.full((1, 12, 18), 0.5, np.float32)
    disparity[:, 3:6, 6:9] = 0.0  # token (1, 2) looks at infinity
    q, k, _, _, _, _ = make_inputs(3, 1, grid, 1, 4, (12, 18))
    w, _ = weights(
        PisaConfig(coc=False), grid, q, k, jnp.asarray(disparity), jnp.asarray([0.5]), jnp.asarray([5.0])
    )
    sky = 1 * 6 + 2
    others = [i for i in range(24) if i != sky]
    np.testing.assert_array_equal(w[0, 0][others, sky], 0.0)
    assert w[0, 0][sky, sky] > 0  # visible to itself
    assert np.all(np.isfinite(w))


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-3))


@pytest.mark.parametrize("grid,blocks", [((5, 7), (8, 16)), ((8, 8), (16, 16)), ((3, 11), (16, 8))])
def test_dense_blockwise_sparse_agree(grid, blocks):
    image = (grid[0] * 4, grid[1] * 4)
    q, k, v, disp, f, s = make_inputs(4, 2, grid, 2, 8, image)
    for softmax_q in (True, False):
        base = dict(softmax_q=softmax_q, block_q=blocks[0], block_k=blocks[1], sparse_tolerance=0.0)
        ref = jitted(PisaConfig(impl="dense", **base), grid)(q, k, v, disp, f, s)
        blockwise = jitted(PisaConfig(impl="blockwise", **base), grid)(q, k, v, disp, f, s)
        sparse = jitted(PisaConfig(impl="sparse", **base), grid)(q, k, v, disp, f, s)
        _close(blockwise, ref)
        np.testing.assert_array_equal(sparse, blockwise)  # zero tolerance skips nothing


def test_sparse_skips_and_stays_within_tolerance():
    grid = (16, 16)
    q, k, v, disp, f, s = make_inputs(5, 1, grid, 2, 8, (64, 64), scale=0.3)
    s = s * 0.1  # radii of a few tokens: most block pairs are out of reach
    cfg = PisaConfig(impl="sparse", block_q=16, block_k=16, sparse_tolerance=1e-6)
    st, arrays, tokens = prepare(cfg, grid, 2, disp, f, s, None, None, False)
    pairs = sparse_pairs(st, arrays, pad_tokens(tokens, 256), pad_tokens(tokens, 256), 16, 16)
    assert 16 <= int(pairs.count) < 256 // 2
    out = jitted(cfg, grid)(q, k, v, disp, f, s)
    ref = jitted(PisaConfig(impl="dense"), grid)(q, k, v, disp, f, s)
    _close(out, ref, rtol=1e-4)


def test_gradients_all_variants():
    grid = (3, 4)
    q, k, v, disp, f, s = make_inputs(6, 1, grid, 1, 4, (9, 12), scale=0.5)
    small = dict(block_q=8, block_k=8, sparse_tolerance=1e-7, supersample=2, segments=3)
    variants = [
        (PisaConfig(impl=impl, softmax_q=sq, **small), False) for impl in IMPLS for sq in (True, False)
    ]
    variants += [
        (PisaConfig(impl="blockwise", coc=False, **small), False),  # softmaxQ + occlusion
        (PisaConfig(impl="blockwise", occlusion=False, **small), False),  # softmaxQ + CoC
        (PisaConfig(impl="blockwise", dropout=0.2, train_occlusion_clamp=0.99, **small), True),
    ]
    key, step = jax.random.key(1), jnp.asarray(50)
    for cfg, train in variants:
        fn = jitted(cfg, grid, train=train)
        extra = (step, key) if train else ()
        check_grads(
            lambda q, k, v, fn=fn, extra=extra: fn(q, k, v, disp, f, s, *extra),
            (q, k, v),
            order=1,
            modes=["rev"],
            atol=2e-2,
            rtol=2e-2,
            eps=1e-2,
        )


def test_training_is_deterministic_given_the_key_and_blockwise_matches_dense():
    grid = (4, 6)
    q, k, v, disp, f, s = make_inputs(7, 2, grid, 2, 4, (16, 24))
    key = jax.random.key(0)
    outs = {}
    for impl in ("dense", "blockwise"):
        cfg = PisaConfig(impl=impl, dropout=0.1, train_occlusion_clamp=0.99, block_q=8, block_k=16)
        fn = jitted(cfg, grid, train=True)
        a = fn(q, k, v, disp, f, s, jnp.asarray(100), key)
        b = fn(q, k, v, disp, f, s, jnp.asarray(100), key)
        c = fn(q, k, v, disp, f, s, jnp.asarray(100), jax.random.key(1))
        np.testing.assert_array_equal(a, b)
        assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
        outs[impl] = a
    _close(outs["blockwise"], outs["dense"])  # the same dropout mask and jitter, whatever the blocking


def test_hardness_schedule_and_bad_input():
    np.testing.assert_allclose(training_hardness(jnp.arange(3)), np.log(3.0 + np.arange(3)), rtol=1e-6)
    assert hash(PisaConfig()) == hash(PisaConfig())
    for bad in (dict(impl="flash"), dict(segments=0), dict(dropout=1.0), dict(train_occlusion_clamp=0.999)):
        with pytest.raises(InputError):
            PisaConfig(**bad)
    q, k, v, disp, f, s = make_inputs(8, 1, (2, 3), 1, 4, (6, 9))
    with pytest.raises(InputError, match="grid"):
        pisa_attention(q, k, v, grid=(3, 3), disparity=disp, focus=f, strength=s)
    with pytest.raises(InputError, match="focus"):
        pisa_attention(q, k, v, grid=(2, 3), disparity=disp, focus=f[0], strength=s)
    with pytest.raises(InputError, match="key"):
        pisa_attention(q, k, v, grid=(2, 3), disparity=disp, focus=f, strength=s, train=True)


def test_released_units_mapping():
    """units='released': unit-grid centres, distance x 51.2, radius |d - d_f| K upsample / 10."""
    from bokehdiff_jax.pisa.geometry import pair_terms

    grid, image = (4, 6), (12, 30)
    _, _, _, disp, f, s = make_inputs(9, 1, grid, 1, 4, image)
    cfg = PisaConfig(units="released", released_upsample=8.0, occlusion=False)
    st, arrays, tokens = prepare(cfg, grid, 1, disp, f, s, None, None, False)
    bias, _ = pair_terms(st, arrays, tokens, tokens)
    ii, jj = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    unit = np.stack([(jj.ravel() + 0.5) / 6, (ii.ravel() + 0.5) / 4], -1)
    dist = 51.2 * np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    d_tok = np.asarray(disp[0]).reshape(4, 3, 6, 5).mean(axis=(1, 3)).ravel()
    radius = np.abs(d_tok - float(f[0])) * float(s[0]) * 8.0 / 10.0
    expected = -np.logaddexp(0.0, -cfg.hardness * (radius[None, :] - dist))  # log sigmoid
    np.testing.assert_allclose(np.asarray(bias[0, 0]), expected, rtol=1e-4, atol=1e-4)


def test_dropout_and_jitter_only_in_training():
    """SPEC 6: no dropout and no random jitter at inference, so no key is needed and runs repeat exactly."""
    grid = (4, 6)
    q, k, v, disp, f, s = make_inputs(10, 1, grid, 2, 4, (16, 24))
    plain = jitted(PisaConfig(impl="dense"), grid)(q, k, v, disp, f, s)
    for impl in IMPLS:
        cfg = PisaConfig(impl=impl, dropout=0.5, train_occlusion_clamp=0.5, block_q=8, block_k=8)
        a = jitted(cfg, grid)(q, k, v, disp, f, s)
        np.testing.assert_array_equal(a, jitted(cfg, grid)(q, k, v, disp, f, s))
        _close(a, plain)  # as if dropout and the clamp did not exist
        trained = jitted(cfg, grid, train=True)(q, k, v, disp, f, s, None, jax.random.key(3))
        assert np.abs(np.asarray(trained) - np.asarray(a)).max() > 1e-3


@pytest.mark.parametrize("t_from_query", [False, True])
def test_disparity_one_is_clamped(t_from_query):
    """SPEC 6: disparity exactly 1 (a point on the lens) must not divide by zero, forward or backward."""
    grid = (4, 4)
    q, k, v, disp, f, s = make_inputs(11, 1, grid, 1, 4, (16, 16))
    disp = disp.at[:, :8, :8].set(1.0)
    for impl in ("dense", "blockwise"):
        cfg = PisaConfig(impl=impl, t_from_query=t_from_query, block_q=8, block_k=8)
        fn = jitted(cfg, grid)
        assert np.all(np.isfinite(np.asarray(fn(q, k, v, disp, f, s))))
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, disp, f, s) ** 2)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_non_square_grid_geometry():
    """SPEC 6: the true (h, w) is used, x and y are not swapped, and the CoC is a circle in image pixels
    even when the tokens are not square (here 4 x 8 pixels). Expected values derived here independently."""
    grid, image = (3, 5), (12, 40)
    q, k, _, disp, f, s = make_inputs(12, 1, grid, 1, 4, image)
    w, tokens = weights(PisaConfig(occlusion=False, hardness=math.inf), grid, q, k, disp, f, s)
    rows, cols = np.divmod(np.arange(15), 5)  # row-major: token t is at (row, col) = divmod(t, w)
    xy = np.stack([(cols + 0.5) * 40 / 5, (rows + 0.5) * 12 / 3], axis=-1)
    np.testing.assert_allclose(np.asarray(tokens.xy), xy, rtol=1e-6)
    d_tok = np.asarray(disp[0], np.float64).reshape(3, 4, 5, 8).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(np.asarray(tokens.disp[0]), d_tok, rtol=1e-5)
    radius = float(s[0]) * np.abs(d_tok - float(f[0]))
    inside = np.linalg.norm(xy[:, None] - xy[None], axis=-1) <= radius[None, :]
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(w[0, 0] > 0, inside)
