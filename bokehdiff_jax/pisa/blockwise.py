"""Blockwise and sparse PISA: never materialises N x N, forward or backward.

Tokens are cut into blocks of ``block_q`` queries and ``block_k`` keys (the sequence is padded to whole
blocks; padding is masked out of every sum). The work is a loop over *chunks*: one query block against
``R`` key blocks at once (a whole row of key blocks, or up to ``PisaConfig.keys_per_step`` keys), so each
iteration is a device's worth of work on an accelerator (``R = 1``, one block pair per iteration, suits a
CPU's caches). On each chunk the logits, CoC mask and visibility are computed on the fly from the token
geometry.

- softmaxQ (column normalisation): pass 1 accumulates each key's column max and normaliser over the
  query blocks (online, like flash attention but over queries); pass 2 accumulates the outputs with the
  final statistics.
- row normalisation (vanilla / CoC without softmaxQ): one online pass, as flash attention.
- backward (custom VJP, recomputing the blocks): with ``P`` the normalised weights, ``W = P * post``
  (``post`` = visibility x dropout) and ``dP_ij = post_ij dO_i . v_j``,
  column case ``dA_ij = P_ij (dP_ij - D_j)`` with ``D_j = sum_i P_ij dP_ij = v_j . dv_j``;
  row case ``dA_ij = P_ij (dP_ij - D_i)`` with ``D_i = dO_i . o_i``. Memory O(N * block * R).

A chunk's key blocks are distinct, and its query block is one: per-query sums are written to one slice,
per-key sums are scattered to distinct indices (unused slots go to a spare block that is never read),
so results do not depend on the order of floating-point atomics on any backend.

``sparse`` keeps, per query block, only the key blocks whose bounding boxes lie within the key block's
largest CoC radius plus the soft edge's margin (where the sigmoid is below ``sparse_tolerance``), packs
them into chunks of ``R``, and runs ``count`` iterations (a ``while_loop`` with a traced trip count), so
skipped blocks cost nothing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.pisa.geometry import (
    CallArrays,
    Static,
    Tokens,
    pad_tokens,
    pair_terms,
    slice_tokens,
    take_tokens,
)


class Pairs(NamedTuple):
    """Block pairs to visit: ``qb``, ``kb``: ``[P]`` int32 block indices; ``count``: how many are real."""

    qb: jnp.ndarray
    kb: jnp.ndarray
    count: jnp.ndarray


class Chunks(NamedTuple):
    """The loop's iterations: ``qb [C]`` the query block of each, ``kb [C, R]`` its key blocks (distinct;
    unused slots hold the spare block index ``n_kb``), ``count`` how many iterations are real."""

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


def active_blocks(st: Static, arrays: CallArrays, tq: Tokens, tk: Tokens, bq: int, bk: int) -> jnp.ndarray:
    """``[n_qb, n_kb]`` bool: the (query block, key block) pairs the CoC can reach; the rest have
    ``C < sparse_tolerance`` on every pair of tokens.

    A pair is kept if the distance between the blocks' bounding boxes is at most the key block's largest
    radius (over the batch) plus the margin ``log((1 - tol) / tol) / beta`` where the sigmoid falls to
    ``tol``. Without the CoC (or with a zero tolerance and a soft edge) every pair is kept.
    """
    cfg = st.config
    n_qb, n_kb = tq.xy.shape[0] // bq, tk.xy.shape[0] // bk
    tol = cfg.sparse_tolerance
    if not cfg.coc or (not st.hard_edge and tol == 0.0):
        return jnp.ones((n_qb, n_kb), bool)
    q_lo, q_hi = _block_boxes(st, tq, n_qb, bq)
    k_lo, k_hi = _block_boxes(st, tk, n_kb, bk)
    gap = jnp.maximum(0.0, jnp.maximum(k_lo[None] - q_hi[:, None], q_lo[:, None] - k_hi[None]))
    dist = jnp.sqrt(jnp.sum(gap * gap, axis=-1))  # [n_qb, n_kb], a lower bound on every pair's distance
    k_valid = (tk.index >= 0)[None, :]
    r_max = jnp.max(jnp.where(k_valid, tk.radius, 0.0).reshape(-1, n_kb, bk), axis=(0, 2))  # [n_kb]
    margin = 0.0 if st.hard_edge else math.log((1.0 - tol) / tol) / arrays.beta
    # The slack absorbs rounding between this bound and the per-pair distances: keeping a pair is safe.
    reach = r_max + margin + 1e-4 * (1.0 + r_max)
    return dist <= reach[None, :]


def sparse_pairs(st: Static, arrays: CallArrays, tq: Tokens, tk: Tokens, bq: int, bk: int) -> Pairs:
    """The pairs of ``active_blocks`` as a list (row-major; ``count`` real entries, the rest ``(0, 0)``)."""
    flat = active_blocks(st, arrays, tq, tk, bq, bk)
    n_kb = flat.shape[1]
    flat = flat.ravel()
    (idx,) = jnp.nonzero(flat, size=flat.shape[0], fill_value=0)
    idx = idx.astype(jnp.int32)
    return Pairs(idx // n_kb, idx % n_kb, jnp.sum(flat).astype(jnp.int32))


def make_chunks(active: jnp.ndarray, r: int) -> Chunks:
    """Packs each query block's active key blocks (in key order) into chunks of ``r``; a row with ``a``
    active blocks takes ``ceil(a / r)`` chunks, a row with none takes none. ``active``: ``[n_qb, n_kb]``."""
    n_qb, n_kb = active.shape
    per_row = -(-n_kb // r)
    width = per_row * r
    a = jnp.sum(active, axis=1).astype(jnp.int32)  # active key blocks per row
    order = jnp.argsort((~active).astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
    order = jnp.pad(order, ((0, 0), (0, width - n_kb)))
    cols = jnp.arange(width, dtype=jnp.int32)
    table = jnp.where(cols[None] < a[:, None], order, n_kb)  # [n_qb, width]; n_kb: the spare block
    c = -(-a // r)
    ends = jnp.cumsum(c)
    starts = ends - c
    j = jnp.arange(n_qb * per_row, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(ends, j, side="right"), n_qb - 1).astype(jnp.int32)
    slot = jnp.clip(j - starts[row], 0, per_row - 1)
    kb = table[row[:, None], slot[:, None] * r + jnp.arange(r, dtype=jnp.int32)[None]]
    return Chunks(row, kb, ends[-1].astype(jnp.int32))


def _slice(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int) -> jnp.ndarray:
    return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis)


def _add(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int, upd: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.dynamic_update_slice_in_dim(x, _slice(x, block, size, axis) + upd, block * size, axis)


def _set(x: jnp.ndarray, block: jnp.ndarray, size: int, axis: int, upd: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.dynamic_update_slice_in_dim(x, upd, block * size, axis)


def _key_index(kb: jnp.ndarray, bk: int) -> jnp.ndarray:
    """Token indices ``[R * bk]`` of the key blocks ``kb [R]``."""
    return (kb[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None]).reshape(-1)


def _finite(m: jnp.ndarray) -> jnp.ndarray:
    """A max that is ``-inf`` (empty support) is replaced by 0: its exponentials are all 0 anyway."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _scores(st, arrays, tq, tk, q, k, qb, kidx, bq, with_post=True):
    """Logits plus log-CoC/padding bias ``[B, H, bq, R bk]`` and the post factor of one chunk."""
    q_blk, k_sel = _slice(q, qb, bq, 1), jnp.take(k, kidx, axis=1)
    bias, post = pair_terms(st, arrays, slice_tokens(tq, qb * bq, bq), take_tokens(tk, kidx), with_post)
    s = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_sel) * (q.shape[-1] ** -0.5) + bias
    return s, post, q_blk, k_sel


