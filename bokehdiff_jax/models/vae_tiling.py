"""Tiled, exact VAE encode/decode for images too large to run through the VAE in one piece.

Tiling the whole VAE per tile (diffusers' ``enable_tiling``) cannot reproduce the untiled result:
every GroupNorm and the mid-block attention see the *whole* map. Here the VAE runs layer by layer
instead, with each intermediate map kept whole in host memory (NumPy) and only one tile's working
set on the device:

* every local op (3x3 / 1x1 conv, the GroupNorm-silu in front of it, the residual add, the nearest 2x
  upsample, the stride-2 downsample with its bottom/right-only padding) runs per output tile, from an
  input window that carries the halo the op needs. Output tiles do not overlap; the windows do (the
  halo is the overlap), so no blending is needed: the result equals the untiled one up to fp32
  rounding (tested at 1e-5 relative).
* every GroupNorm uses global per-(batch, group) statistics: the op that produces a map also returns
  each output tile's count, mean and centred sum of squares (fp32, on the device); the host merges
  them in float64 (Chan et al.'s pairwise update), which is as accurate as the untiled two-pass
  variance. The norm is then applied tile by tile, fused into the next conv.
* the mid-block attention is global: its q, k, v are computed for the whole map on the device (it
  is at ``1/f`` of the image side), then queries run ``tile x tile`` at a time against every key
  (softmax is per query, so this is exact), so the logits held are ``tile^2 x N``, not ``N x N``.

Every tile of an op has the same padded shape (edge tiles are zero-filled and masked), so each jitted
tile function compiles once per (op shape, tile shape). Parameters come from the Flax model's own
tree; the convs and projections are the model's own ``Conv`` / ``Dense`` modules applied to its
sub-trees, and attention goes through ``attention.attend`` like the untiled model's.

On GPU, fp32 matmuls and convs may run in TF32 unless ``jax_default_matmul_precision`` is "highest";
the 1e-5 agreement is then not to be expected (the tests run on CPU, in full fp32).

Units are those of ``AutoencoderKL.encode`` / ``decode``: pixels in [-1, 1], unscaled latents.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import attend
from bokehdiff_jax.models.layers import Conv, Dense
from bokehdiff_jax.models.options import Precision
from bokehdiff_jax.models.vae import _EPS, _NO_PISA, AutoencoderKL, vae_dtype

Params = Mapping[str, Any]
# Per-(batch, group) statistics of a whole map, float64: (mean [B, G], variance [B, G]).
Stats = tuple[np.ndarray, np.ndarray]


def _window(x_bhwc: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``x[:, y0:y0+h, x0:x0+w]`` with zeros wherever the window leaves the map: ``[B, h, w, C]``."""
    b, hh, ww, c = x_bhwc.shape
    out = np.zeros((b, h, w, c), x_bhwc.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, hh), max(x0, 0), min(x0 + w, ww)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = x_bhwc[:, ya:yb, xa:xb]
    return out


