"""Architecture constants of the SDXL U-Net and VAE, as frozen dataclasses built from diffusers'
``config.json``.

``from_diffusers`` is strict: a key it does not know, or a value for a feature this port does not
implement (say ``resnet_time_scale_shift="scale_shift"``), is an ``InputError`` naming the key, never
silently ignored. Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from bokehdiff_jax.errors import InputError

# A copy of the exact public SDXL configs (SPEC section 3), shipped with the package.
SDXL_CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_configs"

_ANY = object()  # a key whose value this port may ignore

# diffusers UNet2DConditionModel arguments this port implements by value, or requires at a fixed value.
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": _ANY,  # only read by the "text" embedding type
}
_UNET_VALUE_KEYS = (
    "sample_size in_channels out_channels flip_sin_to_cos freq_shift down_block_types up_block_types "
    "block_out_channels layers_per_block norm_num_groups norm_eps cross_attention_dim "
    "transformer_layers_per_block attention_head_dim num_attention_heads use_linear_projection "
    "addition_embed_type addition_time_embed_dim projection_class_embeddings_input_dim upcast_attention"
).split()

_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "latents_mean": None,
    "latents_std": None,
}
_VAE_VALUE_KEYS = (
    "in_channels out_channels down_block_types up_block_types block_out_channels layers_per_block "
    "latent_channels norm_num_groups sample_size scaling_factor shift_factor force_upcast "
    "use_quant_conv use_post_quant_conv mid_block_add_attention"
).split()


def _load(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no diffusers config at {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _check(cfg: dict[str, Any], fixed: dict[str, Any], value_keys: list[str], what: str) -> None:
    for key, value in cfg.items():
        if key.startswith("_") or key in value_keys:
            continue
        if key not in fixed:
            raise InputError(f"{what} config: unknown key {key!r}")
        if fixed[key] is _ANY:
            continue
        allowed = fixed[key] if isinstance(fixed[key], tuple) else (fixed[key],)
        if value not in allowed:
            raise InputError(f"{what} config: {key}={value!r} is not supported (expected {fixed[key]!r})")


def _per_block(value: Any, n: int, key: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise InputError(f"U-Net config: {key} must be an int or a list of {n} ints, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tuple_of(v: Any, ok: Any) -> bool:
    return isinstance(v, tuple) and all(ok(x) for x in v)


_TYPE_CHECKS: dict[str, tuple[str, Any]] = {
    "int": ("an int", _is_int),
    "int | None": ("an int or null", lambda v: v is None or _is_int(v)),
    "float": ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "tuple[int, ...]": ("a list of ints", lambda v: _tuple_of(v, _is_int)),
    "tuple[str, ...]": ("a list of names", lambda v: _tuple_of(v, lambda x: isinstance(x, str))),
}


def _check_types(cfg: Any, what: str) -> None:
    """A config value of the wrong JSON type (``"2"`` for ``2``) is an ``InputError`` naming the key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "sample_size":  # metadata only: diffusers allows an int or an (h, w) list
            continue
        expected, ok = _TYPE_CHECKS.get(f.type, (None, None))
        if ok is not None and not ok(value):
            raise InputError(f"{what} config: {f.name} must be {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A diffusers ``UNet2DConditionModel`` of the SDXL family (ResNet blocks, linear-projection
    transformers with GEGLU, optional ``text_time`` added conditioning).

    Per-block tuples follow ``down_block_types``; the up path uses them reversed, as diffusers does.
    ``num_attention_heads`` is the true head count (diffusers' ``attention_head_dim`` when its
    ``num_attention_heads`` is null, a historical misnomer).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: int = 2048
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = True
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int | None = 256
    projection_class_embeddings_input_dim: int | None = 2816
    upcast_attention: bool = False
    sample_size: int | None = 128
    # text_time micro-conditioning ids: 6 for SDXL base (original size, crop, target size), 5 for the
    # refiner (original size, crop, aesthetic score). Not in diffusers' U-Net config (its pipeline's
    # requires_aesthetics_score says it), so from_diffusers takes it as an argument.
    num_time_ids: int = 6

    def __post_init__(self) -> None:
        _check_types(self, "U-Net")
        n = len(self.block_out_channels)
        for name in (
            "down_block_types",
            "up_block_types",
            "transformer_layers_per_block",
            "num_attention_heads",
        ):
            if len(getattr(self, name)) != n:
                raise InputError(f"U-Net config: {name} needs {n} entries (one per block)")
        for t in self.down_block_types:
            if t not in ("DownBlock2D", "CrossAttnDownBlock2D"):
                raise InputError(f"U-Net config: down block type {t!r} is not supported")
        for t in self.up_block_types:
            if t not in ("UpBlock2D", "CrossAttnUpBlock2D"):
                raise InputError(f"U-Net config: up block type {t!r} is not supported")
        for c, h in zip(self.block_out_channels, self.num_attention_heads, strict=True):
            if c % h or c % self.norm_num_groups:
                raise InputError(
                    f"U-Net config: {c} channels must divide by the head count {h} and by "
                    f"norm_num_groups {self.norm_num_groups}"
                )
        if self.addition_embed_type not in (None, "text_time"):
            raise InputError(
                f"U-Net config: addition_embed_type {self.addition_embed_type!r} is not supported"
            )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise InputError(
                "U-Net config: text_time needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.addition_embed_type == "text_time" and self.text_embeds_dim < 1:
            raise InputError(
                "U-Net config: projection_class_embeddings_input_dim "
                f"{self.projection_class_embeddings_input_dim} leaves no room for the pooled text "
                f"embedding beside {self.num_time_ids} time ids of width {self.addition_time_embed_dim}"
            )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def text_embeds_dim(self) -> int:
        """Width of the pooled text embedding that ``text_time`` expects (1280 for SDXL; 0 without)."""
        if self.addition_embed_type != "text_time":
            return 0
        return self.projection_class_embeddings_input_dim - self.num_time_ids * self.addition_time_embed_dim

    @classmethod
    def sdxl(cls) -> UNetConfig:
        return cls.from_diffusers(SDXL_CONFIG_DIR / "unet_config.json")

    @classmethod
    def from_diffusers(
        cls, config: str | os.PathLike | dict[str, Any], *, num_time_ids: int = 6
    ) -> UNetConfig:
        """From a diffusers ``config.json`` (its path, its folder, or the parsed dict); ``num_time_ids``
        5 for a refiner-style U-Net (see the field)."""
        cfg = _load(config)
        _check(cfg, _UNET_FIXED, _UNET_VALUE_KEYS, "U-Net")
        defaults = {
            "in_channels": 4,
            "out_channels": 4,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "cross_attention_dim": 1280,
            "use_linear_projection": False,
        }
        get = lambda k: cfg.get(k, defaults.get(k))
        try:
            blocks = tuple(cfg["block_out_channels"])
            n = len(blocks)
            heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
            cross = get("cross_attention_dim")
            if not isinstance(cross, int):
                raise InputError(f"U-Net config: cross_attention_dim must be one int, got {cross!r}")
            return cls(
                in_channels=get("in_channels"),
                out_channels=get("out_channels"),
                block_out_channels=blocks,
                down_block_types=tuple(cfg["down_block_types"]),
                up_block_types=tuple(cfg["up_block_types"]),
                layers_per_block=get("layers_per_block"),
                transformer_layers_per_block=_per_block(
                    cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
                ),
                num_attention_heads=_per_block(heads, n, "attention_head_dim"),
                cross_attention_dim=cross,
                norm_num_groups=get("norm_num_groups"),
                norm_eps=float(get("norm_eps")),
                flip_sin_to_cos=bool(get("flip_sin_to_cos")),
                freq_shift=get("freq_shift"),
                use_linear_projection=bool(get("use_linear_projection")),
                addition_embed_type=cfg.get("addition_embed_type"),
                addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
                projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
                upcast_attention=bool(cfg.get("upcast_attention")),
                sample_size=cfg.get("sample_size"),
                num_time_ids=num_time_ids,
            )
        except KeyError as e:
            raise InputError(f"U-Net config: missing key {e.args[0]!r}") from None
        except InputError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. a string for a list
            raise InputError(f"U-Net config: malformed value ({e})") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DConditionModel`` config (for building reference models)."""
        return {
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "layers_per_block": self.layers_per_block,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "attention_head_dim": list(self.num_attention_heads),
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "use_linear_projection": self.use_linear_projection,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "upcast_attention": self.upcast_attention,
        }


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A diffusers ``AutoencoderKL`` (``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int | None = 1024

    def __post_init__(self) -> None:
        _check_types(self, "VAE")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise InputError(
                    f"VAE config: {c} channels must divide by norm_num_groups {self.norm_num_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return cls.from_diffusers(SDXL_CONFIG_DIR / "vae_config.json")

    @classmethod
    def from_diffusers(cls, config: str | os.PathLike | dict[str, Any]) -> VAEConfig:
        cfg = _load(config)
        _check(cfg, _VAE_FIXED, _VAE_VALUE_KEYS, "VAE")
        n = len(cfg.get("block_out_channels", (64,)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = cfg.get(key, (kind,))
            if list(types) != [kind] * n:
                raise InputError(f"VAE config: {key} must be {n} x {kind!r}, got {types!r}")
        d = {
            k: cfg[k] for k in _VAE_VALUE_KEYS if k in cfg and k not in ("down_block_types", "up_block_types")
        }
        if "block_out_channels" in d:
            d["block_out_channels"] = tuple(d["block_out_channels"])
        if d.get("shift_factor") is None:
            d["shift_factor"] = 0.0
        # diffusers' own defaults where the file is silent (they differ from SDXL's).
        base = {
            "block_out_channels": (64,),
            "layers_per_block": 1,
            "scaling_factor": 0.18215,
            "sample_size": 32,
        }
        try:
            return cls(**{**base, **d})
        except InputError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. a string for a list
            raise InputError(f"VAE config: malformed value ({e})") from None

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }
