"""Dense PISA: the reference, written to read like the equations of SPEC section 2.

It materialises the ``[B, heads, N, N]`` weights (and, with occlusion, ``N x N x T x S`` ray samples),
exactly like the released PyTorch code: use it to check the others, not at scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bokehdiff_jax.pisa.geometry import CallArrays, Static, Tokens, pair_terms


def dense_weights(
    st: Static,
    arrays: CallArrays,
    tq: Tokens,
    tk: Tokens,
    q: jnp.ndarray,
    k: jnp.ndarray,
    seq_axis: str | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The weights ``W [B, heads, nq, nk]`` and the post-normalisation factor (``Vis`` times dropout;
    ``None`` if 1). ``q``: ``[B, nq, heads, D]``; ``k``: ``[B, nk, heads, D]``.

    ``seq_axis``: inside ``shard_map`` with the queries split over that mesh axis (keys whole), the
    column statistics of softmaxQ are reduced across it.
    """
    cfg = st.config
    scale = q.shape[-1] ** -0.5
    a = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    bias, post = pair_terms(st, arrays, tq, tk)
    logits = a + bias  # A_ij + log C_ij; -inf where C_ij = 0 or padding
    axis = -2 if cfg.softmax_q else -1  # softmaxQ normalises over queries (columns), vanilla over keys
    m = jax.lax.stop_gradient(jnp.max(logits, axis=axis, keepdims=True))  # stabiliser: cancels exactly
    if cfg.softmax_q and seq_axis is not None:
        m = jax.lax.pmax(m, seq_axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)  # exp(A_ij) C_ij, up to the per-column (or row) factor exp(-m)
    z = jnp.sum(e, axis=axis, keepdims=True)
    if cfg.softmax_q and seq_axis is not None:
        z = jax.lax.psum(z, seq_axis)
    # An empty support (all C_ij = 0) has e = 0 and z = 0: it contributes nothing, without 0 / 0.
    w = e / jnp.where(z > 0, z, 1.0)
    if post is not None:
        w = w * post  # visibility (and dropout) after normalisation, Eq. 9
    return w, post


def dense_attention(
    st: Static,
    arrays: CallArrays,
    tq: Tokens,
    tk: Tokens,
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    seq_axis: str | None = None,
) -> jnp.ndarray:
    """``o_i = sum_j W_ij v_j``: ``[B, nq, heads, D]``; ``v``: ``[B, nk, heads, D]``."""
    w, _ = dense_weights(st, arrays, tq, tk, q, k, seq_axis)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32)).astype(q.dtype)
