"""What model modules carry besides their architecture: precision, LoRA placement, attention routing
and remat, each as one frozen, keyword-only value.

One precision convention: every module below the public models takes ``precision: Precision`` (never
loose ``dtype`` / ``param_dtype`` fields); ``UNet2DConditionModel`` and ``AutoencoderKL`` keep flax's
``dtype`` / ``param_dtype`` keywords as their public API and build one ``Precision`` from them. The
U-Net's blocks take ``options: BlockOptions`` (routing, LoRA, remat, precision), so no option can be
passed by position: swapping two would not compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bokehdiff_jax.models.attention import AttentionRouting

Dtype = Any

# SPEC section 3: the U-Net modules the released model trains with LoRA (peft ``target_modules``).
SPEC_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """Compute and parameter dtypes. ``dtype`` None: compute in the input's dtype."""

    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Where LoRA goes and how big it is. A target matches a path equal to it or ending in ``.target``
    (peft's rule for ``target_modules`` names)."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = SPEC_LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies_to(self, path: str) -> bool:
        return any(path == t or path.endswith("." + t) for t in self.targets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockOptions:
    """What every U-Net block passes down unchanged (static, hashable).

    routing: which self-attentions use PISA. lora: LoRA placement and size, or None. remat: recompute
    transformer blocks and ResNets in the backward pass. precision: compute and parameter dtypes.
    """

    routing: AttentionRouting = AttentionRouting()
    lora: LoRAConfig | None = None
    remat: bool = False
    precision: Precision = Precision()
