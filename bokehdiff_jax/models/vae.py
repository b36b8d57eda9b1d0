"""The SDXL VAE (diffusers ``AutoencoderKL``) in Flax linen, channels-last, diffusers' module names.

Pixels in and out are in ``[-1, 1]`` (diffusers' convention; the pipeline maps the package's [0, 1]
images). ``encode`` returns the latent distribution's mean and log-variance *before* scaling;
BokehDiff uses ``z = mean * scaling_factor`` (SPEC section 3). SDXL's VAE overflows in fp16
(``force_upcast``): an fp16 VAE computes in fp32, as diffusers does; bf16 has fp32's range and stays bf16.

For images too large for one pass, ``vae_tiling.encode_tiled`` / ``decode_tiled`` compute the same
encode / decode layer by layer over spatial tiles (global GroupNorm statistics, whole-map mid-block
attention), so the result equals the untiled one while device memory holds about one tile.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bokehdiff_jax.models.attention import AttentionRouting, attend
from bokehdiff_jax.models.configs import VAEConfig
from bokehdiff_jax.models.layers import (
    Conv,
    Dense,
    Downsample2D,
    GroupNorm,
    ModelRoot,
    ResnetBlock2D,
    Upsample2D,
    diffusers_path,
    maybe_remat,
)
from bokehdiff_jax.models.options import Dtype, Precision

_EPS = 1e-6  # every norm of diffusers' VAE
_NO_PISA = AttentionRouting(pisa_paths=())


class VAEAttention(nn.Module):
    """The VAE's single-head spatial self-attention: ``group_norm``, biased ``to_q/k/v``, residual.

    Its projections sit directly under it (``attentions_0/to_q``), as in diffusers' keys. It goes
    through ``attend`` like every attention layer (path ``encoder.mid_block.attentions.0`` or the
    decoder's), with no PISA. At 1024 x 1024 pixels it attends over 128 x 128 = 16384 tokens.
    """

    groups: int
    _: dataclasses.KW_ONLY
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        b, h, w, c = x_bhwc.shape
        p = self.precision
        y = GroupNorm(self.groups, _EPS, precision=p, name="group_norm")(x_bhwc).reshape(b, h * w, c)
        dense = lambda name: Dense(c, precision=p, name=name)
        q, k, v = (dense(f"to_{n}")(y).reshape(b, h * w, 1, c) for n in "qkv")
        o = attend(q, k, v, path=diffusers_path(self), grid=(h, w), routing=_NO_PISA, context=None)
        o = dense("to_out_0")(o.reshape(b, h * w, c))
        return o.reshape(b, h, w, c) + x_bhwc.astype(o.dtype)


class VAEMidBlock(nn.Module):
    """``UNetMidBlock2D`` without time input: resnet, (attention), resnet. ``remat``: recompute each
    resnet's and the attention's activations in the backward pass."""

    channels: int
    groups: int
    _: dataclasses.KW_ONLY
    add_attention: bool
    remat: bool = False
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        p = self.precision
        resnet_cls = maybe_remat(ResnetBlock2D, self.remat)
        resnet = lambda i: resnet_cls(self.channels, self.groups, _EPS, precision=p, name=f"resnets_{i}")
        x_bhwc = resnet(0)(x_bhwc)
        if self.add_attention:
            attention = maybe_remat(VAEAttention, self.remat)
            x_bhwc = attention(self.groups, precision=p, name="attentions_0")(x_bhwc)
        return resnet(1)(x_bhwc)


class VAEBlock(nn.Module):
    """``DownEncoderBlock2D`` (``up=False``) or ``UpDecoderBlock2D`` (``up=True``): resnets, then the
    sampler (``downsamplers_0`` / ``upsamplers_0``) unless ``final``. ``remat``: recompute the resnets'
    and the upsampler's activations in the backward pass (the downsampler saves only its input anyway)."""

    channels: int
    groups: int
    num_layers: int
    _: dataclasses.KW_ONLY
    up: bool
    final: bool
    remat: bool = False
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        p = self.precision
        resnet = maybe_remat(ResnetBlock2D, self.remat)
        for j in range(self.num_layers):
            x_bhwc = resnet(self.channels, self.groups, _EPS, precision=p, name=f"resnets_{j}")(x_bhwc)
        if self.final:
            return x_bhwc
        if self.up:
            # The upsampled map (4x the input) is what its conv would save: recompute it instead.
            upsample = maybe_remat(Upsample2D, self.remat)
            return upsample(self.channels, precision=p, name="upsamplers_0")(x_bhwc)
        return Downsample2D(self.channels, pad_right_only=True, precision=p, name="downsamplers_0")(x_bhwc)


class Encoder(nn.Module):
    """Pixels ``[B, H, W, 3]`` in [-1, 1] -> moments ``[B, H/f, W/f, 2 * latent_channels]``.
    ``remat``: as ``AutoencoderKL.remat``."""

    config: VAEConfig
    _: dataclasses.KW_ONLY
    remat: bool = False
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        cfg, g, p = self.config, self.config.norm_num_groups, self.precision
        kw = dict(remat=self.remat, precision=p)
        conv = lambda f, name: Conv(f, precision=p, name=name)
        x = conv(cfg.block_out_channels[0], "conv_in")(x_bhwc)
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            final = i == n - 1
            x = VAEBlock(ch, g, cfg.layers_per_block, up=False, final=final, name=f"down_blocks_{i}", **kw)(x)
        add_attn = cfg.mid_block_add_attention
        x = VAEMidBlock(cfg.block_out_channels[-1], g, add_attention=add_attn, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(g, _EPS, precision=p, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` -> pixels ``[B, h f, w f, 3]`` in about [-1, 1].
    ``remat``: as ``AutoencoderKL.remat``."""

    config: VAEConfig
    _: dataclasses.KW_ONLY
    remat: bool = False
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, z_bhwc: jax.Array) -> jax.Array:
        cfg, g, p = self.config, self.config.norm_num_groups, self.precision
        kw = dict(remat=self.remat, precision=p)
        conv = lambda f, name: Conv(f, precision=p, name=name)
        up = cfg.block_out_channels[::-1]
        x = conv(up[0], "conv_in")(z_bhwc)
        x = VAEMidBlock(up[0], g, add_attention=cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        n = cfg.layers_per_block + 1
        for i, ch in enumerate(up):
            final = i == len(up) - 1
            x = VAEBlock(ch, g, n, up=True, final=final, name=f"up_blocks_{i}", **kw)(x)

        def head(mdl: nn.Module, x: jax.Array) -> jax.Array:  # full resolution: recomputed under remat
            x = nn.silu(GroupNorm(g, _EPS, precision=p, name="conv_norm_out", parent=mdl)(x))
            return Conv(cfg.out_channels, precision=p, name="conv_out", parent=mdl)(x)

        return (nn.checkpoint(head) if self.remat else head)(self, x)


def vae_dtype(config: VAEConfig, dtype: Dtype | None) -> Dtype | None:
    """The VAE's compute dtype for a requested ``dtype`` (None: the input's): fp32 for fp16 under
    ``config.force_upcast`` (diffusers' rule: SDXL's VAE overflows fp16), else ``dtype``."""
    if config.force_upcast and dtype is not None and jnp.dtype(dtype) == jnp.float16:
        return jnp.float32
    return dtype


class AutoencoderKL(nn.Module, ModelRoot):
    """diffusers ``AutoencoderKL``. Use ``apply(..., method="encode" | "decode")``; ``__call__``
    (encode then decode the mean) exists for ``init``.

    Attributes:
      config: the architecture.
      dtype: compute dtype; None computes in the input's dtype. fp16 with ``config.force_upcast`` (SDXL:
        its activations overflow fp16) computes in fp32 instead, as diffusers does (``vae_dtype``); bf16
        has fp32's exponent range and is kept (half the activation memory of fp32).
      param_dtype: dtype of the params.
      remat: recompute the ResNet blocks', attentions' and upsamplers' activations in the backward
        pass instead of saving them (same params, values and gradients), and the decoder's output
        normalisation. The VAE runs at full image resolution: at 1024 px one 128-channel map is 256 MiB
        per image in bf16, and a ResNet block saves about five, so training through it needs this. No effect
        without a backward pass; ``vae_tiling`` ignores it.
    """

    config: VAEConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self) -> None:
        cfg = self.config
        p = Precision(dtype=vae_dtype(cfg, self.dtype), param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, remat=self.remat, precision=p)
        self.decoder = Decoder(cfg, remat=self.remat, precision=p)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, 1, precision=p)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, 1, precision=p)

    def encode(self, x_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, H, W, 3]`` in [-1, 1] -> ``(mean, logvar)``, each ``[B, H/8, W/8, latent_channels]``,
        unscaled. ``H, W`` need not be multiples of 8: each halving rounds down, as in diffusers."""
        m = self.encoder(x_bhwc)
        if self.config.use_quant_conv:
            m = self.quant_conv(m)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z_bhwc: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, latent_channels]`` -> ``[B, 8h, 8w, 3]`` in about [-1, 1]."""
        if self.config.use_post_quant_conv:
            z_bhwc = self.post_quant_conv(z_bhwc)
        return self.decoder(z_bhwc)

    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        return self.decode(self.encode(x_bhwc)[0])
