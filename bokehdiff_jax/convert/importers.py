"""PyTorch-side BokehDiff weights -> our trained-model folder (``convert.trained``), strictly.

- ``import_released``: the released code's checkpoint folder: ``pytorch_lora_weights.safetensors`` (written
  by ``unet.save_attn_procs``: PEFT keys without the ``unet.`` prefix, no alpha metadata: rank 8, alpha 8)
  and ``vae.ckpt`` (a torch pickle of the trained VAE parts, read only by ``torch.load(weights_only=True)``).
  PISA is set to the released code's conventions (``units="released"``, ``t_from_query=True``) so the
  weights see the attention they were trained with.
- ``import_lora``: any PEFT/diffusers SDXL U-Net LoRA (with or without the prefix, with or without
  metadata), or a folder written by ``bokehdiff-jax export`` (its ``bokehdiff.json``, VAE parts and prompt
  embeddings come along, so ours -> export -> import is bit-identical).

The base (our checkpoint or a diffusers folder) gives the architecture, the fingerprint that the result
records, the VAE parts when the source has none (the base's own values: a start for training) and the
fixed-prompt embeddings when the source has none.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert import mapping
from bokehdiff_jax.convert.peft_files import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    LORA_WEIGHTS,
    RELEASED_VAE,
    VAE_ENCODER,
    parse_peft,
    peft_to_tree,
    read_lora_file,
    read_torch_state_dict,
)
from bokehdiff_jax.convert.prompt import FIXED_PROMPT
from bokehdiff_jax.convert.trained import (
    ModelSpec,
    Trained,
    abstract_trainable,
    base_configs,
    base_fingerprint,
    base_prompt,
    flatten,
    unet_shapes,
    unflatten,
)
from bokehdiff_jax.convert.weights import PARAMS, PROMPT_EMBEDS, load_prompt_embeds, resolve
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import SafetensorsFile, open_diffusers_weights, require_float
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS
from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE
from bokehdiff_jax.pisa.config import PisaConfig

# The released model's attention: its distance units and its t range (SPEC section 2).
RELEASED_PISA = PisaConfig(units="released", t_from_query=True)
_TEXT_ENCODER_DIRS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def base_reference(base: str | os.PathLike, fingerprint: bool = True) -> dict[str, Any]:
    """``{"path": absolute path, "fingerprint": {component: sha256} or None}``."""
    return {"path": str(Path(base).resolve()), "fingerprint": base_fingerprint(base) if fingerprint else None}


def prompt_for_base(base: str | os.PathLike, unet_config: Any, prompt_seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed prompt's embeddings for a base, in ``convert.base.load_base``'s order: our checkpoint's
    stored ones, else the pipeline folder's text encoders (torch extra), else seeded random ones (with a
    warning: right only for a model trained from scratch)."""
    stored = base_prompt(base)
    if stored is not None:
        return stored
    path = Path(base)
    if all((path / d).is_dir() for d in _TEXT_ENCODER_DIRS):
        from bokehdiff_jax.convert.prompt import encode_prompt  # imports torch: only here

        return encode_prompt(path, FIXED_PROMPT)
    from bokehdiff_jax.models.bokehdiff import random_prompt_embeds

    warnings.warn(
        f"{base} has no {PROMPT_EMBEDS} and no text encoders: using fixed random prompt embeddings from seed "
        f"{prompt_seed} (right only for a model trained from scratch)",
        stacklevel=2,
    )
    return random_prompt_embeds(unet_config, prompt_seed)


def _vae_parts(tensors: Any, abstract: dict[str, Any], what: str) -> dict[str, Any]:
    """diffusers-named VAE tensors -> our VAE-parts tree (float32), strictly one to one."""
    return mapping.diffusers_to_flax(tensors, abstract, dtype=np.float32, what=what)


def base_vae_parts(base: str | os.PathLike, abstract: dict[str, Any]) -> dict[str, Any]:
    """The base's own values of the VAE parts shaped by ``abstract`` (float32; when the source has none)."""
    folder, ours = resolve(base, "vae")
    if ours:
        with SafetensorsFile(folder / PARAMS) as f:
            return unflatten({k: np.asarray(f[k], np.float32) for k in flatten(abstract)})
    with open_diffusers_weights(folder, None) as w:
        keys = {mapping.flax_key(p) for p, _ in mapping.iter_leaves(abstract)}
        return _vae_parts({k: w[k] for k in keys if k in w.infos}, abstract, str(folder))


