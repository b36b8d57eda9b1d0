"""Token geometry shared by every PISA implementation, and the per-(query, key) physical terms.

Conventions (issue 3, section 1): token ``(i, j)`` of an ``h x w`` grid has its centre at image pixel
``((j + 0.5) W / w, (i + 0.5) H / h)``; its disparity is the mean of the disparity over its pixels (exact
area resampling); its CoC radius is ``K |d_token - d_f|`` image pixels; visibility reads the disparity
map area-resampled to ``(3h, 3w)``. Every implementation computes the same ``pair_terms`` on whatever
(query, key) sub-blocks it visits, so dense, blockwise, sparse and sharded runs agree.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics.occlusion import visibility
from bokehdiff_jax.physics.optics import area_resize, coc_radius
from bokehdiff_jax.pisa.config import PisaConfig, training_hardness

# The released code reads visibility from the disparity map at 3x the token grid.
FINE_FACTOR = 3


class Tokens(NamedTuple):
    """Per-token geometry, for a (possibly padded or sharded) run of tokens.

    xy: ``[n, 2]`` centres ``(x, y)`` in image pixels. disp: ``[B, n]`` disparity. radius: ``[B, n]``
    CoC radius in distance units. offsets: ``[B, n, S, 2]`` super-sample offsets (pixels) of the token as a
    light source. index: ``[n]`` int32 global token index, ``-1`` for padding.
    """

    xy: jnp.ndarray
    disp: jnp.ndarray
    radius: jnp.ndarray
    offsets: jnp.ndarray
    index: jnp.ndarray


class CallArrays(NamedTuple):
    """Per-call arrays. fine: ``[B, 3h, 3w]`` disparity for ray look-ups. beta: ``[]`` hardness.
    seed: ``[]`` uint32 dropout seed. batch_index: ``[B]`` and head_index: ``[heads]`` int32 global indices
    (so dropout masks do not depend on how the batch or heads are sharded)."""

    fine: jnp.ndarray
    beta: jnp.ndarray
    seed: jnp.ndarray
    batch_index: jnp.ndarray
    head_index: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Static:
    """Static facts of a call (hashable)."""

    config: PisaConfig
    image_size: tuple[int, int]
    metric: tuple[float, float]  # distance units per image pixel along (x, y)
    hard_edge: bool
    train: bool


def stratified_offsets(supersample: int) -> np.ndarray:
    """Fixed ``[S, 2]`` offsets in token units within ``[-0.5, 0.5)^2`` (inference: no key needed).

    A rank-1 lattice: x stratified in ``S`` strata, y by the golden ratio; ``S = 1`` gives the centre.
    """
    s = np.arange(supersample) + 0.5
    x = s / supersample - 0.5
    y = np.mod(s * 0.6180339887498949, 1.0) - 0.5 if supersample > 1 else np.zeros(1)
    return np.stack([x, y], axis=-1).astype(np.float32)


def token_centres(grid: tuple[int, int], image_size: tuple[int, int]) -> jnp.ndarray:
    """``[h*w, 2]`` row-major token centres ``(x, y)`` in image pixels."""
    h, w = grid
    big_h, big_w = image_size
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    xy = np.stack([(jj + 0.5) * big_w / w, (ii + 0.5) * big_h / h], axis=-1).reshape(h * w, 2)
    return jnp.asarray(xy, jnp.float32)


def prepare(
    config: PisaConfig,
    grid: tuple[int, int],
    heads: int,
    disparity: jnp.ndarray,
    focus: jnp.ndarray,
    strength: jnp.ndarray,
    step,
    key,
    train: bool,
) -> tuple[Static, CallArrays, Tokens]:
    """Token geometry and per-call arrays. ``disparity``: ``[B, H, W]``; ``focus``, ``strength``: ``[B]``."""
    disparity = jax.lax.stop_gradient(jnp.asarray(disparity, jnp.float32))
    focus = jax.lax.stop_gradient(jnp.asarray(focus, jnp.float32))
    strength = jax.lax.stop_gradient(jnp.asarray(strength, jnp.float32))
    b, big_h, big_w = disparity.shape
    h, w = grid
    n = h * w
    d_tok = area_resize(disparity, (h, w)).reshape(b, n)
    radius = coc_radius(d_tok, focus, strength, spatial_dims=1)  # [B, N], image pixels
    if config.units == "pixels":
        metric = (1.0, 1.0)
    else:
        metric = (config.released_scale / big_w, config.released_scale / big_h)
        radius = radius * (config.released_upsample / 10.0)
    fine = area_resize(disparity, (FINE_FACTOR * h, FINE_FACTOR * w))

    jitter_key = drop_key = None
    if train and (config.occlusion or config.dropout > 0):
        if key is None:
            raise InputError("pisa_attention(train=True) with occlusion or dropout needs a jax.random key")
        jitter_key, drop_key = jax.random.split(key)
    token_size = jnp.asarray([big_w / w, big_h / h], jnp.float32)
    s = config.supersample
    if jitter_key is not None and config.occlusion:
        # Training: uniform jitter of the source within one token (released code), from the explicit key.
        unit = jax.random.uniform(jitter_key, (b, n, s, 2), jnp.float32, -0.5, 0.5)
    else:
        unit = jnp.broadcast_to(jnp.asarray(stratified_offsets(s)), (b, n, s, 2))
    offsets = unit * token_size
    if drop_key is not None and config.dropout > 0:
        seed = jax.random.bits(drop_key, (), jnp.uint32)
    else:
        seed = jnp.zeros((), jnp.uint32)

    if step is None:
        beta = jnp.asarray(min(config.hardness, 3.0e38), jnp.float32)
        hard = config.hard_edge
    else:
        beta = training_hardness(step)
        hard = False
    static = Static(config, (big_h, big_w), metric, hard, bool(train))
    arrays = CallArrays(fine, beta, seed, jnp.arange(b, dtype=jnp.int32), jnp.arange(heads, dtype=jnp.int32))
    tokens = Tokens(
        token_centres(grid, (big_h, big_w)), d_tok, radius, offsets, jnp.arange(n, dtype=jnp.int32)
    )
    return static, arrays, tokens


def pad_tokens(t: Tokens, n_pad: int) -> Tokens:
    """Pads a run of tokens to ``n_pad`` with invalid entries (index -1, masked out of every sum)."""
    extra = n_pad - t.xy.shape[0]
    if extra == 0:
        return t
    return Tokens(
        jnp.pad(t.xy, ((0, extra), (0, 0))),
        jnp.pad(t.disp, ((0, 0), (0, extra))),
        jnp.pad(t.radius, ((0, 0), (0, extra))),
        jnp.pad(t.offsets, ((0, 0), (0, extra), (0, 0), (0, 0))),
        jnp.pad(t.index, (0, extra), constant_values=-1),
    )


def slice_tokens(t: Tokens, start, size: int) -> Tokens:
    """Tokens ``[start, start + size)`` (``start`` may be traced)."""
    ds = jax.lax.dynamic_slice_in_dim
    return Tokens(
        ds(t.xy, start, size, 0),
        ds(t.disp, start, size, 1),
        ds(t.radius, start, size, 1),
        ds(t.offsets, start, size, 1),
        ds(t.index, start, size, 0),
    )


def take_tokens(t: Tokens, idx: jnp.ndarray) -> Tokens:
    """Tokens at the (traced) indices ``idx [m]``, in that order."""
    return Tokens(
        jnp.take(t.xy, idx, axis=0),
        jnp.take(t.disp, idx, axis=1),
        jnp.take(t.radius, idx, axis=1),
        jnp.take(t.offsets, idx, axis=1),
        jnp.take(t.index, idx, axis=0),
    )


def _mix32(x: jnp.ndarray) -> jnp.ndarray:
    """A uint32 avalanche finaliser (xor-shift / multiply): a counter-based hash for dropout masks."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_keep(arrays: CallArrays, rate: float, iq: jnp.ndarray, ik: jnp.ndarray) -> jnp.ndarray:
    """``[B, heads, nq, nk]`` keep mask, a pure function of (seed, global batch, head, query, key)
    indices: any blocking or sharding of the same call draws the same mask."""
    u32 = lambda a: a.astype(jnp.uint32)
    x = _mix32(arrays.seed ^ _mix32(u32(arrays.batch_index) + jnp.uint32(0x9E3779B9)))[:, None, None, None]
    x = _mix32(x ^ u32(arrays.head_index)[None, :, None, None] * jnp.uint32(0x27D4EB2F))
    x = _mix32(x ^ u32(iq)[None, None, :, None] * jnp.uint32(0x165667B1))
    x = _mix32(x ^ u32(ik)[None, None, None, :])
    threshold = jnp.uint32(min(int(rate * 2.0**32), 2**32 - 1))
    return x >= threshold


