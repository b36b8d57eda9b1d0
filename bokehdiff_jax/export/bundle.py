"""A trained model -> the files a PyTorch user loads (``bokehdiff-jax export CKPT --to DIR [--merge]``)::

    DIR/
      pytorch_lora_weights.safetensors  the U-Net LoRA for StableDiffusionXLPipeline.load_lora_weights(DIR):
                                        PEFT names with the ``unet.`` prefix, PyTorch layouts, float32, alpha
                                        folded into B, ``lora_adapter_metadata`` (``convert.peft_files``)
      vae_encoder.safetensors           the trained VAE parts under diffusers' names (encoder.conv_in.weight,
                                        ...): vae.load_state_dict(..., strict=False) has no unexpected keys
      prompt_embeds.safetensors         the fixed prompt's embeddings (so no text encoder is needed)
      bokehdiff.json                    the model description (``convert.trained.ModelSpec``: base path and
                                        content hash, PISA placement and config, prompt, timestep, rank/alpha,
                                        targets) plus the inference hardness and the file list
      unet/                             with --merge: the base U-Net with the LoRA merged, a diffusers folder

The LoRA file is written in two streaming passes over its modules (shapes, then data), so memory holds the
trained tree plus one module; the merged U-Net streams the base tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert import mapping
from bokehdiff_jax.convert.lora import flax_lora_to_peft
from bokehdiff_jax.convert.peft_files import (
    EXPORT_FORMAT,
    EXPORT_MANIFEST,
    EXPORT_VERSION,
    LORA_WEIGHTS,
    UNET_PREFIX,
    VAE_ENCODER,
    lora_file_metadata,
)
from bokehdiff_jax.convert.trained import RANDOM, BaseTensors, Trained, check_consistent
from bokehdiff_jax.convert.weights import CONFIG, DIFFUSERS_WEIGHTS, PROMPT_EMBEDS
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path, check_apart, check_replaceable
from bokehdiff_jax.io.safetensors_io import TensorSpec, save_dict, write_safetensors

EXPORT_NAMES = r"pytorch_lora_weights\.safetensors|vae_encoder\.safetensors|prompt_embeds\.safetensors|unet"
MERGED_UNET = "unet"


def _lora_modules(lora_tree: dict[str, Any]) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """``(flax module path, {"A": a, "B": b})`` of every adapted module, in path order."""
    out = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if set(node) == {"A", "B"} and not isinstance(node["A"], dict):
            out.append((path, node))
            return
        for k in sorted(node):
            if not isinstance(node[k], dict):
                raise InputError(f"LoRA tree: leaf {'/'.join((*path, k))} is not under a module's A/B")
            walk(node[k], (*path, k))

    walk(lora_tree, ())
    return out


def _module_of(key: str) -> str:
    """``unet.<module>.lora_A.weight`` -> ``<module>``."""
    return key[len(UNET_PREFIX) :].rsplit(".lora_", 1)[0]


def _module_tensors(
    path: tuple[str, ...], factors: dict[str, Any], scale: np.float32
) -> dict[str, np.ndarray]:
    """One module's two PEFT tensors (``unet.``-prefixed, PyTorch layout, float32, ``B`` times ``scale``)."""
    sub: dict[str, Any] = {}
    node = sub
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = {k: np.asarray(v, np.float32) for k, v in factors.items()}
    out = flax_lora_to_peft(sub, prefix=UNET_PREFIX)
    if scale != 1:
        out = {k: (v * scale if ".lora_B." in k else v) for k, v in out.items()}
    return out


def write_lora_file(path: Path, trained: Trained) -> dict[str, str]:
    """Writes the diffusers LoRA file of ``trained`` (streamed); returns its metadata."""
    lora = trained.spec.lora
    modules = _lora_modules(trained.trainable["unet"]["lora"])
    scale = np.float32(lora.alpha / lora.rank)  # folded into B: loaders without metadata get the same scale
    specs: list[TensorSpec] = []
    for p, f in modules:  # pass 1: names and shapes
        specs += [TensorSpec(k, v.dtype, v.shape) for k, v in sorted(_module_tensors(p, f, scale).items())]
    metadata = lora_file_metadata(lora, sorted({_module_of(s.name) for s in specs}))

    def arrays():  # pass 2: the data, one module at a time
        for p, f in modules:
            t = _module_tensors(p, f, scale)
            yield from (t[k] for k in sorted(t))

    write_safetensors(path, specs, arrays(), metadata)
    return metadata


