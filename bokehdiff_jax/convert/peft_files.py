"""The PyTorch interchange files of a BokehDiff model, both directions: a diffusers/peft LoRA file and the
trained VAE parts, under the names diffusers and peft use.

LoRA file (``pytorch_lora_weights.safetensors``, what ``StableDiffusionXLPipeline.load_lora_weights``
reads): PEFT keys ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` in PyTorch layouts
(``convert.lora``), and in the safetensors metadata, as diffusers' ``save_lora_weights`` writes them:
``"format": "pt"`` and ``"lora_adapter_metadata"``, a JSON object of ``LoraConfig`` fields prefixed by
``"unet."`` (``r``, ``lora_alpha``, ``target_modules``...). diffusers >= 0.34 builds the adapter's
``LoraConfig`` from that metadata; older ones (0.32, the released code's pin) ignore it and use
``lora_alpha = r``, i.e. scale 1. So the scale ``alpha / r`` is *folded* into ``B`` on export and the
metadata says ``lora_alpha = r``: every loader applies the same ``B A``. Our own metadata entry
``"bokehdiff_jax"`` keeps the true alpha so an import restores ``B`` and alpha (exactly when ``alpha / r``
is a power of two, as for the default ``alpha = r``).

Reading is strict: kohya-format files (``lora_unet_*``, ``lora_down``/``lora_up``, ``.alpha``) and
diffusers' pre-peft attention-processor files are refused with a message that says so; a factor without
its partner, A and B ranks that differ, modules of different ranks, tensors that are not LoRA factors of
the U-Net and tensors whose shapes do not fit the base are listed together in one ``MappingError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert.lora import peft_to_flax_lora
from bokehdiff_jax.convert.mapping import MappingError
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import SafetensorsFile, require_float
from bokehdiff_jax.models.naming import torch_module_to_flax
from bokehdiff_jax.models.options import LoRAConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
VAE_ENCODER = "vae_encoder.safetensors"
# ``bokehdiff-jax export``'s model description (``convert.trained.ModelSpec`` JSON plus these keys).
EXPORT_MANIFEST, EXPORT_FORMAT, EXPORT_VERSION = "bokehdiff.json", "bokehdiff_jax.export", 1
RELEASED_VAE = "vae.ckpt"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
OUR_KEY = "bokehdiff_jax"
UNET_PREFIX = "unet."

_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_KOHYA = re.compile(r"^lora_(unet|te\d?)_|\.lora_(down|up)\.weight$|\.alpha$|\.hada_|\.lokr_")
_OLD_DIFFUSERS = re.compile(r"\.processor\.|_lora\.(down|up)\.weight$")


# -------------------------------------------------------------------------------------------- export
def lora_adapter_metadata(rank: int, targets: list[str], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The ``LoraConfig`` fields diffusers stores for the U-Net adapter, keys prefixed by ``prefix``.
    ``lora_alpha = rank``: the scale is folded into ``B`` (module docstring)."""
    config = {
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": "gaussian",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return {f"{prefix}{k}": v for k, v in config.items()}


def lora_file_metadata(lora: LoRAConfig, modules: list[str]) -> dict[str, str]:
    """The safetensors metadata of an exported LoRA file whose tensors cover ``modules`` (diffusers paths):
    diffusers' ``format`` and ``lora_adapter_metadata`` (scale folded: ``lora_alpha = r``) and ours (the
    true alpha and targets, for a lossless import)."""
    ours = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "targets": list(lora.targets),
        "scale_folded_into_B": True,
    }
    return {
        "format": "pt",
        METADATA_KEY: json.dumps(lora_adapter_metadata(lora.rank, modules), indent=2, sort_keys=True),
        OUR_KEY: json.dumps(ours),
    }


# -------------------------------------------------------------------------------------------- import
def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A LoRA safetensors file (or a folder holding ``pytorch_lora_weights.safetensors``) -> ``(tensors,
    metadata)``, float32 NumPy. Pickled files are refused, never unpickled."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_WEIGHTS
    with SafetensorsFile(p) as f:
        require_float(f.infos, str(p))
        return {k: np.asarray(f[k], np.float32) for k in f}, dict(f.metadata or {})


def _json_entry(metadata: Mapping[str, str], key: str, what: str) -> dict[str, Any] | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{what}: metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{what}: metadata {key!r} is not a JSON object")
    return d


