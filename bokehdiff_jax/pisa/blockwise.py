"""Blockwise and sparse PISA: never materialises N x N, forward or backward.

Tokens are cut into blocks of ``block_q`` queries and ``block_k`` keys (the sequence is padded to whole
blocks; padding is masked out of every sum). The work is a loop over a list of (query block, key block)
pairs; on each pair the logits, CoC mask and visibility are computed on the fly from the token geometry.

- softmaxQ (column normalisation): pass 1 accumulates each key's column max and normaliser over the
  query blocks (online, like flash attention but over queries); pass 2 accumulates the outputs with the
  final statistics.
- row normalisation (vanilla / CoC without softmaxQ): one online pass, as flash attention.
- backward (custom VJP, recomputing the blocks): with ``P`` the normalised weights, ``W = P * post``
  (``post`` = visibility x dropout) and ``dP_ij = post_ij dO_i . v_j``,
  column case ``dA_ij = P_ij (dP_ij - D_j)`` with ``D_j = sum_i P_ij dP_ij = v_j . dv_j``;
  row case ``dA_ij = P_ij (dP_ij - D_i)`` with ``D_i = dO_i . o_i``. Memory O(N * block).

``sparse`` shortens the pair list to the pairs whose bounding boxes lie within the key block's largest
CoC radius plus the soft edge's margin (where the sigmoid is below ``sparse_tolerance``); the loop runs
``count`` iterations (a ``while_loop`` with a traced trip count), so skipped pairs cost nothing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.pisa.geometry import CallArrays, Static, Tokens, pad_tokens, pair_terms, slice_tokens


class Pairs(NamedTuple):
    """Block pairs to visit: ``qb``, ``kb``: ``[P]`` int32 block indices; ``count``: how many are real."""

    qb: jnp.ndarray
    kb: jnp.ndarray
    count: jnp.ndarray


def all_pairs(n_qb: int, n_kb: int) -> Pairs:
    qb, kb = np.meshgrid(np.arange(n_qb), np.arange(n_kb), indexing="ij")
    return Pairs(
        jnp.asarray(qb.ravel(), jnp.int32),
        jnp.asarray(kb.ravel(), jnp.int32),
        jnp.asarray(n_qb * n_kb, jnp.int32),
    )


def _block_boxes(st: Static, t: Tokens, n_blocks: int, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-block bounding boxes ``lo, hi: [n_blocks, 2]`` of the valid token centres, in distance units."""
    xy = t.xy.reshape(n_blocks, size, 2) * jnp.asarray(st.metric, jnp.float32)
    valid = (t.index >= 0).reshape(n_blocks, size, 1)
    lo = jnp.min(jnp.where(valid, xy, jnp.inf), axis=1)
    hi = jnp.max(jnp.where(valid, xy, -jnp.inf), axis=1)
    return lo, hi


def sparse_pairs(st: Static, arrays: CallArrays, tq: Tokens, tk: Tokens, bq: int, bk: int) -> Pairs:
    """The (query block, key block) pairs the CoC can reach; the rest have ``C < sparse_tolerance``.

    A pair is kept if the distance between the blocks' bounding boxes is at most the key block's largest
    radius (over the batch) plus the margin ``log((1 - tol) / tol) / beta`` where the sigmoid falls to
    ``tol``. The static maximum count is all pairs; the loop runs only ``count``.
    """
    cfg = st.config
    n_qb, n_kb = tq.xy.shape[0] // bq, tk.xy.shape[0] // bk
    tol = cfg.sparse_tolerance
    if not cfg.coc or (not st.hard_edge and tol == 0.0):
        return all_pairs(n_qb, n_kb)
    q_lo, q_hi = _block_boxes(st, tq, n_qb, bq)
    k_lo, k_hi = _block_boxes(st, tk, n_kb, bk)
    gap = jnp.maximum(0.0, jnp.maximum(k_lo[None] - q_hi[:, None], q_lo[:, None] - k_hi[None]))
    dist = jnp.sqrt(jnp.sum(gap * gap, axis=-1))  # [n_qb, n_kb], a lower bound on every pair's distance
    k_valid = (tk.index >= 0)[None, :]
    r_max = jnp.max(jnp.where(k_valid, tk.radius, 0.0).reshape(-1, n_kb, bk), axis=(0, 2))  # [n_kb]
    margin = 0.0 if st.hard_edge else math.log((1.0 - tol) / tol) / arrays.beta
    # The slack absorbs rounding between this bound and the per-pair distances: keeping a pair is safe.
    reach = r_max + margin + 1e-4 * (1.0 + r_max)
    active = dist <= reach[None, :]
    flat = active.ravel()
    (idx,) = jnp.nonzero(flat, size=flat.shape[0], fill_value=0)
    idx = idx.astype(jnp.int32)
    return Pairs(idx // n_kb, idx % n_kb, jnp.sum(flat).astype(jnp.int32))


def _slice(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int) -> jnp.ndarray:
    return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis)