def _loop(chunks: Chunks, bk: int, body, init):
    def step(c, carry):
        return body(chunks.qb[c], _key_index(chunks.kb[c], bk), carry)

    return jax.lax.fori_loop(0, chunks.count, step, init)


def _forward(st, bq, bk, seq_axis, aux, q, k, v):
    """Returns ``(o [B, Nq, H, D], stats)``; stats = (max, normaliser) per key (column) or per query.
    ``k``, ``v`` and the key tokens end with the spare block."""
    arrays, tq, tk, chunks = aux
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    if st.config.softmax_q:

        def stats_body(qb, kidx, carry):
            m, z = carry
            s, _, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kidx, bq, with_post=False)
            m_old, z_old = jnp.take(m, kidx, axis=2), jnp.take(z, kidx, axis=2)
            m_new = jnp.maximum(m_old, jnp.max(s, axis=2))
            ms = _finite(m_new)
            z_new = z_old * jnp.exp(m_old - ms) + jnp.sum(jnp.exp(s - ms[:, :, None, :]), axis=2)
            return m.at[:, :, kidx].set(m_new), z.at[:, :, kidx].set(z_new)

        init = (jnp.full((b, h, n_k), -jnp.inf, jnp.float32), jnp.zeros((b, h, n_k), jnp.float32))
        m, z = _loop(chunks, bk, stats_body, init)
        if seq_axis is not None:  # queries are split over devices: reduce the column statistics
            m_all = jax.lax.pmax(m, seq_axis)
            z = jax.lax.psum(z * jnp.exp(m - _finite(m_all)), seq_axis)
            m = m_all
        m, z = _finite(m), jnp.where(z > 0, z, 1.0)

        def out_body(qb, kidx, acc):
            s, post, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kidx, bq)
            p = (
                jnp.exp(s - jnp.take(m, kidx, axis=2)[:, :, None, :])
                / jnp.take(z, kidx, axis=2)[:, :, None, :]
            )
            w = p if post is None else p * post
            return _add(acc, qb, bq, 1, jnp.einsum("bhqk,bkhd->bqhd", w, jnp.take(v, kidx, axis=1)))

        o = _loop(chunks, bk, out_body, jnp.zeros((b, n_q, h, d), jnp.float32))
        return o, (m, z)

    def row_body(qb, kidx, carry):
        m, norm, acc = carry
        s, post, _, _ = _scores(st, arrays, tq, tk, q, k, qb, kidx, bq)
        m_old, l_old, acc_old = _slice(m, qb, bq, 2), _slice(norm, qb, bq, 2), _slice(acc, qb, bq, 1)
        m_new = jnp.maximum(m_old, jnp.max(s, axis=3))
        ms = _finite(m_new)
        alpha = jnp.exp(m_old - ms)  # rescales what was accumulated under the old max
        p = jnp.exp(s - ms[..., None])
        w = p if post is None else p * post
        acc_new = acc_old * jnp.transpose(alpha, (0, 2, 1))[..., None]
        acc_new = acc_new + jnp.einsum("bhqk,bkhd->bqhd", w, jnp.take(v, kidx, axis=1))
        l_new = l_old * alpha + jnp.sum(p, axis=3)
        return _set(m, qb, bq, 2, m_new), _set(norm, qb, bq, 2, l_new), _set(acc, qb, bq, 1, acc_new)

    init = (
        jnp.full((b, h, n_q), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, n_q), jnp.float32),
        jnp.zeros((b, n_q, h, d), jnp.float32),
    )
    m, norm, acc = _loop(chunks, bk, row_body, init)
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
    arrays, tq, tk, chunks = aux
    scale = q.shape[-1] ** -0.5
    col = st.config.softmax_q

    def weights(qb, kidx):
        s, post, q_blk, k_sel = _scores(st, arrays, tq, tk, q, k, qb, kidx, bq)
        if col:
            p = (
                jnp.exp(s - jnp.take(m, kidx, axis=2)[:, :, None, :])
                / jnp.take(z, kidx, axis=2)[:, :, None, :]
            )
        else:
            p = jnp.exp(s - _slice(m, qb, bq, 2)[..., None]) / _slice(z, qb, bq, 2)[..., None]
        return p, post, q_blk, k_sel

    def grad_body(qb, kidx, carry, d_stat):
        dq, dk, dv = carry
        p, post, q_blk, k_sel = weights(qb, kidx)
        do_blk, v_sel = _slice(do, qb, bq, 1), jnp.take(v, kidx, axis=1)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_sel)
        if post is not None:
            dp = dp * post
        if col:
            ds = p * (dp - jnp.take(d_stat, kidx, axis=2)[:, :, None, :])
        else:
            ds = p * (dp - _slice(d_stat, qb, bq, 2)[..., None])
            w = p if post is None else p * post
            dv = dv.at[:, kidx].add(jnp.einsum("bhqk,bqhd->bkhd", w, do_blk))
        dq = _add(dq, qb, bq, 1, jnp.einsum("bhqk,bkhd->bqhd", ds, k_sel) * scale)
        dk = dk.at[:, kidx].add(jnp.einsum("bhqk,bqhd->bkhd", ds, q_blk) * scale)
        return dq, dk, dv

    zeros = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    if col:

        def dv_body(qb, kidx, dv):
            p, post, _, _ = weights(qb, kidx)
            w = p if post is None else p * post
            return dv.at[:, kidx].add(jnp.einsum("bhqk,bqhd->bkhd", w, _slice(do, qb, bq, 1)))

        dv = _loop(chunks, bk, dv_body, zeros[2])
        # D_j needs every query's contribution to dv_j; the returned dv stays this device's share.
        dv_all = dv if seq_axis is None else jax.lax.psum(dv, seq_axis)
        d_stat = jnp.einsum("bkhd,bkhd->bhk", v, dv_all)
        dq, dk, _ = _loop(chunks, bk, lambda qb, kidx, c: grad_body(qb, kidx, c, d_stat), zeros)
    else:
        d_stat = jnp.einsum("bqhd,bqhd->bhq", do, o)
        dq, dk, dv = _loop(chunks, bk, lambda qb, kidx, c: grad_body(qb, kidx, c, d_stat), zeros)
    return jax.tree.map(_zero_cotangent, aux), dq, dk, dv


