"""Blockwise and sparse PISA: never materialises N x N, forward or backward.

Tokens are cut into blocks of ``block_q`` queries and ``block_k`` keys (the sequence is padded to whole
blocks; padding is masked out of every sum). The work is a loop over *chunks* of ``G`` (query block, key
block) pairs computed together: ``G = 1`` (one pair per iteration) suits a CPU's caches; an accelerator
gets ``G`` up to ``PisaConfig.keys_per_step / block_k`` pairs, a device's worth of work per iteration
instead of thousands of 128 x 128 steps. On each pair the logits, CoC mask and visibility are computed on
the fly from the token geometry.

The pairs of a chunk form a *matching*: no two share a query block or a key block (they lie on one
diagonal ``kb - qb = const`` of the block grid). So per-query sums (outputs, row statistics, ``dq``) and
per-key sums (column statistics, ``dk``, ``dv``) are scattered to distinct indices: no work is wasted on
blocks a chunk does not need, and the results do not depend on the order of floating-point atomics on
any backend. Unused slots of a chunk point at one spare query block and one spare key block, all padding.

- softmaxQ (column normalisation): pass 1 accumulates each key's column max and normaliser over the
  query blocks (online, like flash attention but over queries); pass 2 accumulates the outputs with the
  final statistics.
- row normalisation (vanilla / CoC without softmaxQ): one online pass, as flash attention.
- backward (custom VJP, recomputing the blocks): with ``P`` the normalised weights, ``W = P * post``
  (``post`` = visibility x dropout) and ``dP_ij = post_ij dO_i . v_j``,
  column case ``dA_ij = P_ij (dP_ij - D_j)`` with ``D_j = sum_i P_ij dP_ij = v_j . dv_j``;
  row case ``dA_ij = P_ij (dP_ij - D_i)`` with ``D_i = dO_i . o_i``. Memory O(N * block * G).

``sparse`` keeps only the (query block, key block) pairs whose bounding boxes lie within the key block's
largest CoC radius plus the soft edge's margin (where the sigmoid is below ``sparse_tolerance``), packs
them into chunks, and runs ``count`` iterations (a ``while_loop`` with a traced trip count), so skipped
pairs cost nothing.
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
    """The loop's iterations: ``qb``, ``kb``: ``[C, G]`` int32 block indices of each chunk's pairs (a
    matching; unused slots hold the spare blocks ``n_qb`` and ``n_kb``), ``count``: how many chunks are
    real."""

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


def make_chunks(active: jnp.ndarray, g: int) -> Chunks:
    """Packs the ``True`` pairs of ``active [n_qb, n_kb]`` into chunks of at most ``g`` pairs, each chunk
    within one diagonal ``kb - qb = const`` (so a matching); a diagonal with ``a`` pairs takes
    ``ceil(a / g)`` chunks, an empty one none. ``g`` is clipped to ``min(n_qb, n_kb)``."""
    n_qb, n_kb = active.shape
    g = max(1, min(g, n_qb, n_kb))
    qb, kb = np.meshgrid(np.arange(n_qb), np.arange(n_kb), indexing="ij")
    diag = (kb - qb + n_qb - 1).ravel()  # [0, n_diag)
    order = np.lexsort((qb.ravel(), diag))  # static: pairs by diagonal, then query block
    n_diag = n_qb + n_kb - 1
    diag_s, qb_s, kb_s = diag[order], qb.ravel()[order], kb.ravel()[order]
    diag_len = np.bincount(diag_s, minlength=n_diag)
    first = np.concatenate([[0], np.cumsum(diag_len)[:-1]])  # index of each diagonal's first pair
    act = jnp.asarray(active).ravel()[order].astype(jnp.int32)
    csum = jnp.cumsum(act)
    before = jnp.where(first > 0, csum[np.maximum(first - 1, 0)], 0)  # active pairs in earlier diagonals
    a_d = jax.ops.segment_sum(act, diag_s, num_segments=n_diag)
    c_d = -(-a_d // g)
    chunk_start = jnp.cumsum(c_d) - c_d
    pos = csum - 1 - before[diag_s]  # rank of an active pair within its diagonal
    c_max = int(np.sum(-(-diag_len // g)))
    chunk = jnp.where(act > 0, chunk_start[diag_s] + pos // g, c_max)  # inactive: out of range, dropped
    slot = pos % g
    table_q = jnp.full((c_max, g), n_qb, jnp.int32).at[chunk, slot].set(qb_s.astype(np.int32), mode="drop")
    table_k = jnp.full((c_max, g), n_kb, jnp.int32).at[chunk, slot].set(kb_s.astype(np.int32), mode="drop")
    return Chunks(table_q, table_k, jnp.sum(c_d).astype(jnp.int32))


def _token_index(blocks: jnp.ndarray, size: int) -> jnp.ndarray:
    """Token indices ``[G * size]`` of the blocks ``[G]`` (block-major)."""
    return (blocks[:, None] * size + jnp.arange(size, dtype=jnp.int32)[None]).reshape(-1)


def _block_tokens(t: Tokens, idx: jnp.ndarray, g: int, size: int) -> Tokens:
    """``take_tokens(t, idx)`` with a leading block axis ``G`` on every field (for ``vmap``)."""
    x = take_tokens(t, idx)
    per_batch = lambda a: jnp.moveaxis(a.reshape(a.shape[0], g, size, *a.shape[2:]), 1, 0)
    return Tokens(
        x.xy.reshape(g, size, 2), per_batch(x.disp), per_batch(x.radius), per_batch(x.offsets),
        x.index.reshape(g, size),
    )  # fmt: skip


def _finite(m: jnp.ndarray) -> jnp.ndarray:
    """A max that is ``-inf`` (empty support) is replaced by 0: its exponentials are all 0 anyway."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _per_pair(x_bhn: jnp.ndarray, idx: jnp.ndarray, g: int) -> jnp.ndarray:
    """Per-token statistics ``[B, H, N]`` at ``idx [G * size]`` as ``[G, B, H, size]``."""
    b, h, _ = x_bhn.shape
    return jnp.moveaxis(jnp.take(x_bhn, idx, axis=2).reshape(b, h, g, -1), 2, 0)


