"""Sharded PISA (batch, heads, query-parallel sequence) == unsharded, on 8 fake CPU devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from pisa_inputs import make_inputs

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa import PisaConfig, pisa_attention
from bokehdiff_jax.pisa.sharded import pisa_attention_sharded

GRID = (4, 6)
AXES = [
    dict(batch_axis="b"),
    dict(head_axis="h"),
    dict(seq_axis="s"),
    dict(batch_axis="b", seq_axis="s"),
    dict(batch_axis="b", head_axis="h", seq_axis="s"),
    dict(batch_axis="b", seq_axis=("h", "s")),  # a split over two mesh axes at once
]


@pytest.fixture(scope="module")
def mesh():
    # tests/conftest.py sets XLA_FLAGS for 8 fake CPU devices before JAX starts.
    assert len(jax.devices()) >= 8, "sharding tests need 8 devices: run them through tests/conftest.py"
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("b", "h", "s"))


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(10, 2, GRID, 4, 8, (16, 24))


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize(
    "impl,softmax_q", [("blockwise", True), ("blockwise", False), ("dense", True), ("sparse", True)]
)
def test_sharded_equals_unsharded(mesh, inputs, impl, softmax_q):
    q, k, v, disp, f, s = inputs
    cfg = PisaConfig(impl=impl, softmax_q=softmax_q, block_q=8, block_k=8, sparse_tolerance=1e-6)
    kw = dict(grid=GRID, disparity=disp, focus=f, strength=s, config=cfg)
    ref = jax.jit(lambda q, k, v: pisa_attention(q, k, v, **kw))(q, k, v)
    for axes in AXES if impl == "blockwise" else AXES[-1:]:
        out = jax.jit(lambda q, k, v, axes=axes: pisa_attention_sharded(q, k, v, mesh=mesh, **axes, **kw))(
            q, k, v
        )
        assert _rel(out, ref) < 1e-6, axes


def test_sharded_gradients_and_training(mesh, inputs):
    q, k, v, disp, f, s = inputs
    cfg = PisaConfig(block_q=8, block_k=8, dropout=0.1)
    kw = dict(
        grid=GRID,
        disparity=disp,
        focus=f,
        strength=s,
        config=cfg,
        step=jnp.asarray(10),
        key=jax.random.key(3),
        train=True,
    )
    axes = AXES[-1]
    loss = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    ref = loss(lambda q, k, v: pisa_attention(q, k, v, **kw))(q, k, v)
    got = loss(lambda q, k, v: pisa_attention_sharded(q, k, v, mesh=mesh, **axes, **kw))(q, k, v)
    for a, b in zip(got, ref, strict=True):
        assert _rel(a, b) < 1e-5


def test_sharded_hard_edge_keeps_in_focus_keys(mesh, inputs):
    """K = 0 with a hard edge (dist <= r, SPEC 2): each key reaches only its own query, so PISA without
    occlusion returns v, also when the queries are split over devices."""
    q, k, v, disp, f, s = inputs
    cfg = PisaConfig(hardness=math.inf, occlusion=False, block_q=8, block_k=8)
    kw = dict(grid=GRID, disparity=disp, focus=f, strength=jnp.zeros_like(s), config=cfg, mesh=mesh)
    out = jax.jit(lambda q, k, v: pisa_attention_sharded(q, k, v, **AXES[-2], **kw))(q, k, v)
    np.testing.assert_allclose(out, v, rtol=1e-6, atol=1e-6)


def test_sharding_rejects_uneven_splits(mesh, inputs):
    q, k, v, disp, f, s = inputs
    with pytest.raises(InputError, match="divisible"):
        pisa_attention_sharded(
            q[:1],
            k[:1],
            v[:1],
            grid=GRID,
            disparity=disp[:1],
            focus=f[:1],
            strength=s[:1],
            mesh=mesh,
            batch_axis="b",
        )
    with pytest.raises(InputError, match="mesh axis"):
        pisa_attention_sharded(
            q, k, v, grid=GRID, disparity=disp, focus=f, strength=s, mesh=mesh, seq_axis="tokens"
        )