def _tile_stats(y_bhwc: jax.Array, valid: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Mean and centred sum of squares per (batch, group) over the tile's ``valid = (rows, cols)``
    corner, in fp32: ``([B, G], [B, G])``."""
    b, h, w, c = y_bhwc.shape
    k = c // groups
    y = y_bhwc.astype(jnp.float32).reshape(b, h, w, groups, k)
    inside = (jnp.arange(h)[:, None] < valid[0]) & (jnp.arange(w)[None, :] < valid[1])
    m = inside[None, :, :, None, None].astype(jnp.float32)
    n = (valid[0] * valid[1] * k).astype(jnp.float32)
    mean_bg = (y * m).sum(axis=(1, 2, 4)) / n
    m2_bg = jnp.square((y - mean_bg[:, None, None, :, None]) * m).sum(axis=(1, 2, 4))
    return mean_bg, m2_bg


@functools.partial(jax.jit, static_argnames=("kind", "groups", "dtype"))
def _tile_op(
    win_bhwc: jax.Array,
    origin: jax.Array,
    bounds: jax.Array,
    valid: jax.Array,
    norm: tuple[jax.Array, jax.Array] | None,
    conv: Params,
    resid_bhwc: jax.Array | None,
    shortcut: Params | None,
    *,
    kind: str,
    groups: int | None,
    dtype: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """One output tile of ``[norm -> silu] -> conv [-> + residual]``.

    Args:
      win_bhwc: the input window, halo included, ``[B, h_in, w_in, C_in]`` (zero where it leaves the map).
      origin: ``(row, col)`` of the window's first element in the coordinates where the conv's zero
        padding applies (the upsampled map for ``kind="up"``, after the 1-element trim below).
      bounds: ``(rows, cols)`` of that map: everything outside is the conv's zero padding.
      valid: ``(rows, cols)`` of the output tile that lie inside the output map (for the statistics).
      norm: per-(batch, channel) ``(mul, shift)`` in fp32 (the GroupNorm folded with global statistics),
        or None for no norm and no silu.
      conv: the conv's params (``kernel [k, k, C_in, C_out]``, ``bias``).
      resid_bhwc: the block input at the output tile, ``[B, th, tw, C_res]``, or None.
      shortcut: the 1x1 ``conv_shortcut`` params applied to the residual, or None.
      kind: ``conv3`` (3x3, stride 1), ``conv1`` (1x1), ``down`` (3x3, stride 2) or ``up`` (nearest 2x
        then 3x3).
      groups: GroupNorm groups for the output statistics, or None for none.
      dtype: compute dtype.

    Returns ``(y [B, th, tw, C_out], mean [B, G] | None, m2 [B, G] | None)``.
    """
    x = win_bhwc
    if norm is not None:
        mul_bc, shift_bc = norm
        y = x.astype(jnp.float32) * mul_bc[:, None, None] + shift_bc[:, None, None]
        x = nn.silu(y.astype(dtype))  # as vae.py: the norm's output in the compute dtype, then silu
    x = x.astype(dtype)
    if kind == "up":
        # Nearest 2x commutes with the elementwise norm-silu; drop one upsampled row/col per side so
        # the window is exactly the 3x3 conv's input (output tile plus a one-element halo).
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, 1:-1, 1:-1]
    # Zero padding of the untiled conv: positions outside the map are zero *after* the norm-silu.
    rows = origin[0] + jnp.arange(x.shape[1])
    cols = origin[1] + jnp.arange(x.shape[2])
    inside = ((rows >= 0) & (rows < bounds[0]))[:, None] & ((cols >= 0) & (cols < bounds[1]))[None, :]
    x = jnp.where(inside[None, :, :, None], x, jnp.zeros((), x.dtype))
    kh, _, _, features = conv["kernel"].shape
    stride = 2 if kind == "down" else 1
    precision = lambda w: Precision(dtype=dtype, param_dtype=w["kernel"].dtype)
    layer = Conv(features, kh, stride, ((0, 0), (0, 0)), precision=precision(conv))
    y = layer.apply({"params": conv}, x)
    if resid_bhwc is not None:
        r = resid_bhwc
        if shortcut is not None:
            sc = Conv(features, 1, precision=precision(shortcut))
            r = sc.apply({"params": shortcut}, r)
        y = r.astype(y.dtype) + y  # the order of ResnetBlock2D's sum
    if groups is None:
        return y, None, None
    mean_bg, m2_bg = _tile_stats(y, valid, groups)
    return y, mean_bg, m2_bg


@functools.partial(jax.jit, static_argnames=("dtype",))
def _qkv(
    x_bhwc: jax.Array, norm: tuple[jax.Array, jax.Array], params: Params, *, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``VAEAttention``'s group norm (folded, global statistics) and ``to_q/k/v`` on the whole map:
    three ``[B, N, 1, C]`` token maps (one head), ``N = H W`` row-major."""
    b, h, w, c = x_bhwc.shape
    mul_bc, shift_bc = norm
    y = (x_bhwc.astype(jnp.float32) * mul_bc[:, None, None] + shift_bc[:, None, None]).astype(dtype)
    y = y.reshape(b, h * w, c)
    dense = Dense(c, precision=Precision(dtype=dtype))
    proj = lambda n: dense.apply({"params": params[f"to_{n}"]}, y).reshape(b, h * w, 1, c)
    return proj("q"), proj("k"), proj("v")


@functools.partial(jax.jit, static_argnames=("chunk", "grid", "path", "groups", "dtype"))
def _attention_chunk(
    q_bnhd: jax.Array,
    k_bnhd: jax.Array,
    v_bnhd: jax.Array,
    x_bnc: jax.Array,
    start: jax.Array,
    valid: jax.Array,
    to_out: Params,
    *,
    chunk: int,
    grid: tuple[int, int],
    path: str,
    groups: int,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``start .. start + chunk`` of ``VAEAttention`` against all keys, ``to_out_0`` and the
    residual: ``[B, chunk, C]``, plus the statistics of its first ``valid`` tokens.

    ``q`` and ``x`` are padded to a multiple of ``chunk`` tokens (the padded rows are discarded).
    Softmax runs per query over every key, so query chunks are exact; the logits held at once are
    ``B x chunk x N`` instead of ``B x N x N``.
    """
    b, _, _, c = q_bnhd.shape
    q = jax.lax.dynamic_slice_in_dim(q_bnhd, start, chunk, axis=1)
    o = attend(q, k_bnhd, v_bnhd, path=path, grid=grid, routing=_NO_PISA, context=None)
    o = Dense(c, precision=Precision(dtype=dtype)).apply({"params": to_out}, o.reshape(b, chunk, c))
    x = jax.lax.dynamic_slice_in_dim(x_bnc, start, chunk, axis=1)
    y = o + x.astype(o.dtype)  # VAEAttention's residual, in its order
    mean_bg, m2_bg = _tile_stats(y[:, None], jnp.stack([jnp.ones_like(valid), valid]), groups)
    return y, mean_bg, m2_bg


def _merge(parts: list[tuple[float, np.ndarray, np.ndarray]]) -> Stats:
    """Chan et al.'s merge of per-tile ``(count, mean [B, G], m2 [B, G])`` into global (mean, var)."""
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * p[1] for p in parts) / n
    m2 = sum(p[2] + p[0] * np.square(p[1] - mean) for p in parts)
    return mean, m2 / n


class _Runner:
    """Runs the VAE's ops one at a time over host-resident maps, tile by tile."""

    def __init__(self, groups: int, dtype: Any) -> None:
        self.groups, self.dtype = groups, jnp.dtype(dtype)

    def _fold(self, norm: Params, stats: Stats) -> tuple[np.ndarray, np.ndarray]:
        """GroupNorm params plus global statistics -> per-(batch, channel) fp32 ``(mul, shift)``."""
        scale = np.asarray(norm["scale"], np.float64)
        bias = np.asarray(norm["bias"], np.float64)
        k = scale.shape[0] // self.groups
        mean_bc, var_bc = (np.repeat(s, k, axis=-1) for s in stats)
        mul = scale / np.sqrt(var_bc + _EPS)
        return mul.astype(np.float32), (bias - mean_bc * mul).astype(np.float32)

    def op(
        self,
        x_bhwc: np.ndarray,
        kind: str,
        tile: int,
        conv: Params,
        *,
        norm: tuple[Params, Stats] | None = None,
        resid: np.ndarray | None = None,
        shortcut: Params | None = None,
        stats: bool = True,
    ) -> tuple[np.ndarray, Stats | None]:
        """``[norm-silu] -> conv [+ residual]`` over the whole map ``[B, H, W, C]``, ``tile`` x ``tile``
        output tiles at a time. Returns the output map and (if ``stats``) its global statistics."""
        b, hi, wi, _ = x_bhwc.shape
        ho, wo = {"down": (hi // 2, wi // 2), "up": (2 * hi, 2 * wi)}.get(kind, (hi, wi))
        th, tw = min(tile, ho), min(tile, wo)  # even for "up": tile and ho, wo are even there
        folded = None if norm is None else self._fold(*norm)
        out: np.ndarray | None = None
        parts: list[tuple[float, np.ndarray, np.ndarray]] = []
        for oy in range(0, ho, th):
            for ox in range(0, wo, tw):
                if kind == "conv3":
                    win = _window(x_bhwc, oy - 1, ox - 1, th + 2, tw + 2)
                    origin, bounds = (oy - 1, ox - 1), (hi, wi)
                elif kind == "conv1":
                    win = _window(x_bhwc, oy, ox, th, tw)
                    origin, bounds = (oy, ox), (hi, wi)
                elif kind == "down":  # pad (0, 1): output row r reads input rows 2r .. 2r + 2
                    win = _window(x_bhwc, 2 * oy, 2 * ox, 2 * th + 1, 2 * tw + 1)
                    origin, bounds = (2 * oy, 2 * ox), (hi, wi)
                else:  # "up": upsampled rows oy - 1 .. oy + th come from input rows oy/2 - 1 .. oy/2 + th/2
                    win = _window(x_bhwc, oy // 2 - 1, ox // 2 - 1, th // 2 + 2, tw // 2 + 2)
                    origin, bounds = (oy - 1, ox - 1), (ho, wo)
                valid = (min(th, ho - oy), min(tw, wo - ox))
                r = None if resid is None else _window(resid, oy, ox, th, tw)
                y, mean_bg, m2_bg = _tile_op(
                    jnp.asarray(win),
                    jnp.asarray(origin, jnp.int32),
                    jnp.asarray(bounds, jnp.int32),
                    jnp.asarray(valid, jnp.int32),
                    folded,
                    conv,
                    r,
                    shortcut,
                    kind=kind,
                    groups=self.groups if stats else None,
                    dtype=self.dtype,
                )
                y = np.asarray(y)
                if out is None:
                    out = np.empty((b, ho, wo, y.shape[-1]), y.dtype)
                out[:, oy : oy + valid[0], ox : ox + valid[1]] = y[:, : valid[0], : valid[1]]
                if stats:
                    k = y.shape[-1] // self.groups
                    n = float(valid[0] * valid[1] * k)
                    parts.append((n, np.asarray(mean_bg, np.float64), np.asarray(m2_bg, np.float64)))
        assert out is not None
        return out, (_merge(parts) if stats else None)

    def resnet(self, x: np.ndarray, x_stats: Stats, p: Params, tile: int) -> tuple[np.ndarray, Stats]:
        """``ResnetBlock2D`` without time input: two norm-silu-conv ops, the second adds the shortcut."""
        h, h_stats = self.op(x, "conv3", tile, p["conv1"], norm=(p["norm1"], x_stats))
        out, stats = self.op(
            h, "conv3", tile, p["conv2"], norm=(p["norm2"], h_stats), resid=x, shortcut=p.get("conv_shortcut")
        )
        assert stats is not None
        return out, stats

    def attention(
        self, x: np.ndarray, x_stats: Stats, p: Params, tile: int, path: str
    ) -> tuple[np.ndarray, Stats]:
        """``VAEAttention`` on the map ``[B, H, W, C]``: q, k, v for the whole map on the device (the
        map is at ``1/f`` resolution), then ``tile * tile`` queries at a time against all keys."""
        b, h, w, c = x.shape
        n = h * w
        chunk = min(tile * tile, n)
        pad = -n % chunk
        q, k, v = _qkv(jnp.asarray(x), self._fold(p["group_norm"], x_stats), p, dtype=self.dtype)
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        x_flat = jnp.pad(jnp.asarray(x).reshape(b, n, c), ((0, 0), (0, pad), (0, 0)))
        out: np.ndarray | None = None
        parts: list[tuple[float, np.ndarray, np.ndarray]] = []
        for s in range(0, n, chunk):
            valid = min(chunk, n - s)
            y, mean_bg, m2_bg = _attention_chunk(
                q,
                k,
                v,
                x_flat,
                jnp.asarray(s, jnp.int32),
                jnp.asarray(valid, jnp.int32),
                p["to_out_0"],
                chunk=chunk,
                grid=(h, w),
                path=path,
                groups=self.groups,
                dtype=self.dtype,
            )
            y = np.asarray(y)
            if out is None:
                out = np.empty((b, n, c), y.dtype)
            out[:, s : s + valid] = y[:, :valid]
            k_per_group = c // self.groups
            parts.append(
                (float(valid * k_per_group), np.asarray(mean_bg, np.float64), np.asarray(m2_bg, np.float64))
            )
        assert out is not None
        return out.reshape(b, h, w, c), _merge(parts)

    def mid(
        self, x: np.ndarray, x_stats: Stats, p: Params, tile: int, attn: bool, path: str
    ) -> tuple[np.ndarray, Stats]:
        """``VAEMidBlock``: resnet, (attention), resnet. ``path``: the attention's diffusers path."""
        x, x_stats = self.resnet(x, x_stats, p["resnets_0"], tile)
        if attn:
            x, x_stats = self.attention(x, x_stats, p["attentions_0"], tile, path)
        return self.resnet(x, x_stats, p["resnets_1"], tile)


def _check(x: Any, tile: Any, channels: int, what: str, multiple: int) -> None:
    """``InputError`` unless ``tile`` is a positive multiple of ``multiple`` and ``x`` is
    ``[B, H, W, channels]`` with ``H, W >= multiple`` (so no level of the VAE is empty)."""
    if not isinstance(tile, int | np.integer) or isinstance(tile, bool) or tile < 1 or tile % multiple:
        raise InputError(f"{what}: tile={tile!r}; expected a positive int, a multiple of {multiple}")
    shape = np.shape(x)
    if len(shape) != 4 or shape[-1] != channels or min(shape[1:3]) < multiple:
        raise InputError(
            f"{what}: input of shape {shape}; expected [B, H, W, {channels}] with H, W >= {multiple}"
        )


def _compute_dtype(vae: AutoencoderKL, x: Any) -> Any:
    # As AutoencoderKL.setup: its dtype (fp16 under force_upcast: fp32), or the input's if None.
    return vae_dtype(vae.config, vae.dtype) or jnp.asarray(x).dtype


def encode_tiled(
    vae: AutoencoderKL, variables: Mapping[str, Any], x_bhwc: Any, *, tile: int = 512
) -> tuple[jax.Array, jax.Array]:
    """``vae.apply(variables, x, method="encode")`` computed tile by tile; same values, bounded memory.

    Args:
      vae: the ``AutoencoderKL`` module (its config, dtype and param_dtype are used).
      variables: its variables, ``{"params": ...}``.
      x_bhwc: pixels ``[B, H, W, in_channels]`` in [-1, 1]; any ``H, W`` (each halving rounds down).
      tile: output tile side in pixels at full resolution (halved with the map at each level); a
        multiple of the VAE's downsampling factor. Larger than the image is fine (one tile).

    Returns ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]``, unscaled, ``logvar`` clipped
    to [-30, 20], as ``AutoencoderKL.encode``. Device memory: one tile's activations, plus q, k, v
    of the whole ``H/f x W/f`` map and ``(tile/f)^2 x (H/f)(W/f)`` attention logits in the mid block.
    """
    cfg = vae.config
    f = cfg.downsample_factor
    _check(x_bhwc, tile, cfg.in_channels, "encode_tiled", f)
    dtype = _compute_dtype(vae, x_bhwc)
    run = _Runner(cfg.norm_num_groups, dtype)
    params = variables["params"]
    p = params["encoder"]
    x = np.asarray(jnp.asarray(x_bhwc).astype(dtype))
    x, stats = run.op(x, "conv3", tile, p["conv_in"])
    n = len(cfg.block_out_channels)
    for i in range(n):
        t = tile >> i
        blk = p[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            x, stats = run.resnet(x, stats, blk[f"resnets_{j}"], t)
        if i < n - 1:
            x, stats = run.op(x, "down", t >> 1, blk["downsamplers_0"]["conv"])
    t = tile // f
    x, stats = run.mid(
        x, stats, p["mid_block"], t, cfg.mid_block_add_attention, "encoder.mid_block.attentions.0"
    )
    x, _ = run.op(x, "conv3", t, p["conv_out"], norm=(p["conv_norm_out"], stats), stats=False)
    if cfg.use_quant_conv:
        x, _ = run.op(x, "conv1", t, params["quant_conv"], stats=False)
    mean, logvar = np.split(x, 2, axis=-1)
    return jnp.asarray(mean), jnp.clip(jnp.asarray(logvar), -30.0, 20.0)


def decode_tiled(
    vae: AutoencoderKL, variables: Mapping[str, Any], z_bhwc: Any, *, tile: int = 64
) -> jax.Array:
    """``vae.apply(variables, z, method="decode")`` computed tile by tile; same values, bounded memory.

    Args:
      vae: the ``AutoencoderKL`` module (its config, dtype and param_dtype are used).
      variables: its variables, ``{"params": ...}``.
      z_bhwc: unscaled latents ``[B, h, w, latent_channels]``.
      tile: output tile side in latents (doubled with the map at each level, so ``tile * f`` pixels
        at the end); any positive int. Larger than the latent is fine (one tile).

    Returns pixels ``[B, h f, w f, out_channels]`` in about [-1, 1], as ``AutoencoderKL.decode``.
    Device memory: one tile's activations, plus q, k, v of the whole ``h x w`` map and
    ``tile^2 x h w`` attention logits in the mid block.
    """
    cfg = vae.config
    _check(z_bhwc, tile, cfg.latent_channels, "decode_tiled", 1)
    dtype = _compute_dtype(vae, z_bhwc)
    run = _Runner(cfg.norm_num_groups, dtype)
    params = variables["params"]
    p = params["decoder"]
    z = np.asarray(jnp.asarray(z_bhwc).astype(dtype))
    if cfg.use_post_quant_conv:
        z, _ = run.op(z, "conv1", tile, params["post_quant_conv"], stats=False)
    x, stats = run.op(z, "conv3", tile, p["conv_in"])
    x, stats = run.mid(
        x, stats, p["mid_block"], tile, cfg.mid_block_add_attention, "decoder.mid_block.attentions.0"
    )
    n = len(cfg.block_out_channels)
    t = tile
    for i in range(n):
        blk = p[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            x, stats = run.resnet(x, stats, blk[f"resnets_{j}"], t)
        if i < n - 1:
            t *= 2
            x, stats = run.op(x, "up", t, blk["upsamplers_0"]["conv"])
    x, _ = run.op(x, "conv3", t, p["conv_out"], norm=(p["conv_norm_out"], stats), stats=False)
    return jnp.asarray(x)
