"""The per-layer attention switch: every attention layer of the U-Net calls ``attend``.

A layer is addressed by its diffusers module path (e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1``). ``AttentionRouting`` (static config)
says which paths use PISA and with which ``PisaConfig``; the per-call ``context`` (a ``PisaInputs``)
carries PISA's inputs. With no context, or a path that no pattern matches, attention is ordinary
softmax attention.

Under an active mesh (``jax.set_mesh``, axes from ``bokehdiff_jax.sharding``), a routed layer runs
``pisa_attention_sharded``, splitting the batch (or, when the batch does not divide, the query tokens)
over the mesh's batch axes; the mesh is read where ``attend`` is traced, never stored in a module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import bokehdiff_jax.pisa as pisa
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.pisa.config import PisaConfig
from bokehdiff_jax.sharding import BATCH_AXES, ambient_axes, constrain

# SPEC section 2: the released model uses PISA in the self-attention of these transformer blocks.
SPEC_PISA_PATHS: tuple[str, ...] = ("down_blocks.1.attentions.0.transformer_blocks.*.attn1",)


@dataclasses.dataclass(frozen=True)
class AttentionRouting:
    """Which attention layers use PISA (fnmatch patterns over diffusers module paths) and how."""

    pisa_paths: tuple[str, ...] = SPEC_PISA_PATHS
    pisa: PisaConfig = PisaConfig()

    def uses_pisa(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.pisa_paths)


@struct.dataclass
class PisaInputs:
    """Per-call PISA inputs, passed unchanged through the U-Net to every ``attend`` call (a pytree).

    disparity: ``[B, H, W]`` in [0, 1] at input-image resolution (1 nearest). focus: ``[B]`` focus
    disparity. strength: ``[B]`` CoC radius in input-image pixels per unit disparity. step: training
    step for the hardness schedule, or ``None`` (inference hardness). key: ``jax.random`` key for the
    training jitter and dropout, or ``None``; each routed layer uses ``fold_in(key, crc32(path))``, so the
    same key gives the same output. train: static training flag.
    """

    disparity: jax.Array
    focus: jax.Array
    strength: jax.Array
    step: jax.Array | None = None
    key: jax.Array | None = None
    train: bool = struct.field(pytree_node=False, default=False)


def layer_key(key: jax.Array | None, path: str) -> jax.Array | None:
    """The jitter/dropout key of the layer at ``path``: deterministic, distinct per path."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def dot_product_attention(q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array) -> jax.Array:
    """Softmax attention, ``[B, Q, H, D] x [B, K, H, D] -> [B, Q, H, D]``, same values as
    ``jax.nn.dot_product_attention`` (scale ``1/sqrt(D)``, fp32 logits and softmax).

    Normalises after the value product (a ``[B, H, Q, D]`` division instead of a ``[B, H, Q, K]``
    one) and skips ``jax.nn.softmax``'s custom derivative: 3.9x faster on CPU than
    ``jax.nn.dot_product_attention`` at 1024 tokens, 2 heads of 64 (XLA picks no fused kernel there).
    Used by ``vanilla_attention`` on CPU.
    """
    dtype = q_bqhd.dtype
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q_bqhd, k_bkhd, v_bkhd))  # [B, H, T, D]
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    o = jnp.einsum("bhqk,bhkd->bhqd", p, v.astype(jnp.float32)) / p.sum(-1, keepdims=True)
    return jnp.swapaxes(o, 1, 2).astype(dtype)


# Vanilla attention holding more than this many [B, H, Q, K] logits at once runs in query chunks (exact:
# the softmax is per query), so high resolutions stay in memory: SDXL at 2048 px has 16384-token
# self-attentions with 10 heads, 10.7 GB of fp32 logits in one piece; 2**28 elements are 1 GiB.
VANILLA_CHUNK_ELEMENTS = 2**28


