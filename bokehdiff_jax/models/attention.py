"""The per-layer attention switch: every attention layer of the U-Net calls ``attend``.

A layer is addressed by its diffusers module path (e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1``). ``AttentionRouting`` (static config)
says which paths use PISA; the per-call ``context`` carries PISA's inputs. With no context, or a
path that no pattern matches, attention is ordinary softmax attention.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

# SPEC section 2: the released model uses PISA in the self-attention of these transformer blocks.
SPEC_PISA_PATHS: tuple[str, ...] = ("down_blocks.1.attentions.0.transformer_blocks.*.attn1",)


@dataclasses.dataclass(frozen=True)
class AttentionRouting:
    """Which attention layers use PISA, as fnmatch patterns over diffusers module paths."""

    pisa_paths: tuple[str, ...] = SPEC_PISA_PATHS

    def uses_pisa(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.pisa_paths)


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
      context: per-call PISA inputs, or ``None`` for vanilla attention everywhere.

    Returns ``[batch, q_tokens, heads, head_dim]``.
    """
    del grid, routing, context  # used once PISA is routed here
    return jax.nn.dot_product_attention(q, k, v)