def _refuse_foreign_formats(keys: list[str], what: str) -> None:
    kohya = [k for k in keys if _KOHYA.search(k)]
    if kohya:
        raise InputError(
            f"{what} is a kohya-format LoRA (keys like {kohya[0]!r}), which is not supported: load it in "
            "diffusers and save it with save_lora_weights to get a PEFT/diffusers file"
        )
    old = [k for k in keys if _OLD_DIFFUSERS.search(k)]
    if old:
        raise InputError(
            f"{what} is an old diffusers attention-processor LoRA (keys like {old[0]!r}), which is not "
            "supported: load it in diffusers and save it with save_lora_weights to get a PEFT file"
        )


@dataclasses.dataclass(frozen=True)
class PeftLoRA:
    """A parsed U-Net LoRA file. state_dict: ``{"<module>.lora_A.weight": ...}`` (no prefix, no adapter
    name, ``B`` unfolded, float32); unexpected: keys that are not U-Net LoRA factors."""

    state_dict: dict[str, np.ndarray]
    rank: int
    alpha: float
    modules: tuple[str, ...]
    unexpected: tuple[str, ...]
    what: str

    def config(self, targets: tuple[str, ...] | None = None) -> LoRAConfig:
        """Our ``LoRAConfig``; ``targets`` default to the file's module paths."""
        return LoRAConfig(
            rank=self.rank, alpha=self.alpha, targets=tuple(targets) if targets else self.modules
        )


def parse_peft(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None, what: str) -> PeftLoRA:
    """Reads a PEFT/diffusers U-Net LoRA (keys with or without ``unet.``, with or without the adapter
    name, with or without metadata): pairs, rank, alpha.

    Rank: from the tensors (every module must agree). Alpha: our metadata's true alpha (``B`` unfolded),
    else diffusers' ``lora_adapter_metadata`` ``lora_alpha``, else ``rank`` (diffusers' convention without
    metadata: scale 1). Refuses kohya and old diffusers files; a missing factor, A/B rank disagreement or
    modules of different ranks raise one ``MappingError`` (with the keys that are no LoRA factors).
    """
    metadata = metadata or {}
    keys = sorted(tensors)
    _refuse_foreign_formats(keys, what)
    ours = _json_entry(metadata, OUR_KEY, what)
    diffusers_meta = _json_entry(metadata, METADATA_KEY, what) or {}
    peft_meta = {k[len(UNET_PREFIX) :]: v for k, v in diffusers_meta.items() if k.startswith(UNET_PREFIX)}

    unexpected: list[str] = []
    mismatched: list[str] = []
    factors: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key in keys:
        name = key[len(UNET_PREFIX) :] if key.startswith(UNET_PREFIX) else key
        m = _FACTOR.fullmatch(name)
        if name.startswith(("text_encoder", "te_")) or m is None:
            unexpected.append(key)
            continue
        factors.setdefault(m["module"], {})[m["factor"]] = (key, np.asarray(tensors[key], np.float32))
    ranks: dict[str, int] = {}
    for module, fs in sorted(factors.items()):
        if set(fs) != {"A", "B"}:
            have = next(iter(fs))
            mismatched.append(f"{fs[have][0]}: lora_{'B' if have == 'A' else 'A'} of {module} is missing")
            continue
        a, b = fs["A"][1], fs["B"][1]
        if a.ndim not in (2, 4) or b.ndim != a.ndim:
            mismatched.append(f"{module}: A {a.shape} and B {b.shape} are not a Linear or Conv2d LoRA pair")
        elif a.shape[0] != b.shape[1]:
            mismatched.append(
                f"{module}: rank differs between A {a.shape} (rank {a.shape[0]}) and B {b.shape}"
            )
        else:
            ranks[module] = a.shape[0]
    if not keys:
        raise InputError(f"{what}: holds no tensors")
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        by_rank = {r: sorted(m for m, x in ranks.items() if x == r) for r in distinct}
        mismatched.append(
            "modules have different ranks (one rank per model is supported): "
            + "; ".join(f"rank {r}: {len(ms)} modules, e.g. {ms[0]}" for r, ms in by_rank.items())
        )
    rank = distinct[0] if len(distinct) == 1 else 0
    if rank and "r" in peft_meta and int(peft_meta["r"]) != rank:
        mismatched.append(f"metadata says r={peft_meta['r']} but the tensors have rank {rank}")
    if peft_meta.get("rank_pattern") or peft_meta.get("alpha_pattern"):
        mismatched.append(
            "metadata has a rank_pattern/alpha_pattern (per-module ranks or alphas): not supported"
        )
    if not ranks and not mismatched:
        mismatched.append("no complete lora_A/lora_B pair of a U-Net module")
    if mismatched:
        raise MappingError([], unexpected, mismatched, what)

    unfold = 1.0
    if ours is not None:
        alpha = float(ours["alpha"])
        if ours.get("scale_folded_into_B"):
            unfold = alpha / rank
    elif "lora_alpha" in peft_meta:
        alpha = float(peft_meta["lora_alpha"])
    else:
        alpha = float(rank)
    state_dict = {}
    for module in sorted(ranks):
        a, b = factors[module]["A"][1], factors[module]["B"][1]
        if unfold != 1.0:
            # Undo the export's fold: exact when alpha / rank is a power of two (the default is 1).
            b = (b / np.float32(unfold)).astype(np.float32)
        state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"] = a, b
    return PeftLoRA(state_dict, rank, alpha, tuple(sorted(ranks)), tuple(unexpected), what)