def _flat(x_gbhn: jnp.ndarray) -> jnp.ndarray:
    """``[G, B, H, size] -> [B, H, G * size]`` (the layout of ``_token_index``)."""
    g, b, h, n = x_gbhn.shape
    return jnp.moveaxis(x_gbhn, 0, 2).reshape(b, h, g * n)


def _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk, with_post=True):
    """One chunk of ``G`` pairs: logits plus log-CoC/padding bias ``[G, B, H, bq, bk]``, the post factor
    (``[G, B, 1 or H, bq, bk]`` or None), the blocks ``q [B, G, bq, H, D]``, ``k [B, G, bk, H, D]`` and the
    token indices of the chunk's queries ``[G bq]`` and keys ``[G bk]``."""
    g = qb.shape[0]
    qidx, kidx = _token_index(qb, bq), _token_index(kb, bk)
    b, _, h, d = q.shape
    q_blk = jnp.take(q, qidx, axis=1).reshape(b, g, bq, h, d)
    k_blk = jnp.take(k, kidx, axis=1).reshape(b, g, bk, h, d)
    terms = lambda a, c: pair_terms(st, arrays, a, c, with_post)
    bias, post = jax.vmap(terms)(_block_tokens(tq, qidx, g, bq), _block_tokens(tk, kidx, g, bk))
    s = jnp.einsum("bgqhd,bgkhd->gbhqk", q_blk, k_blk) * (d**-0.5) + bias
    return s, post, q_blk, k_blk, qidx, kidx


def _values(v: jnp.ndarray, kidx: jnp.ndarray, g: int) -> jnp.ndarray:
    b, _, h, d = v.shape
    return jnp.take(v, kidx, axis=1).reshape(b, g, -1, h, d)


def _to_tokens(x_bgnhd: jnp.ndarray) -> jnp.ndarray:
    b, g, n, h, d = x_bgnhd.shape
    return x_bgnhd.reshape(b, g * n, h, d)


def _loop(chunks: Chunks, body, init):
    return jax.lax.fori_loop(0, chunks.count, lambda c, carry: body(chunks.qb[c], chunks.kb[c], carry), init)


