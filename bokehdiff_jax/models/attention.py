"""The per-layer attention switch: every attention layer of the U-Net calls ``attend``.

A layer is addressed by its diffusers module path (e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1``). ``AttentionRouting`` (static config)
says which paths use PISA and with which ``PisaConfig``; the per-call ``context`` (a ``PisaInputs``)
carries PISA's inputs. With no context, or a path that no pattern matches, attention is ordinary
softmax attention.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from bokehdiff_jax.pisa.config import PisaConfig

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


def vanilla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention ``[B, Q, H, D] x [B, K, H, D] -> [B, Q, H, D]``.

    On GPU and TPU, ``jax.nn.dot_product_attention`` (it picks cuDNN's fused flash attention where it
    can). On CPU, where XLA has no fused kernel and that function runs 3.9x slower than the same maths
    normalised after the value product, ``layers.dot_product_attention`` (equal values and gradients,
    tests/models/test_layers.py). Chosen at trace time from the default backend.
    """
    if jax.default_backend() == "cpu":
        from bokehdiff_jax.models.layers import dot_product_attention

        return dot_product_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v)


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
    if context is None or not routing.uses_pisa(path):
        return vanilla_attention(q, k, v)
    if not isinstance(context, PisaInputs):
        from bokehdiff_jax.errors import InputError

        raise InputError(f"attention context for {path} is a {type(context).__name__}: expected PisaInputs")
    from bokehdiff_jax.pisa import pisa_attention

    return pisa_attention(
        q,
        k,
        v,
        grid=grid,
        disparity=context.disparity,
        focus=context.focus,
        strength=context.strength,
        config=routing.pisa,
        step=context.step,
        key=layer_key(context.key, path),
        train=context.train,
    )