def write_vae_parts(path: Path, vae_params: dict[str, Any]) -> None:
    """The trained VAE parts under diffusers' names, PyTorch layouts, float32 (streamed, sorted names)."""
    leaves = {mapping.torch_shape(p, np.shape(v)): (p, v) for p, v in mapping.iter_leaves(vae_params)}
    keys = sorted(leaves)
    specs = [TensorSpec(key, np.dtype(np.float32), shape) for key, shape in keys]

    def arrays():
        for k in keys:
            p, v = leaves[k]
            yield np.ascontiguousarray(mapping.kind_of(p[-1], np.ndim(v)).to_torch(np.asarray(v)), np.float32)

    write_safetensors(path, specs, arrays(), {"format": "pt"})


def _merged_unet(dst: Path, base: str | os.PathLike, trained: Trained) -> None:
    """The base U-Net with ``W += (alpha / r) B A`` on every adapted module: a diffusers ``unet/`` folder
    in the base's dtype (the sum is computed in float32)."""
    lora = trained.spec.lora
    scale = np.float32(lora.alpha / lora.rank)
    deltas = {}
    for p, f in _lora_modules(trained.trainable["unet"]["lora"]):
        t = _module_tensors(p, f, np.float32(1))
        module = _module_of(next(iter(t)))
        prefix = f"{UNET_PREFIX}{module}.lora_"
        deltas[f"{module}.weight"] = (t[prefix + "A.weight"], t[prefix + "B.weight"])
    dst.mkdir()
    with BaseTensors(base, "unet") as base_t:
        unknown = sorted(set(deltas) - set(base_t.specs))
        if unknown:
            raise InputError(f"--merge: the base {base} has no weights for LoRA modules {unknown[:5]}")
        keys = sorted(base_t.specs)

        def arrays():
            for k in keys:
                w = base_t.read(k)
                if k in deltas:
                    a, b = deltas[k]
                    # B [out, r(,1,1)] x A [r, in(,kh,kw)]: a 1x1 conv after a k x k conv is one k x k conv
                    d = np.tensordot(b.reshape(b.shape[0], b.shape[1]), a, axes=(1, 0))
                    w = (w.astype(np.float32) + scale * d).astype(w.dtype)
                yield w

        specs = [TensorSpec(k, *base_t.specs[k]) for k in keys]
        write_safetensors(dst / DIFFUSERS_WEIGHTS, specs, arrays(), {"format": "pt"})
        shutil.copyfile(base_t.folder / CONFIG, dst / CONFIG)


def export_model(
    trained: Trained,
    dst: str | os.PathLike,
    *,
    merge: bool = False,
    base: str | os.PathLike | None = None,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> dict[str, Any]:
    """Writes ``trained`` as the export folder ``dst`` (atomically; an earlier export there is replaced,
    any other non-empty folder refused). ``base``: the base for ``merge`` (default: the one the model
    records). ``inputs``: what the caller read, never overwritten. Returns the manifest."""
    spec = trained.spec
    check_consistent(trained.trainable, spec, "trained model")
    if merge:
        base = base if base is not None else spec.base.get("path")
        if base in (None, RANDOM):
            raise InputError("--merge needs the base weights: the model records none (pass --base PATH)")
    check_apart(dst, [*inputs, *([base] if merge else [])], flag="--to")
    check_replaceable(dst, marker=EXPORT_MANIFEST, format=EXPORT_FORMAT, names=EXPORT_NAMES, flag="--to",
                      what="export")  # fmt: skip
    files = [LORA_WEIGHTS, PROMPT_EMBEDS]
    vae = trained.trainable.get("vae", {}).get("params")
    if vae:
        files.append(VAE_ENCODER)
    pisa = spec.routing.pisa
    manifest = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        **spec.to_json(),
        "inference_hardness": "inf" if pisa.hard_edge else pisa.hardness,
        "files": files + ([f"{MERGED_UNET}/"] if merge else []),
        "lora_scale_folded_into_B": spec.lora.alpha / spec.lora.rank,
        "source": trained.source,
    }
    with atomic_path(dst, is_dir=True) as tmp:
        write_lora_file(tmp / LORA_WEIGHTS, trained)
        if vae:
            write_vae_parts(tmp / VAE_ENCODER, vae)
        cond = {k: np.asarray(v, np.float32) for k, v in trained.cond.items()}
        save_dict(tmp / PROMPT_EMBEDS, cond, {"prompt": spec.prompt})
        if merge:
            _merged_unet(tmp / MERGED_UNET, base, trained)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
