"""ConvNeXt (Liu et al. 2022) feature extractor in Flax, and a strict converter from timm weights.

The released BokehDiff discriminator sits on timm's ``convnext_base.fb_in22k`` (ImageNet-22k):
``forward_features`` (stem, four stages, no head), whose last stage gives ``[B, H/32, W/32, 1024]``.
Those weights are not downloadable here; a user supplies timm's safetensors file (keys as timm names
them, e.g. ``stages.2.blocks.5.mlp.fc1.weight``) and ``convnext_from_timm`` converts it. The
classifier head (``head.*``) is declared unused; any other unknown or missing key is an error.

Flax names mirror timm's with indices joined by ``_`` (``stages_2/blocks_5/fc1``); layout NHWC,
convolutions HWIO, dense ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import SafetensorsFile

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """Architecture constants (timm's defaults: patch stem 4x4/4, 7x7 depthwise, MLP ratio 4, layer scale,
    LayerNorm eps 1e-6, exact GELU)."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (128, 256, 512, 1024)
    patch: int = 4
    kernel: int = 7
    mlp_ratio: int = 4
    eps: float = 1e-6

    @classmethod
    def base(cls) -> ConvNeXtConfig:
        """ConvNeXt-base (timm ``convnext_base``, also ``.fb_in22k``): 88 M parameters without the head."""
        return cls()

    @property
    def out_channels(self) -> int:
        return self.dims[-1]


class _Block(nn.Module):
    dim: int
    config: ConvNeXtConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, k = self.config, self.config.kernel
        y = nn.Conv(
            self.dim, (k, k), padding=k // 2, feature_group_count=self.dim, dtype=self.dtype, name="conv_dw"
        )(x)
        y = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="norm")(y)
        y = nn.Dense(self.dim * c.mlp_ratio, dtype=self.dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.dim, dtype=self.dtype, name="fc2")(y)
        gamma = self.param("gamma", nn.initializers.constant(1e-6), (self.dim,))
        return x + y * gamma.astype(self.dtype)


class _Stage(nn.Module):
    index: int
    config: ConvNeXtConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dim = self.config, self.config.dims[self.index]
        if self.index > 0:  # LayerNorm, then a 2x2 stride-2 convolution
            x = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="downsample_0")(x)
            x = nn.Conv(dim, (2, 2), strides=2, padding="VALID", dtype=self.dtype, name="downsample_1")(x)
        for b in range(c.depths[self.index]):
            x = _Block(dim, c, self.dtype, name=f"blocks_{b}")(x)
        return x


class ConvNeXt(nn.Module):
    """``__call__(x [B, H, W, 3])`` -> last-stage features ``[B, H/32, W/32, dims[-1]]`` (timm's
    ``forward_features``). Input normalisation is the caller's (see ``imagenet_normalize``)."""

    config: ConvNeXtConfig = ConvNeXtConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Conv(
            c.dims[0], (c.patch, c.patch), strides=c.patch, padding="VALID", dtype=self.dtype, name="stem_0"
        )(x_bhwc.astype(self.dtype))
        x = nn.LayerNorm(epsilon=c.eps, dtype=self.dtype, name="stem_1")(x)
        for s in range(len(c.depths)):
            x = _Stage(s, c, self.dtype, name=f"stages_{s}")(x)
        return x


