"""The U-Net's transformer and its down, mid and up blocks, named after diffusers' modules.

Linen names are diffusers attribute names with each index joined by ``_`` (``resnets_0``,
``attentions_1``, ``to_out_0``, ``ff/net_0/proj``), the naming rule of ``models.naming``; an
attention layer's diffusers path (``diffusers_path``) is what ``AttentionRouting`` matches.
Activations are ``NHWC`` or ``[batch, tokens, channels]``. Architecture sizes are the leading fields;
what every block passes down unchanged (routing, LoRA, remat, precision) is one keyword-only
``options: BlockOptions``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bokehdiff_jax.models.attention import attend
from bokehdiff_jax.models.layers import (
    Conv,
    Dense,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    diffusers_path,
    maybe_remat,
)
from bokehdiff_jax.models.options import BlockOptions


class Attention(nn.Module):
    """diffusers ``Attention`` (``to_q/k/v``, ``to_out_0``), routed through ``attend`` by its path.

    ``grid`` is ``(h, w)`` of the feature map whose tokens are the queries. ``upcast``: q, k, v go to
    ``attend`` in fp32 (diffusers' ``upcast_attention``).
    """

    heads: int
    head_dim: int
    grid: tuple[int, int]
    _: dataclasses.KW_ONLY
    upcast: bool = False
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x_btc: jax.Array, context_bsc: jax.Array | None = None, attention_context: Any = None):
        b, n, c = x_btc.shape
        inner = self.heads * self.head_dim
        o_ = self.options
        dense = lambda f, name, bias=False: Dense(f, bias, lora=o_.lora, precision=o_.precision, name=name)
        kv_in = x_btc if context_bsc is None else context_bsc
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim)
        q, k, v = (
            split(dense(inner, "to_q")(x_btc)),
            split(dense(inner, "to_k")(kv_in)),
            split(dense(inner, "to_v")(kv_in)),
        )
        dtype = q.dtype
        if self.upcast:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        o = attend(
            q,
            k,
            v,
            path=diffusers_path(self),
            grid=self.grid,
            routing=o_.routing,
            context=attention_context,
        )
        return dense(c, "to_out_0", True)(o.astype(dtype).reshape(b, n, inner))


class GEGLU(nn.Module):
    """``proj`` to 2 x ``features``, then ``value * gelu(gate)`` (exact gelu, as torch's default)."""

    features: int
    _: dataclasses.KW_ONLY
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        o = self.options
        h = Dense(2 * self.features, lora=o.lora, precision=o.precision, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU to 4 x width) then ``net_2`` back; diffusers' ``net.1`` is a parameterless dropout."""

    _: dataclasses.KW_ONLY
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        o, dim = self.options, x_btc.shape[-1]
        h = GEGLU(4 * dim, options=o, name="net_0")(x_btc)
        return Dense(dim, lora=o.lora, precision=o.precision, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention ``attn1``, cross-attention ``attn2``, GEGLU ``ff``; pre-LayerNorm, residuals."""

    heads: int
    head_dim: int
    grid: tuple[int, int]
    _: dataclasses.KW_ONLY
    upcast: bool = False
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x_btc: jax.Array, context_bsc: jax.Array, attention_context: Any = None) -> jax.Array:
        o = self.options
        p = o.precision
        ln = lambda name: nn.LayerNorm(1e-5, dtype=p.dtype, param_dtype=p.param_dtype, name=name)
        attn = lambda name: Attention(
            self.heads, self.head_dim, self.grid, upcast=self.upcast, options=o, name=name
        )
        x_btc = attn("attn1")(ln("norm1")(x_btc), None, attention_context) + x_btc
        x_btc = attn("attn2")(ln("norm2")(x_btc), context_bsc, attention_context) + x_btc
        return FeedForward(options=o, name="ff")(ln("norm3")(x_btc)) + x_btc


class Transformer2DModel(nn.Module):
    """GroupNorm ``norm``, ``proj_in`` (linear or 1x1 conv), transformer blocks, ``proj_out``, residual."""

    heads: int
    num_layers: int
    groups: int
    _: dataclasses.KW_ONLY
    use_linear_projection: bool = True
    upcast: bool = False
    options: BlockOptions = BlockOptions()

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, context_bsc: jax.Array, attention_context: Any = None) -> jax.Array:
        b, h, w, c = x_bhwc.shape
        o = self.options
        kw = dict(lora=o.lora, precision=o.precision)
        y = GroupNorm(self.groups, 1e-6, precision=o.precision, name="norm")(x_bhwc)
        if self.use_linear_projection:
            y = Dense(c, name="proj_in", **kw)(y.reshape(b, h * w, c))
        else:
            y = Conv(c, 1, name="proj_in", **kw)(y).reshape(b, h * w, c)
        block = maybe_remat(BasicTransformerBlock, o.remat)
        for i in range(self.num_layers):
            y = block(
                self.heads,
                c // self.heads,
                (h, w),
                upcast=self.upcast,
                options=o,
                name=f"transformer_blocks_{i}",
            )(y, context_bsc, attention_context)
        if self.use_linear_projection:
            y = Dense(c, name="proj_out", **kw)(y).reshape(b, h, w, c)
        else:
            y = Conv(c, 1, name="proj_out", **kw)(y.reshape(b, h, w, c))
        return y + x_bhwc.astype(y.dtype)


class UNetBlockBase(nn.Module):
    """Shared fields of the U-Net's down, mid and up blocks. ``heads == 0``: no attentions."""

    out_channels: int
    _: dataclasses.KW_ONLY
    num_layers: int
    groups: int
    eps: float
    heads: int = 0
    transformer_layers: int = 1
    use_linear_projection: bool = True
    upcast: bool = False
    options: BlockOptions = BlockOptions()

    def _resnet(self, i: int) -> nn.Module:
        o = self.options
        return maybe_remat(ResnetBlock2D, o.remat)(
            self.out_channels, self.groups, self.eps, lora=o.lora, precision=o.precision, name=f"resnets_{i}"
        )

    def _attention(self, i: int) -> nn.Module:
        return Transformer2DModel(
            self.heads,
            self.transformer_layers,
            self.groups,
            use_linear_projection=self.use_linear_projection,
            upcast=self.upcast,
            options=self.options,
            name=f"attentions_{i}",
        )


class DownBlock(UNetBlockBase):
    """``DownBlock2D`` or ``CrossAttnDownBlock2D``. Returns the output and the skips it adds."""

    add_downsample: bool = True

    @nn.compact
    def __call__(self, x_bhwc, temb_bc, context_bsc, attention_context=None):
        skips = []
        for i in range(self.num_layers):
            x_bhwc = self._resnet(i)(x_bhwc, temb_bc)
            if self.heads:
                x_bhwc = self._attention(i)(x_bhwc, context_bsc, attention_context)
            skips.append(x_bhwc)
        if self.add_downsample:
            o = self.options
            down = Downsample2D(self.out_channels, lora=o.lora, precision=o.precision, name="downsamplers_0")
            x_bhwc = down(x_bhwc)
            skips.append(x_bhwc)
        return x_bhwc, tuple(skips)


class MidBlock(UNetBlockBase):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, x_bhwc, temb_bc, context_bsc, attention_context=None):
        x_bhwc = self._resnet(0)(x_bhwc, temb_bc)
        x_bhwc = self._attention(0)(x_bhwc, context_bsc, attention_context)
        return self._resnet(1)(x_bhwc, temb_bc)


class UpBlock(UNetBlockBase):
    """``UpBlock2D`` or ``CrossAttnUpBlock2D``: each resnet eats the last skip (concatenated after the
    running features, as diffusers does); then upsample to ``upsample_size`` (the next skip's size)."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x_bhwc, skips, temb_bc, context_bsc, attention_context=None, upsample_size=None):
        skips = list(skips)
        for i in range(self.num_layers):
            x_bhwc = jnp.concatenate([x_bhwc, skips.pop().astype(x_bhwc.dtype)], axis=-1)
            x_bhwc = self._resnet(i)(x_bhwc, temb_bc)
            if self.heads:
                x_bhwc = self._attention(i)(x_bhwc, context_bsc, attention_context)
        if self.add_upsample:
            o = self.options
            up = Upsample2D(self.out_channels, lora=o.lora, precision=o.precision, name="upsamplers_0")
            x_bhwc = up(x_bhwc, upsample_size)
        return x_bhwc
