"""The SDXL U-Net (diffusers ``UNet2DConditionModel``) in Flax linen, channels-last.

The param tree keeps diffusers' module names (``down_blocks.1.attentions.0.proj_in``), so weight
conversion is a table and PISA / LoRA placements are addressed by the paths users know. Every
attention layer goes through ``models.attention.attend``; ``routing`` (static) picks which use PISA
and ``attention_context`` (per call) carries PISA's inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.configs import UNetConfig
from bokehdiff_jax.models.layers import Conv, Dense, GroupNorm, ModelRoot, timestep_embedding
from bokehdiff_jax.models.options import BlockOptions, Dtype, LoRAConfig, Precision
from bokehdiff_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock


class TimestepEmbedding(nn.Module):
    """``linear_1``, SiLU, ``linear_2``."""

    features: int
    _: dataclasses.KW_ONLY
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(Dense(self.features, precision=self.precision, name="linear_1")(x))
        return Dense(self.features, precision=self.precision, name="linear_2")(x)


class UNet2DConditionModel(nn.Module, ModelRoot):
    """Predicts the noise ``eps(z_t, t, c)``.

    Attributes:
      config: the architecture.
      routing: which self-attentions use PISA (static).
      lora: LoRA placement and size, or None for none. Its weights are the ``"lora"`` collection.
      remat: recompute transformer blocks and ResNets in the backward pass (saves activation memory).
      dtype: compute dtype, e.g. ``jnp.bfloat16``; None computes in the input's dtype.
      param_dtype: dtype of the base params (LoRA params are always fp32).
    """

    config: UNetConfig
    routing: AttentionRouting = AttentionRouting()
    lora: LoRAConfig | None = None
    remat: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        *,
        attention_context: Any = None,
    ) -> jax.Array:
        """One U-Net evaluation.

        Args:
          sample: noisy latents ``[B, h, w, in_channels]`` (any ``h, w``; non-multiples of the
            downsampling factor are handled as diffusers does).
          timesteps: scalar or ``[B]`` diffusion timesteps (0..999).
          encoder_hidden_states: text tokens ``[B, S, cross_attention_dim]``.
          text_embeds: pooled text embedding ``[B, 1280]`` (SDXL ``text_time`` conditioning).
          time_ids: ``[B, 6]`` = original ``(H, W)``, crop top-left ``(y, x)``, target ``(H, W)``;
            ``[B, 5]`` for a refiner (``config.num_time_ids``): the last is the aesthetic score.
          attention_context: PISA inputs (``attention.PisaInputs``), passed unchanged to every
            ``attend`` call; None: vanilla attention everywhere. PISA's training mode travels in it
            (SDXL's U-Net has no dropout of its own, so there is no ``train`` argument).

        Returns ``[B, h, w, out_channels]``, in ``dtype``.
        """
        cfg = self.config
        b = sample.shape[0]
        dtype = self.dtype or sample.dtype
        p = Precision(dtype=self.dtype, param_dtype=self.param_dtype)
        options = BlockOptions(routing=self.routing, lora=self.lora, remat=self.remat, precision=p)

        t_b = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(
            t_b, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        emb_bc = TimestepEmbedding(cfg.time_embed_dim, precision=p, name="time_embedding")(
            t_emb.astype(dtype)
        )
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise InputError("this U-Net has text_time conditioning: pass text_embeds and time_ids")
            ids_emb = timestep_embedding(
                time_ids.reshape(-1),
                cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift,
            ).reshape(b, -1)
            add_bc = jnp.concatenate([text_embeds.astype(jnp.float32), ids_emb], axis=-1).astype(dtype)
            emb_bc = emb_bc + TimestepEmbedding(cfg.time_embed_dim, precision=p, name="add_embedding")(add_bc)

        x = Conv(cfg.block_out_channels[0], precision=p, name="conv_in")(sample)
        common = dict(
            num_layers=cfg.layers_per_block,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            use_linear_projection=cfg.use_linear_projection,
            upcast=cfg.upcast_attention,
            options=options,
        )
        skips = [x]
        n = len(cfg.block_out_channels)
        for i, kind in enumerate(cfg.down_block_types):
            x, s = DownBlock(
                cfg.block_out_channels[i],
                heads=cfg.num_attention_heads[i] if kind == "CrossAttnDownBlock2D" else 0,
                transformer_layers=cfg.transformer_layers_per_block[i],
                add_downsample=i < n - 1,
                name=f"down_blocks_{i}",
                **common,
            )(x, emb_bc, encoder_hidden_states, attention_context)
            skips.extend(s)

        x = MidBlock(
            cfg.block_out_channels[-1],
            heads=cfg.num_attention_heads[-1],
            transformer_layers=cfg.transformer_layers_per_block[-1],
            name="mid_block",
            **{**common, "num_layers": 1},
        )(x, emb_bc, encoder_hidden_states, attention_context)

        up_channels = cfg.block_out_channels[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            m = cfg.layers_per_block + 1
            block_skips, skips = skips[-m:], skips[:-m]
            final = i == n - 1
            x = UpBlock(
                up_channels[i],
                heads=cfg.num_attention_heads[::-1][i] if kind == "CrossAttnUpBlock2D" else 0,
                transformer_layers=cfg.transformer_layers_per_block[::-1][i],
                add_upsample=not final,
                name=f"up_blocks_{i}",
                **{**common, "num_layers": m},
            )(
                x,
                tuple(block_skips),
                emb_bc,
                encoder_hidden_states,
                attention_context,
                None if final else tuple(skips[-1].shape[1:3]),
            )

        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, precision=p, name="conv_norm_out")(x))
        return Conv(cfg.out_channels, precision=p, name="conv_out")(x)

    def init_inputs(self, batch: int = 1, size: tuple[int, int] | None = None, seq: int = 77) -> tuple:
        """Example inputs with the right shapes (zeros), for ``init`` and ``jax.eval_shape``."""
        cfg = self.config
        size = size or (cfg.sample_size or 64,) * 2
        args = [
            jnp.zeros((batch, *size, cfg.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, seq, cfg.cross_attention_dim), jnp.float32),
        ]
        if cfg.addition_embed_type == "text_time":
            args += [
                jnp.zeros((batch, cfg.text_embeds_dim), jnp.float32),
                jnp.zeros((batch, cfg.num_time_ids), jnp.float32),
            ]
        return tuple(args)