def _forward(st, bq, bk, seq_axis, aux, q, k, v):
    """Returns ``(o [B, Nq, H, D], stats)``; stats = (max, normaliser) per key (column) or per query.
    ``q`` and ``k``, ``v`` (and their tokens) end with their spare blocks."""
    arrays, tq, tk, chunks = aux
    b, n_q, h, d = q.shape
    n_k = k.shape[1]
    g = chunks.qb.shape[1]
    if st.config.softmax_q:

        def stats_body(qb, kb, carry):
            m, z = carry
            s, _, _, _, _, kidx = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk, with_post=False)
            m_old, z_old = _per_pair(m, kidx, g), _per_pair(z, kidx, g)  # [G, B, H, bk]
            m_new = jnp.maximum(m_old, jnp.max(s, axis=3))
            ms = _finite(m_new)
            z_new = z_old * jnp.exp(m_old - ms) + jnp.sum(jnp.exp(s - ms[:, :, :, None, :]), axis=3)
            return m.at[:, :, kidx].set(_flat(m_new)), z.at[:, :, kidx].set(_flat(z_new))

        init = (jnp.full((b, h, n_k), -jnp.inf, jnp.float32), jnp.zeros((b, h, n_k), jnp.float32))
        m, z = _loop(chunks, stats_body, init)
        if seq_axis is not None:  # queries are split over devices: reduce the column statistics
            m_all = jax.lax.pmax(m, seq_axis)
            z = jax.lax.psum(z * jnp.exp(m - _finite(m_all)), seq_axis)
            m = m_all
        m, z = _finite(m), jnp.where(z > 0, z, 1.0)

        def out_body(qb, kb, acc):
            s, post, _, _, qidx, kidx = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
            p = jnp.exp(s - _per_pair(m, kidx, g)[:, :, :, None, :]) / _per_pair(z, kidx, g)[:, :, :, None, :]
            w = p if post is None else p * post
            o = jnp.einsum("gbhqk,bgkhd->bgqhd", w, _values(v, kidx, g))
            return acc.at[:, qidx].add(_to_tokens(o))

        o = _loop(chunks, out_body, jnp.zeros((b, n_q, h, d), jnp.float32))
        return o, (m, z)

    def row_body(qb, kb, carry):
        m, norm, acc = carry
        s, post, _, _, qidx, kidx = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
        m_old, l_old = _per_pair(m, qidx, g), _per_pair(norm, qidx, g)  # [G, B, H, bq]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=4))
        ms = _finite(m_new)
        alpha = jnp.exp(m_old - ms)  # rescales what was accumulated under the old max
        p = jnp.exp(s - ms[..., None])
        w = p if post is None else p * post
        acc_old = jnp.take(acc, qidx, axis=1).reshape(b, g, bq, h, d)
        acc_new = acc_old * jnp.transpose(alpha, (1, 0, 3, 2))[..., None]
        acc_new = acc_new + jnp.einsum("gbhqk,bgkhd->bgqhd", w, _values(v, kidx, g))
        l_new = l_old * alpha + jnp.sum(p, axis=4)
        return (
            m.at[:, :, qidx].set(_flat(m_new)),
            norm.at[:, :, qidx].set(_flat(l_new)),
            acc.at[:, qidx].set(_to_tokens(acc_new)),
        )

    init = (
        jnp.full((b, h, n_q), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, n_q), jnp.float32),
        jnp.zeros((b, n_q, h, d), jnp.float32),
    )
    m, norm, acc = _loop(chunks, row_body, init)
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
    b, _, h, d = q.shape
    g = chunks.qb.shape[1]
    scale = d**-0.5
    col = st.config.softmax_q

    def weights(qb, kb):
        s, post, q_blk, k_blk, qidx, kidx = _scores(st, arrays, tq, tk, q, k, qb, kb, bq, bk)
        if col:
            p = jnp.exp(s - _per_pair(m, kidx, g)[:, :, :, None, :]) / _per_pair(z, kidx, g)[:, :, :, None, :]
        else:
            p = jnp.exp(s - _per_pair(m, qidx, g)[..., None]) / _per_pair(z, qidx, g)[..., None]
        return p, post, q_blk, k_blk, qidx, kidx

    def grad_body(qb, kb, carry, d_stat):
        dq, dk, dv = carry
        p, post, q_blk, k_blk, qidx, kidx = weights(qb, kb)
        do_blk = jnp.take(do, qidx, axis=1).reshape(b, g, bq, h, d)
        dp = jnp.einsum("bgqhd,bgkhd->gbhqk", do_blk, _values(v, kidx, g))
        if post is not None:
            dp = dp * post
        if col:
            ds = p * (dp - _per_pair(d_stat, kidx, g)[:, :, :, None, :])
        else:
            ds = p * (dp - _per_pair(d_stat, qidx, g)[..., None])
            w = p if post is None else p * post
            dv = dv.at[:, kidx].add(_to_tokens(jnp.einsum("gbhqk,bgqhd->bgkhd", w, do_blk)))
        dq = dq.at[:, qidx].add(_to_tokens(jnp.einsum("gbhqk,bgkhd->bgqhd", ds, k_blk) * scale))
        dk = dk.at[:, kidx].add(_to_tokens(jnp.einsum("gbhqk,bgqhd->bgkhd", ds, q_blk) * scale))
        return dq, dk, dv

    zeros = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
    if col:

        def dv_body(qb, kb, dv):
            p, post, _, _, qidx, kidx = weights(qb, kb)
            w = p if post is None else p * post
            do_blk = jnp.take(do, qidx, axis=1).reshape(b, g, bq, h, d)
            return dv.at[:, kidx].add(_to_tokens(jnp.einsum("gbhqk,bgqhd->bgkhd", w, do_blk)))

        dv = _loop(chunks, dv_body, zeros[2])
        # D_j needs every query's contribution to dv_j; the returned dv stays this device's share.
        dv_all = dv if seq_axis is None else jax.lax.psum(dv, seq_axis)
        d_stat = jnp.einsum("bkhd,bkhd->bhk", v, dv_all)
        dq, dk, _ = _loop(chunks, lambda qb, kb, c: grad_body(qb, kb, c, d_stat), zeros)
    else:
        d_stat = jnp.einsum("bqhd,bqhd->bhq", do, o)
        dq, dk, dv = _loop(chunks, lambda qb, kb, c: grad_body(qb, kb, c, d_stat), zeros)
    return jax.tree.map(_zero_cotangent, aux), dq, dk, dv