_engine.defvjp(_engine_fwd, _engine_bwd)


def key_blocks_per_step(keys_per_step: int, bk: int, n_kb: int) -> int:
    """``R``: key blocks per loop iteration, ``keys_per_step // bk`` within ``[1, n_kb]``."""
    return max(1, min(n_kb, keys_per_step // bk))


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
    keys_per_step: int | None = None,
) -> jnp.ndarray:
    """Blockwise (or sparse) PISA. ``q``: ``[B, nq, heads, D]``; ``k``, ``v``: ``[B, nk, heads, D]``;
    ``tq``, ``tk``: the matching token geometry. Returns ``[B, nq, heads, D]`` in ``q.dtype``.

    ``seq_axis``: inside ``shard_map`` with the queries split over that mesh axis (keys whole).
    ``keys_per_step``: keys visited per loop iteration (rounded down to whole key blocks, at least one);
    None: ``PisaConfig.keys_per_step``, else one key block (``api.run_impl`` passes the resolved value).
    """
    cfg = st.config
    n_q, n_k = q.shape[1], k.shape[1]
    bq, bk = min(cfg.block_q, n_q), min(cfg.block_k, n_k)
    nq_pad, nk_pad = -(-n_q // bq) * bq, -(-n_k // bk) * bk
    n_kb = nk_pad // bk
    # Keys get one more block, all padding: the spare that a chunk's unused slots point at.
    pad = lambda x, n: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    qp, kp, vp = pad(q, nq_pad), pad(k, nk_pad + bk), pad(v, nk_pad + bk)
    tq, tk = pad_tokens(tq, nq_pad), pad_tokens(tk, nk_pad + bk)
    aux = jax.lax.stop_gradient((arrays, tq, tk))
    real_tk = slice_tokens(tk, 0, nk_pad)
    if sparse:
        active = active_blocks(st, arrays, tq, real_tk, bq, bk)
    else:
        active = jnp.ones((nq_pad // bq, n_kb), bool)
    per_step = keys_per_step if keys_per_step is not None else (cfg.keys_per_step or bk)
    chunks = make_chunks(jax.lax.stop_gradient(active), key_blocks_per_step(per_step, bk, n_kb))
    o = _engine(st, bq, bk, seq_axis, (*aux, chunks), qp, kp, vp)
    return o[:, :n_q].astype(q.dtype)