def peft_to_tree(lora: PeftLoRA, abstract_lora_tree: Any) -> dict[str, Any]:
    """The parsed LoRA as our ``"lora"`` tree shaped like ``abstract_lora_tree``, strictly: modules the
    tree lacks, modules of the tree the file lacks, shapes that do not fit (a LoRA for another base) and
    the file's non-LoRA keys are listed in one ``MappingError``."""
    try:
        tree = peft_to_flax_lora(lora.state_dict, abstract_lora_tree, prefix="")
    except MappingError as e:
        raise MappingError(
            e.missing, sorted([*lora.unexpected, *e.unexpected]), e.mismatched, lora.what
        ) from None
    if lora.unexpected:
        raise MappingError([], list(lora.unexpected), [], lora.what)
    return tree


def lora_shapes(unet_shapes: Mapping[str, tuple[int, ...]], lora: LoRAConfig) -> dict[str, Any]:
    """The ``"lora"`` collection's shapes (``jax.ShapeDtypeStruct``, float32) for a U-Net given by its
    diffusers weight shapes (a safetensors header: no weights read, no model traced).

    Every Linear (2-D ``weight``) and Conv2d (4-D) whose module path ``lora.applies_to`` gets
    ``A [in, r]`` / ``[kh, kw, in, r]`` and ``B [r, out]``: the layouts of ``convert.lora``, the modules
    ``models.layers`` adapts (tests/convert/test_peft_files.py checks it against the model's own init).
    """
    import jax

    tree: dict[str, Any] = {}
    r = lora.rank
    for key in sorted(unet_shapes):
        module, _, leaf = key.rpartition(".")
        shape = tuple(unet_shapes[key])
        if leaf != "weight" or len(shape) not in (2, 4) or not lora.applies_to(module):
            continue
        a = (shape[1], r) if len(shape) == 2 else (shape[2], shape[3], shape[1], r)
        node = tree
        for name in torch_module_to_flax(module):
            node = node.setdefault(name, {})
        node["A"] = jax.ShapeDtypeStruct(a, np.float32)
        node["B"] = jax.ShapeDtypeStruct((r, shape[0]), np.float32)
    return tree


def lora_from_peft(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None,
    unet_shapes: Mapping[str, tuple[int, ...]],
    *,
    targets: tuple[str, ...] | None = None,
    what: str = "LoRA file",
) -> tuple[dict[str, Any], LoRAConfig]:
    """``parse_peft`` then ``peft_to_tree`` for the U-Net whose diffusers weight shapes are
    ``unet_shapes``: ``(our "lora" tree (float32 NumPy), LoRAConfig)``. ``targets``: the ``LoRAConfig``
    targets to record (default: the file's module paths); the file must cover exactly the modules they
    select."""
    parsed = parse_peft(tensors, metadata, what)
    config = parsed.config(targets)
    return peft_to_tree(parsed, lora_shapes(unet_shapes, config)), config


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat ``{name: tensor}`` torch pickle (the released code's ``vae.ckpt``) -> float32 NumPy, read only
    through ``torch.load(weights_only=True)`` (no arbitrary code runs). Needs the ``torch`` extra."""
    try:
        import torch
    except ImportError:
        raise InputError(
            f"reading {path} (a PyTorch pickle) needs the torch extra: pip install 'bokehdiff_jax[torch]'"
        ) from None
    try:
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        raise InputError(
            f"{path}: not a loadable weights-only PyTorch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: expected a flat dict of tensors (a state dict)")
    bad = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if bad:
        raise InputError(f"{path}: non-float tensors {bad[:5]}")
    return {str(k): v.detach().to(torch.float32).numpy() for k, v in sd.items()}