def _attention_whole(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    if jax.default_backend() == "cpu":
        return dot_product_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


def vanilla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention ``[B, Q, H, D] x [B, K, H, D] -> [B, Q, H, D]``.

    On GPU and TPU, ``jax.nn.dot_product_attention`` (its XLA implementation, which XLA fuses). On CPU,
    where that function runs 3.9x slower than the same maths normalised after the value product,
    ``dot_product_attention`` (equal values and gradients, tests/models/test_layers.py). Chosen at trace
    time from the default backend. Above ``VANILLA_CHUNK_ELEMENTS`` logits the queries go in chunks
    (``lax.map``: one chunk's logits live at a time).
    """
    b, n_q, h, d = q.shape
    per_query = b * h * k.shape[1]
    if n_q * per_query <= VANILLA_CHUNK_ELEMENTS:
        return _attention_whole(q, k, v)
    chunk = max(1, VANILLA_CHUNK_ELEMENTS // per_query)
    n_chunks = -(-n_q // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - n_q), (0, 0), (0, 0)))
    qc = jnp.moveaxis(qp.reshape(b, n_chunks, chunk, h, d), 1, 0)
    out = jax.lax.map(lambda qq: _attention_whole(qq, k, v), qc)
    return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * chunk, h, d)[:, :n_q]


def attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    path: str,
    grid: tuple[int, int],
    routing: AttentionRouting,
    context: Any = None,
) -> jnp.ndarray:
    """Attention for the layer at ``path``.

    Args:
      q: ``[batch, q_tokens, heads, head_dim]``; for self-attention ``q_tokens = h * w``, row-major.
      k, v: ``[batch, kv_tokens, heads, head_dim]``.
      path: the layer's diffusers module path.
      grid: ``(h, w)``, the layer's token grid (the latent resolution at this level).
      routing: static placement of PISA.
      context: per-call ``PisaInputs``, or ``None`` for vanilla attention everywhere.

    Returns ``[batch, q_tokens, heads, head_dim]``.
    """
    # Under a mesh: activations split over the batch axes (a no-op without a mesh).
    q, k, v = (constrain(t, "batch", "tokens", "heads", None) for t in (q, k, v))
    if context is None or not routing.uses_pisa(path):
        return constrain(vanilla_attention(q, k, v), "batch", "tokens", "heads", None)
    if not isinstance(context, PisaInputs):
        raise InputError(f"attention context for {path} is a {type(context).__name__}: expected PisaInputs")
    kw = dict(
        grid=grid,
        disparity=context.disparity,
        focus=context.focus,
        strength=context.strength,
        config=routing.pisa,
        step=context.step,
        key=layer_key(context.key, path),
        train=context.train,
    )
    mesh, axes = ambient_axes(BATCH_AXES)
    split = pisa_split(q.shape[0], q.shape[1], {a: mesh.shape[a] for a in axes})
    if split is None:
        return pisa.pisa_attention(q, k, v, **kw)
    batch_axis, seq_axis = split
    return pisa.pisa_attention_sharded(q, k, v, mesh=mesh, batch_axis=batch_axis, seq_axis=seq_axis, **kw)


def pisa_split(
    batch: int, tokens: int, axes: dict[str, int]
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None] | None:
    """How sharded PISA splits ``[batch, tokens, ...]`` over the mesh ``axes`` (name -> size, in mesh
    order): ``(batch_axes, seq_axes)``, each a tuple of axis names or None; None: do not shard.

    The batch takes the longest leading run of axes whose size divides it, the query tokens the rest
    (they must divide too): batch parallelism needs no communication, query parallelism gathers keys.
    """
    if not axes:
        return None
    names = tuple(axes)
    for cut in range(len(names), -1, -1):
        b_axes, s_axes = names[:cut], names[cut:]
        if (
            batch % math.prod(axes[a] for a in b_axes) == 0
            and tokens % math.prod(axes[a] for a in s_axes) == 0
        ):
            return (b_axes or None), (s_axes or None)
    return None
