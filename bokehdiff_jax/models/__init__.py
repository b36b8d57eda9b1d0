"""The Flax SDXL U-Net and VAE (linen, channels-last), numerically diffusers' models.

- ``configs``: ``UNetConfig`` / ``VAEConfig`` frozen dataclasses, strictly from diffusers' config.json.
- ``options``: ``Precision``, ``LoRAConfig`` and ``BlockOptions``, what modules carry by keyword.
- ``layers``: LoRA-aware ``Dense`` / ``Conv`` (LoRA is the separate ``"lora"`` collection), ResNet
  block, samplers, timestep embedding.
- ``unet_blocks`` / ``unet``: ``UNet2DConditionModel``; every attention goes through
  ``attention.attend`` with its diffusers module path, where PISA can take over.
- ``vae``: ``AutoencoderKL`` with ``encode`` / ``decode``.

Param trees mirror diffusers' module names (``down_blocks_1/attentions_0/to_out_0/kernel`` for
``down_blocks.1.attentions.0.to_out.0.weight``); ``bokehdiff_jax.convert`` loads real weights.
"""

from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR, UNetConfig, VAEConfig
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS, BlockOptions, LoRAConfig, Precision
from bokehdiff_jax.models.unet import UNet2DConditionModel
from bokehdiff_jax.models.vae import AutoencoderKL

__all__ = [
    "SDXL_CONFIG_DIR",
    "SPEC_LORA_TARGETS",
    "AttentionRouting",
    "AutoencoderKL",
    "BlockOptions",
    "LoRAConfig",
    "Precision",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