def _add(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int, upd: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.dynamic_update_slice_in_dim(x, _slice(x, block, size, axis) + upd, block * size, axis)


def _set(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int, upd: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.dynamic_update_slice_in_dim(x, upd, block * size, axis)


def _finite(m: jnp.ndarray) -> jnp.ndarray:
    """A max that is ``-inf`` (empty support) is replaced by 0: its exponentials are all 0 anyway."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk, with_post=True):
    """Logits plus log-CoC/padding bias ``[B, H, bq, bk]`` and the post factor of one block pair."""
    q_blk, k_blk = _slice(q, qb, bq, 1), _slice(k, kb, bk, 1)
    bias, post = pair_terms(
        st, arrays, slice_tokens(tq, qb * bq, bq), slice_tokens(tk, kb * bk, bk), with_post
    )
    s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk) * (q.shape[-1] ** -0.5) + bias
    return s, post, q_blk, k_blk


def _loop(pairs: Pairs, body, init):
    return jax.lax.fori_loop(0, pairs.count, lambda p, c: body(pairs.qb[p], pairs.kb[p], c), init)


def _forward(st, bq, bk, seq_axis, aux, q, k, v):
    """Returns ``(o [B, Nq, H, D], stats)``; stats = (max, normaliser) per key (column) or per query."""
    arrays, tq, tk, pairs = aux
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    if st.config.softmax_q:

        def stats_body(qb, kb, carry):
            m, z = carry
            s, _, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk, with_post=False)
            m_old, z_old = _slice(m, kb, bk, 2), _slice(z, kb, bk, 2)
            m_new = jnp.maximum(m_old, jnp.max(s, axis=2))
            ms = _finite(m_new)
            z_new = z_old * jnp.exp(m_old - ms) + jnp.sum(jnp.exp(s - ms[:, :, None, :]), axis=2)
            return _set(m, kb, bk, 2, m_new), _set(z, kb, bk, 2, z_new)

        init = (jnp.full((b, h, n_k), -jnp.inf, jnp.float32), jnp.zeros((b, h, n_k), jnp.float32))
        m, z = _loop(pairs, stats_body, init)
        if seq_axis is not None:  # queries are split over devices: reduce the column statistics
            m_all = jax.lax.pmax(m, seq_axis)
            z = jax.lax.psum(z * jnp.exp(m - _finite(m_all)), seq_axis)
            m = m_all
        m, z = _finite(m), jnp.where(z > 0, z, 1.0)

        def out_body(qb, kb, acc):
            s, post, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
            p = jnp.exp(s - _slice(m, kb, bk, 2)[:, :, None, :]) / _slice(z, kb, bk, 2)[:, :, None, :]
            w = p if post is None else p * post
            return _add(acc, qb, bq, 1, jnp.einsum("bhqk,bkhd->bqhd", w, _slice(v, kb, bk, 1)))

        o = _loop(pairs, out_body, jnp.zeros((b, n_q, h, d), jnp.float32))
        return o, (m, z)

    def row_body(qb, kb, carry):
        m, norm, acc = carry
        s, post, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
        m_old, l_old, acc_old = _slice(m, qb, bq, 2), _slice(norm, qb, bq, 2), _slice(acc, qb, bq, 1)
        m_new = jnp.maximum(m_old, jnp.max(s, axis=3))
        ms = _finite(m_new)
        alpha = jnp.exp(m_old - ms)  # rescales what was accumulated under the old max
        p = jnp.exp(s - ms[..., None])
        w = p if post is None else p * post
        acc_new = acc_old * jnp.transpose(alpha, (0, 2, 1))[..., None]
        acc_new = acc_new + jnp.einsum("bhqk,bkhd->bqhd", w, _slice(v, kb, bk, 1))
        l_new = l_old * alpha + jnp.sum(p, axis=3)
        return _set(m, qb, bq, 2, m_new), _set(norm, qb, bq, 2, l_new), _set(acc, qb, bq, 1, acc_new)

    init = (
        jnp.full((b, h, n_q), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, n_q), jnp.float32),
        jnp.zeros((b, n_q, h, d), jnp.float32),
    )
    m, norm, acc = _loop(pairs, row_body, init)
    m, norm = _finite(m), jnp.where(norm > 0, norm, 1.0)
    o = acc / jnp.transpose(norm, (0, 2, 1))[..., None]
    return o, (m, norm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _engine(st, bq, bk, seq_axis, aux, q, k, v):
    return _forward(st, bq, bk, seq_axis, aux, q, k, v)[0]


def _engine_fwd(st, bq, bk, seq_axis, aux, q, k, v):
    o, stats = _forward(st, bq, bk, seq_axis, aux, q, k, v)
    return o, (aux, q, k, v, o, stats)


def _zero_cotangent(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _engine_bwd(st, bq, bk, seq_axis, res, do):
    aux, q, k, v, o, (m, z) = res
    arrays, tq, tk, pairs = aux
    scale = q.shape[-1] ** -0.5
    col = st.config.softmax_q

    def weights(qb, kb):
        s, post, q_blk, k_blk = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
        if col:
            p = jnp.exp(s - _slice(m, kb, bk, 2)[:, :, None, :]) / _slice(z, kb, bk, 2)[:, :, None, :]
        else:
            p = jnp.exp(s - _slice(m, qb, bq, 2)[..., None]) / _slice(z, qb, bq, 2)[..., None]
        return p, post, q_blk, k_blk

    def grad_body(qb, kb, carry, d_stat):
        dq, dk, dv = carry
        p, post, q_blk, k_blk = weights(qb, kb)
        do_blk, v_blk = _slice(do, qb, bq, 1), _slice(v, kb, bk, 1)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk)
        if post is not None:
            dp = dp * post
        if col:
            ds = p * (dp - _slice(d_stat, kb, bk, 2)[:, :, None, :])
        else:
            ds = p * (dp - _slice(d_stat, qb, bq, 2)[..., None])
            w = p if post is None else p * post
            dv = _add(dv, kb, bk, 1, jnp.einsum("bhqk,bqhd->bkhd", w, do_blk))
        dq = _add(dq, qb, bq, 1, jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk) * scale)
        dk = _add(dk, kb, bk, 1, jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk) * scale)
        return dq, dk, dv

    zeros = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    if col:

        def dv_body(qb, kb, dv):
            p, post, _, _ = weights(qb, kb)
            w = p if post is None else p * post
            return _add(dv, kb, bk, 1, jnp.einsum("bhqk,bqhd->bkhd", w, _slice(do, qb, bq, 1)))

        dv = _loop(pairs, dv_body, zeros[2])
        # D_j needs every query's contribution to dv_j; the returned dv stays this device's share.
        dv_all = dv if seq_axis is None else jax.lax.psum(dv, seq_axis)
        d_stat = jnp.einsum("bkhd,bkhd->bhk", v, dv_all)
        dq, dk, _ = _loop(pairs, lambda qb, kb, c: grad_body(qb, kb, c, d_stat), zeros)
    else:
        d_stat = jnp.einsum("bqhd,bqhd->bhq", do, o)
        dq, dk, dv = _loop(pairs, lambda qb, kb, c: grad_body(qb, kb, c, d_stat), zeros)
    return jax.tree.map(_zero_cotangent, aux), dq, dk, dv


_engine.defvjp(_engine_fwd, _engine_bwd)


def blockwise_attention(
    st: Static,
    arrays: CallArrays,
    tq: Tokens,
    tk: Tokens,
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    seq_axis: str | None = None,
    sparse: bool = False,
) -> jnp.ndarray:
    """Blockwise (or sparse) PISA. ``q``: ``[B, nq, heads, D]``; ``k``, ``v``: ``[B, nk, heads, D]``;
    ``tq``, ``tk``: the matching token geometry. Returns ``[B, nq, heads, D]`` in ``q.dtype``.

    ``seq_axis``: inside ``shard_map`` with the queries split over that mesh axis (keys whole).
    """
    cfg = st.config
    n_q, n_k = q.shape[1], k.shape[1]
    bq, bk = min(cfg.block_q, n_q), min(cfg.block_k, n_k)
    nq_pad, nk_pad = -(-n_q // bq) * bq, -(-n_k // bk) * bk
    pad = lambda x, n: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    qp, kp, vp = pad(q, nq_pad), pad(k, nk_pad), pad(v, nk_pad)
    tq, tk = pad_tokens(tq, nq_pad), pad_tokens(tk, nk_pad)
    aux = jax.lax.stop_gradient((arrays, tq, tk))
    if sparse:
        pairs = sparse_pairs(st, *aux, bq, bk)
    else:
        pairs = all_pairs(nq_pad // bq, nk_pad // bk)
    o = _engine(st, bq, bk, seq_axis, (*aux, pairs), qp, kp, vp)
    return o[:, :n_q].astype(q.dtype)