def _assemble(
    parsed: Any,
    spec: ModelSpec,
    vae: Any,
    cond: dict[str, np.ndarray] | None,
    base: str | os.PathLike,
    source: str,
) -> Trained:
    abstract = abstract_trainable(spec, unet_shapes(base))
    lora = peft_to_tree(parsed, abstract["unet"]["lora"])
    trainable: dict[str, Any] = {"unet": {"lora": lora}}
    if "vae" in abstract:
        parts = abstract["vae"]["params"]
        vae_tree = (
            base_vae_parts(base, parts) if vae is None else _vae_parts(vae, parts, f"{source} VAE parts")
        )
        trainable["vae"] = {"params": vae_tree}
    elif vae is not None and len(vae):
        raise InputError(f"{source}: has VAE weights but the model trains no VAE parts")
    if cond is None:
        cond = prompt_for_base(base, spec.unet_config)
    return Trained(trainable, {k: np.asarray(v, np.float32) for k, v in cond.items()}, spec, source)


def import_released(src: str | os.PathLike, base: str | os.PathLike, *, fingerprint: bool = True) -> Trained:
    """The released code's checkpoint folder (``pytorch_lora_weights.safetensors`` + ``vae.ckpt``) on
    ``base`` -> ``Trained`` (SPEC's LoRA targets and VAE parts, rank from the file, alpha = rank)."""
    src = Path(src)
    lora_path, vae_path = src / LORA_WEIGHTS, src / RELEASED_VAE
    missing = [p.name for p in (lora_path, vae_path) if not p.is_file()]
    if missing:
        raise InputError(f"{src}: not a released BokehDiff checkpoint folder (no {', '.join(missing)})")
    tensors, metadata = read_lora_file(lora_path)
    parsed = parse_peft(tensors, metadata, str(lora_path))
    unet_config, vae_config = base_configs(base)
    spec = ModelSpec(
        unet_config=unet_config,
        vae_config=vae_config,
        lora=parsed.config(SPEC_LORA_TARGETS),
        vae_parts=SPEC_VAE_TRAINABLE,
        routing=AttentionRouting(pisa=RELEASED_PISA),
        timestep=499,
        prompt=FIXED_PROMPT,
        base=base_reference(base, fingerprint),
    )
    vae = read_torch_state_dict(vae_path)
    return _assemble(parsed, spec, vae, None, base, str(src))


def _read_export_manifest(folder: Path) -> dict[str, Any]:
    p = folder / EXPORT_MANIFEST
    try:
        m = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != EXPORT_FORMAT:
        raise InputError(f'{p}: not a bokehdiff_jax export manifest (need "format": "{EXPORT_FORMAT}")')
    return m


def import_lora(
    src: str | os.PathLike,
    base: str | os.PathLike,
    *,
    vae: str | os.PathLike | None = None,
    fingerprint: bool = True,
) -> Trained:
    """A PEFT/diffusers U-Net LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``; an export
    folder brings its model description, VAE parts and prompt embeddings) on ``base`` -> ``Trained``.

    ``vae``: a safetensors file of the trained VAE parts under diffusers' names (default: the export
    folder's ``vae_encoder.safetensors``, else the base's own values). Without an export manifest the model
    gets SPEC's PISA placement and conventions, timestep 499 and the fixed prompt.
    """
    src = Path(src)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    folder = src if src.is_dir() else None
    tensors, metadata = read_lora_file(src)
    lora_what = str(src / LORA_WEIGHTS if folder else src)
    parsed = parse_peft(tensors, metadata, lora_what)
    unet_config, vae_config = base_configs(base)
    exported = folder is not None and (folder / EXPORT_MANIFEST).is_file()
    if exported:
        described = ModelSpec.from_json(_read_export_manifest(folder), str(folder / EXPORT_MANIFEST))
        spec = ModelSpec(
            unet_config=unet_config,
            vae_config=vae_config,
            lora=parsed.config(described.lora.targets),
            vae_parts=described.vae_parts,
            routing=described.routing,
            timestep=described.timestep,
            prompt=described.prompt,
            base=base_reference(base, fingerprint),
        )
        if (unet_config, vae_config) != (described.unet_config, described.vae_config):
            raise InputError(f"{base}: its architecture differs from the one {folder} was trained on")
    else:
        spec = ModelSpec(
            unet_config=unet_config,
            vae_config=vae_config,
            lora=parsed.config(),
            vae_parts=SPEC_VAE_TRAINABLE,
            routing=AttentionRouting(),
            timestep=499,
            prompt=FIXED_PROMPT,
            base=base_reference(base, fingerprint),
        )
    vae_file = Path(vae) if vae is not None else (folder / VAE_ENCODER if exported else None)
    cond = load_prompt_embeds(folder) if exported and (folder / PROMPT_EMBEDS).is_file() else None
    if vae_file is None:
        return _assemble(parsed, spec, None, cond, base, str(src))
    with SafetensorsFile(vae_file) as f:  # read lazily, one tensor at a time, by the strict mapping
        require_float(f.infos, str(vae_file))
        return _assemble(parsed, spec, f, cond, base, str(src))
