"""PISA over a ``jax.sharding.Mesh``: batch, heads and the token sequence (issue 3 section 3).

Batch and heads are embarrassingly parallel: every (batch, head) slice is independent, and the token
geometry is per batch element.

The sequence is split **query-parallel**: each device owns a contiguous run of query tokens (whole
rows of the row-major grid) and sees every key (``k`` and ``v`` all-gathered; their gradients come back
reduce-scattered by the all-gather's transpose). Why not key-parallel, although softmaxQ normalises
per key?

- The only cross-device term of the forward is the pair of column statistics (max and normaliser) per
  (batch, head, key): ``2 N`` floats per head, ``head_dim`` times smaller than the ``N x head_dim``
  partial outputs that key-parallel would have to reduce-scatter. In the backward, softmaxQ needs
  ``D_j = v_j . dv_j`` with the complete ``dv``: one all-reduce of ``dv``, which key-parallel would
  equally pay for the partial ``dq``.
- The output stays where its queries are, which is how the U-Net's activations are laid out
  (sequence-sharded rows of the latent); the row-normalised variants (vanilla, CoC without softmaxQ)
  then need no communication beyond the all-gather, where key-parallel would need row statistics.
- Each (query, key) pair's CoC mask and visibility are computed by exactly one device: no duplicated
  ray marching, the dominant cost.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa.api import check_inputs, run_impl
from bokehdiff_jax.pisa.config import DEFAULT_CONFIG, PisaConfig
from bokehdiff_jax.pisa.geometry import CallArrays, Tokens, prepare

Axis = str | tuple[str, ...] | None


def _axis_size(mesh: Mesh | AbstractMesh, axis: str | tuple[str, ...], what: str) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    for name in names:
        if name not in mesh.shape:
            raise InputError(f"PISA {what} mesh axis {name!r} not in the mesh axes {tuple(mesh.shape)}")
    return math.prod(mesh.shape[n] for n in names)


def pisa_attention_sharded(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    grid: tuple[int, int],
    disparity: jnp.ndarray,
    focus: jnp.ndarray,
    strength: jnp.ndarray,
    mesh: Mesh | AbstractMesh,
    batch_axis: Axis = None,
    head_axis: Axis = None,
    seq_axis: Axis = None,
    config: PisaConfig = DEFAULT_CONFIG,
    step=None,
    key=None,
    train: bool = False,
) -> jnp.ndarray:
    """``pisa_attention`` run with ``shard_map`` on ``mesh``; same arguments and result.

    ``mesh``: a ``Mesh``, or inside ``jit`` under ``jax.set_mesh`` the ambient ``AbstractMesh``.
    ``batch_axis``, ``head_axis``, ``seq_axis``: mesh axis names (or tuples of them) splitting the batch,
    the heads and the query tokens (``None``: not split). The sizes must divide evenly (batch, heads,
    ``h * w``). Random
    draws (jitter, dropout) are made for the whole problem before splitting, and dropout masks hash global
    indices, so the result equals the unsharded one.
    """
    check_inputs(q, k, v, grid, disparity, focus, strength)
    for axis, size, what in (
        (batch_axis, q.shape[0], "batch"),
        (head_axis, q.shape[2], "heads"),
        (seq_axis, q.shape[1], "tokens"),
    ):
        if axis is not None:
            n = _axis_size(mesh, axis, what)
            if size % n:
                raise InputError(f"PISA {what}={size} is not divisible by mesh axis {axis!r} of size {n}")
    st, arrays, tokens = prepare(
        config, tuple(grid), q.shape[2], disparity, focus, strength, step, key, train
    )
    b_, h_, s_ = batch_axis, head_axis, seq_axis
    arrays_spec = CallArrays(fine=P(b_), beta=P(), seed=P(), batch_index=P(b_), head_index=P(h_))
    q_tokens_spec = Tokens(xy=P(s_), disp=P(b_, s_), radius=P(b_, s_), offsets=P(b_, s_), index=P(s_))
    k_tokens_spec = Tokens(xy=P(), disp=P(b_), radius=P(b_), offsets=P(b_), index=P())
    qkv_spec = P(b_, s_, h_)

    def local(arrays, tq, tk, q, k, v):
        if s_ is not None:  # query-parallel: every device sees all keys
            k = jax.lax.all_gather(k, s_, axis=1, tiled=True)
            v = jax.lax.all_gather(v, s_, axis=1, tiled=True)
        return run_impl(st, arrays, tq, tk, q, k, v, seq_axis=s_)

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(arrays_spec, q_tokens_spec, k_tokens_spec, qkv_spec, qkv_spec, qkv_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return fn(arrays, tokens, tokens, q, k, v)