def imagenet_normalize(x_bhwc: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> ImageNet-normalised (``(x01 - mean) / std``), the input timm's weights expect."""
    x01 = x_bhwc * 0.5 + 0.5
    return (x01 - jnp.asarray(IMAGENET_MEAN, x_bhwc.dtype)) / jnp.asarray(IMAGENET_STD, x_bhwc.dtype)


# ------------------------------------------------------------------------------------------ converter
# How a timm tensor becomes a Flax one: conv OIHW -> HWIO (a depthwise [C, 1, k, k] becomes [k, k, 1, C]),
# dense (out, in) -> (in, out), LayerNorm weight -> scale, vectors as they are.
_CONV, _DENSE, _VEC = "conv", "dense", "vector"


def timm_key_table(config: ConvNeXtConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Every timm key of ``forward_features`` -> (Flax param path, kind). Total for the config."""
    t: dict[str, tuple[tuple[str, ...], str]] = {}

    def conv(timm: str, path: tuple[str, ...]) -> None:
        t[f"{timm}.weight"] = ((*path, "kernel"), _CONV)
        t[f"{timm}.bias"] = ((*path, "bias"), _VEC)

    def dense(timm: str, path: tuple[str, ...]) -> None:
        t[f"{timm}.weight"] = ((*path, "kernel"), _DENSE)
        t[f"{timm}.bias"] = ((*path, "bias"), _VEC)

    def norm(timm: str, path: tuple[str, ...]) -> None:
        t[f"{timm}.weight"] = ((*path, "scale"), _VEC)
        t[f"{timm}.bias"] = ((*path, "bias"), _VEC)

    conv("stem.0", ("stem_0",))
    norm("stem.1", ("stem_1",))
    for s, depth in enumerate(config.depths):
        if s > 0:
            norm(f"stages.{s}.downsample.0", (f"stages_{s}", "downsample_0"))
            conv(f"stages.{s}.downsample.1", (f"stages_{s}", "downsample_1"))
        for b in range(depth):
            pre, path = f"stages.{s}.blocks.{b}", (f"stages_{s}", f"blocks_{b}")
            conv(f"{pre}.conv_dw", (*path, "conv_dw"))
            norm(f"{pre}.norm", (*path, "norm"))
            dense(f"{pre}.mlp.fc1", (*path, "fc1"))
            dense(f"{pre}.mlp.fc2", (*path, "fc2"))
            t[f"{pre}.gamma"] = ((*path, "gamma"), _VEC)
    return t


# The classifier head (and timm's optional pre-head norm) are not part of forward_features: declared
# unused, so a full timm checkpoint converts; anything else unknown is an error.
UNUSED_PREFIXES = ("head.", "norm_pre.")


def convnext_from_timm(
    source: str | os.PathLike | Mapping[str, np.ndarray], config: ConvNeXtConfig | None = None
) -> dict[str, Any]:
    """A timm ConvNeXt state dict (a safetensors path, or a mapping of NumPy arrays) -> Flax params.

    Strict: one ``InputError`` lists missing keys, unexpected keys (other than ``head.*``) and shape
    mismatches. Pickled ``.pth``/``.bin`` files are refused (never unpickled).
    """
    config = config or ConvNeXtConfig.base()
    if isinstance(source, Mapping):
        return _convert(source, config, "state dict")
    with SafetensorsFile(source) as f:
        return _convert(f, config, str(source))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: ConvNeXtConfig) -> Any:
    init = lambda: ConvNeXt(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return jax.eval_shape(init)["params"]


def _convert(src: Mapping[str, np.ndarray], config: ConvNeXtConfig, what: str) -> dict[str, Any]:
    table = timm_key_table(config)
    shapes = _param_shapes(config)
    keys = set(src)
    missing = sorted(set(table) - keys)
    unexpected = sorted(k for k in keys - set(table) if not k.startswith(UNUSED_PREFIXES))
    problems = []
    params: dict[str, Any] = {}
    for key, (path, kind) in table.items():
        if key not in keys:
            continue
        a = np.asarray(src[key])
        if kind == _CONV:
            a = np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a
        elif kind == _DENSE:
            a = a.T if a.ndim == 2 else a
        want = shapes
        for p in path:
            want = want[p]
        if tuple(a.shape) != tuple(want.shape):
            problems.append(f"{key}: {tuple(a.shape)} after layout change, expected {tuple(want.shape)}")
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(a, dtype=np.float32)
    if missing or unexpected or problems:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches", problems),
        ):
            if items:
                parts.append(
                    f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                )
        raise InputError(f"{what}: not a timm ConvNeXt checkpoint for this config: {'; '.join(parts)}")
    return params
