"""Blockwise/sparse PISA with several block pairs per loop iteration (the layout for accelerators), the
chunk packing, and ``impl="auto"``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from pisa_inputs import make_inputs

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa import PisaConfig, pisa_attention
from bokehdiff_jax.pisa.blockwise import make_chunks
from bokehdiff_jax.pisa.config import DENSE_BUDGET, resolve_impl


def _run(cfg, grid, q, k, v, disp, f, s):
    fn = lambda q, k, v: pisa_attention(q, k, v, grid=grid, disparity=disp, focus=f, strength=s, config=cfg)
    return jax.jit(fn)(q, k, v), fn


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-3))


def test_make_chunks_packs_every_active_pair_once_into_matchings():
    rng = np.random.default_rng(0)
    active = rng.uniform(size=(7, 10)) < 0.4
    active[3] = False
    for g in (1, 3, 50):
        c = make_chunks(jnp.asarray(active), g)
        n = int(c.count)
        qb, kb = np.asarray(c.qb)[:n], np.asarray(c.kb)[:n]
        seen = np.zeros_like(active, int)
        for rows, cols in zip(qb, kb, strict=True):
            real = rows < 7
            assert np.all((cols < 10) == real) and real.any()  # unused slots: both spares
            assert len(set(rows[real])) == real.sum() and len(set(cols[real])) == real.sum()  # a matching
            assert len(set((cols - rows)[real])) == 1  # on one diagonal
            seen[rows[real], cols[real]] += 1
        np.testing.assert_array_equal(seen, active.astype(int))
        diagonals = {}
        for i, j in zip(*np.nonzero(active), strict=True):
            diagonals[j - i] = diagonals.get(j - i, 0) + 1
        assert n == sum(-(-a // min(g, 7)) for a in diagonals.values())  # no chunk more than needed


@pytest.mark.parametrize("softmax_q", [True, False])
def test_many_pairs_per_step_equal_dense_and_one_pair_per_step(softmax_q):
    grid = (6, 10)
    q, k, v, disp, f, s = make_inputs(11, 2, grid, 2, 8, (24, 40))
    s = s * 0.3  # some block pairs out of reach, so sparse skips
    base = dict(softmax_q=softmax_q, block_q=8, block_k=8, sparse_tolerance=1e-7)
    ref, _ = _run(PisaConfig(impl="dense", **base), grid, q, k, v, disp, f, s)
    one, _ = _run(PisaConfig(impl="blockwise", keys_per_step=8, **base), grid, q, k, v, disp, f, s)
    many, _ = _run(PisaConfig(impl="blockwise", keys_per_step=10_000, **base), grid, q, k, v, disp, f, s)
    sparse, _ = _run(PisaConfig(impl="sparse", keys_per_step=24, **base), grid, q, k, v, disp, f, s)
    _close(one, ref)
    _close(many, one)  # whole diagonals of block pairs per step
    _close(sparse, ref, rtol=1e-4)  # three pairs per step, skipped pairs packed out


def test_many_pairs_per_step_gradients():
    grid = (3, 5)
    q, k, v, disp, f, s = make_inputs(12, 1, grid, 1, 4, (9, 15), scale=0.5)
    for sq in (True, False):  # sparse: the engine of blockwise too, with packed chunks of 2 pairs
        cfg = PisaConfig(impl="sparse", softmax_q=sq, block_q=4, block_k=4, keys_per_step=8,
                         sparse_tolerance=1e-7, supersample=2, segments=3)  # fmt: skip
        _, fn = _run(cfg, grid, q, k, v, disp, f, s)
        check_grads(jax.jit(fn), (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_auto_picks_dense_while_it_fits_then_sparse():
    cfg = PisaConfig()
    assert cfg.impl == "auto"
    small = dict(batch=1, heads=10, train=False)
    assert resolve_impl(cfg, n_q=256, n_k=256, backend="cpu", **small) == ("dense", 128)
    assert resolve_impl(cfg, n_q=1024, n_k=1024, backend="cpu", **small) == ("sparse", 128)
    # An accelerator: dense at SDXL 1024 px (4096 tokens), sparse at 2048 px, 8192 keys (64 pairs) a step.
    assert resolve_impl(cfg, n_q=4096, n_k=4096, backend="gpu", **small)[0] == "dense"
    assert resolve_impl(cfg, n_q=16384, n_k=16384, backend="gpu", **small) == ("sparse", 8192)
    assert resolve_impl(PisaConfig(coc=False), n_q=16384, n_k=16384, backend="tpu", **small)[0] == "blockwise"
    # Training keeps the weights for the backward pass: a quarter of the budget.
    n = int((DENSE_BUDGET["accelerator"] / 4 / 15) ** 0.5)
    assert resolve_impl(cfg, n_q=n, n_k=n, backend="gpu", batch=1, heads=10, train=False)[0] == "dense"
    assert resolve_impl(cfg, n_q=n, n_k=n, backend="gpu", batch=1, heads=10, train=True)[0] == "sparse"
    assert resolve_impl(PisaConfig(keys_per_step=300), n_q=9, n_k=9, backend="cpu", **small)[1] == 300
    with pytest.raises(InputError):
        PisaConfig(keys_per_step=0)


def test_auto_equals_the_chosen_implementation():
    grid = (8, 8)
    q, k, v, disp, f, s = make_inputs(13, 1, grid, 2, 8, (32, 32))
    auto, _ = _run(PisaConfig(block_q=16, block_k=16), grid, q, k, v, disp, f, s)
    dense, _ = _run(PisaConfig(impl="dense"), grid, q, k, v, disp, f, s)
    np.testing.assert_array_equal(auto, dense)  # 64 tokens on a CPU: dense