_engine.defvjp(_engine_fwd, _engine_bwd)


def pairs_per_step(keys_per_step: int, bk: int) -> int:
    """``G``: block pairs per loop iteration, ``keys_per_step // bk``, at least one."""
    return max(1, keys_per_step // bk)


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
    ``keys_per_step``: keys (of ``keys_per_step // block_k`` block pairs) visited per loop iteration;
    None: ``PisaConfig.keys_per_step``, else one pair (``api.run_impl`` passes the resolved value).
    """
    cfg = st.config
    n_q, n_k = q.shape[1], k.shape[1]
    bq, bk = min(cfg.block_q, n_q), min(cfg.block_k, n_k)
    nq_pad, nk_pad = -(-n_q // bq) * bq, -(-n_k // bk) * bk
    n_qb, n_kb = nq_pad // bq, nk_pad // bk
    # One more block on each side, all padding: the spares that a chunk's unused slots point at.
    pad = lambda x, n: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    qp, kp, vp = pad(q, nq_pad + bq), pad(k, nk_pad + bk), pad(v, nk_pad + bk)
    tq, tk = pad_tokens(tq, nq_pad + bq), pad_tokens(tk, nk_pad + bk)
    aux = jax.lax.stop_gradient((arrays, tq, tk))
    if sparse:
        active = active_blocks(st, arrays, slice_tokens(tq, 0, nq_pad), slice_tokens(tk, 0, nk_pad), bq, bk)
    else:
        active = np.ones((n_qb, n_kb), bool)
    per_step = keys_per_step if keys_per_step is not None else (cfg.keys_per_step or bk)
    chunks = make_chunks(jax.lax.stop_gradient(active), pairs_per_step(per_step, bk))
    o = _engine(st, bq, bk, seq_axis, (*aux, chunks), qp, kp, vp)
    return o[:, :n_q].astype(q.dtype)