def pair_terms(
    st: Static, arrays: CallArrays, tq: Tokens, tk: Tokens, with_post: bool = True
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The physical factors of every (query, key) pair of two token runs.

    Returns ``bias [B, 1, nq, nk]``, added to the logits: ``log C_ij`` (``-inf`` outside a hard edge) and
    ``-inf`` for padding; and ``post [B, 1 or heads, nq, nk]`` multiplied after normalisation (visibility,
    training clamp, dropout), or ``None`` when that factor is 1.
    """
    cfg = st.config
    valid = (tq.index >= 0)[:, None] & (tk.index >= 0)[None, :]
    bias = jnp.where(valid, 0.0, -jnp.inf)[None, None]
    if cfg.coc:
        dx = (tq.xy[:, None, 0] - tk.xy[None, :, 0]) * st.metric[0]
        dy = (tq.xy[:, None, 1] - tk.xy[None, :, 1]) * st.metric[1]
        dist = jnp.sqrt(dx * dx + dy * dy)[None]  # [1, nq, nk]
        r = tk.radius[:, None, :]  # [B, 1, nk]
        if st.hard_edge:
            # SPEC 2: ||P_i - P_j|| <= r_j, so an in-focus key (r_j = 0) still reaches its own query.
            log_c = jnp.where(dist <= r, 0.0, -jnp.inf)
        else:
            log_c = jax.nn.log_sigmoid(arrays.beta * (r - dist))
        bias = bias + log_c[:, None]
    post = None
    if not with_post:
        return bias, post
    if cfg.occlusion:
        vis_fn = lambda fine, dk, off, dq: visibility(
            fine, st.image_size, tq.xy, tk.xy, dk, off, cfg.segments, dq if cfg.t_from_query else None
        )
        post = jax.vmap(vis_fn)(arrays.fine, tk.disp, tk.offsets, tq.disp)[:, None]
        if st.train and cfg.train_occlusion_clamp is not None:
            post = jnp.maximum(post, 1.0 - cfg.train_occlusion_clamp)
    if st.train and cfg.dropout > 0:
        keep = dropout_keep(arrays, cfg.dropout, tq.index, tk.index).astype(jnp.float32) / (1.0 - cfg.dropout)
        post = keep if post is None else post * keep
    return bias, post
