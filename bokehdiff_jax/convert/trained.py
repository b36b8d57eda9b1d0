"""A trained BokehDiff model as one folder (our format): the trainable weights, the fixed conditioning and
everything needed to rebuild the model around a base, without optimiser state.

It is what ``bokehdiff-jax convert from-bokehdiff`` / ``from-lora`` write (imported weights, ready for
inference or as the start of further training) and one of the sources ``bokehdiff-jax export`` reads (the
other is a training workdir). Layout (version 1)::

    DIR/
      bokehdiff_model.json      manifest: {"format": "bokehdiff_jax.trained", "version": 1, "base": {"path",
                                "fingerprint"}, "unet_config", "vae_config" (diffusers config dicts), "lora":
                                {"rank", "alpha", "targets"}, "vae_parts", "pisa_paths", "pisa" (PisaConfig
                                fields), "timestep", "prompt", "source"}
      trainable.safetensors     the trainable tree of ``models.partition.split``, float32, Flax layout;
                                key = "/".join(path): "unet/lora/<module path>/A", "vae/params/encoder/..."
      prompt_embeds.safetensors the fixed prompt's embeddings (as in our base checkpoint format)

The base model is not copied: ``base.fingerprint`` (``base_fingerprint``) identifies its weights by
content, independent of layout (our checkpoint or a diffusers folder of the same weights hash the same).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert import mapping
from bokehdiff_jax.convert.weights import (
    PARAMS,
    PROMPT_EMBEDS,
    load_prompt_embeds,
    read_config,
    resolve,
)
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path, check_apart, check_replaceable
from bokehdiff_jax.io.safetensors_io import (
    SafetensorsFile,
    TensorSpec,
    open_diffusers_weights,
    save_dict,
    write_safetensors,
)
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.options import LoRAConfig
from bokehdiff_jax.models.partition import PartitionConfig
from bokehdiff_jax.pisa.config import PisaConfig

TRAINED_FORMAT, TRAINED_VERSION = "bokehdiff_jax.trained", 1
TRAINED_MANIFEST = "bokehdiff_model.json"
TRAINABLE = "trainable.safetensors"
TRAINED_NAMES = r"bokehdiff_model\.json|trainable\.safetensors|prompt_embeds\.safetensors"
RANDOM = "random"


def pisa_to_json(config: PisaConfig) -> dict[str, Any]:
    """A ``PisaConfig`` as JSON (``math.inf`` hardness as the string ``"inf"``)."""
    d = dataclasses.asdict(config)
    if math.isinf(d["hardness"]):
        d["hardness"] = "inf"
    return d


def pisa_from_json(d: Mapping[str, Any], what: str) -> PisaConfig:
    fields = {f.name for f in dataclasses.fields(PisaConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise InputError(f"{what}: unknown PISA config keys {unknown} (known: {sorted(fields)})")
    d = dict(d)
    if d.get("hardness") == "inf":
        d["hardness"] = math.inf
    return PisaConfig(**d)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What rebuilds the model around a base: architectures, LoRA, trained VAE parts, PISA, one-step
    timestep, prompt, and the base reference ``{"path": str, "fingerprint": {component: sha256} | None}``."""

    unet_config: UNetConfig
    vae_config: VAEConfig
    lora: LoRAConfig
    vae_parts: tuple[str, ...]
    routing: AttentionRouting
    timestep: int
    prompt: str
    base: dict[str, Any]

    @property
    def partition(self) -> PartitionConfig:
        return PartitionConfig(trainable="lora", lora=self.lora, vae_parts=self.vae_parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "unet_config": self.unet_config.to_diffusers(),
            "num_time_ids": self.unet_config.num_time_ids,
            "vae_config": self.vae_config.to_diffusers(),
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": list(self.lora.targets)},
            "vae_parts": list(self.vae_parts),
            "pisa_paths": list(self.routing.pisa_paths),
            "pisa": pisa_to_json(self.routing.pisa),
            "timestep": self.timestep,
            "prompt": self.prompt,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], what: str) -> ModelSpec:
        try:
            lora = d["lora"]
            return cls(
                unet_config=UNetConfig.from_diffusers(d["unet_config"], num_time_ids=int(d["num_time_ids"])),
                vae_config=VAEConfig.from_diffusers(d["vae_config"]),
                lora=LoRAConfig(int(lora["rank"]), float(lora["alpha"]), tuple(lora["targets"])),
                vae_parts=tuple(d["vae_parts"]),
                routing=AttentionRouting(tuple(d["pisa_paths"]), pisa_from_json(d["pisa"], what)),
                timestep=int(d["timestep"]),
                prompt=str(d["prompt"]),
                base=dict(d["base"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{what}: malformed model description ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
    """A trained model in memory. trainable: ``{"unet": {"lora": ...}, "vae": {"params": ...}}`` (NumPy
    float32 leaves, Flax layout); cond: ``{"prompt_embeds": [1, L, C], "text_embeds": [1, P]}``."""

    trainable: dict[str, Any]
    cond: dict[str, np.ndarray]
    spec: ModelSpec
    source: str = ""


# ------------------------------------------------------------------------------------ abstract trees
def unet_shapes(base: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The base U-Net's diffusers weight names and PyTorch-layout shapes, from the file header only."""
    with BaseTensors(base, "unet") as t:
        return {k: shape for k, (_, shape) in t.specs.items()}


@functools.lru_cache(maxsize=8)
def abstract_vae_parts(vae_config: VAEConfig, parts: tuple[str, ...]) -> dict[str, Any]:
    """The trained VAE parts' Flax shapes (``jax.eval_shape`` of the VAE: no weights made; cached, do not
    modify the result)."""
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.models.partition import split
    from bokehdiff_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL(config=vae_config)
    f = vae_config.downsample_factor
    x = jnp.zeros((1, f, f, vae_config.in_channels), jnp.float32)
    params = jax.eval_shape(lambda k: vae.init(k, x)["params"], jax.random.key(0))
    config = PartitionConfig(trainable="lora", vae_parts=parts)
    # split cuts the VAE parts of a LoRA run, whose variables must hold a LoRA collection: a placeholder.
    trainable, _ = split({"unet": {"lora": {"_": {}}}, "vae": {"params": params}}, config)
    return trainable.get("vae", {}).get("params", {})


def abstract_trainable(spec: ModelSpec, unet_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The trainable tree's shapes for ``spec`` on the U-Net whose weight shapes are ``unet_shapes``."""
    from bokehdiff_jax.convert.peft_files import lora_shapes

    out: dict[str, Any] = {"unet": {"lora": lora_shapes(unet_shapes, spec.lora)}}
    if spec.vae_parts:
        out["vae"] = {"params": abstract_vae_parts(spec.vae_config, spec.vae_parts)}
    return out


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` in sorted key order."""
    return {"/".join(p): v for p, v in mapping.iter_leaves(tree, prefix)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = v
    return out


def check_trainable(trainable: Mapping[str, Any], abstract: Mapping[str, Any], what: str) -> None:
    """Strict: the tree's names and shapes equal ``abstract``'s, one to one (one error lists all)."""
    want = {k: tuple(v.shape) for k, v in flatten(abstract).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(trainable).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    both = sorted(set(want) & set(got))
    mismatched = [f"{k}: {got[k]}, expected {want[k]}" for k in both if got[k] != want[k]]
    if missing or unexpected or mismatched:
        raise mapping.MappingError(missing, unexpected, mismatched, what)


def check_consistent(trainable: Mapping[str, Any], spec: ModelSpec, what: str) -> None:
    """What can be checked without a base: the groups, every LoRA module has ``A`` and ``B`` of the
    spec's rank, the VAE parts are exactly the spec's (shapes from the VAE config)."""
    groups = {k: sorted(v) for k, v in trainable.items()}
    want_groups = {"unet": ["lora"], **({"vae": ["params"]} if spec.vae_parts else {})}
    if groups != want_groups:
        raise InputError(f"{what}: holds groups {groups}, expected {want_groups}")
    bad = []
    for key, leaf in flatten(trainable["unet"]["lora"]).items():
        shape = np.shape(leaf)
        factor = key.rsplit("/", 1)[-1]
        r = shape[-1] if factor == "A" else shape[0] if len(shape) == 2 else None
        if factor not in ("A", "B") or r != spec.lora.rank:
            bad.append(f"unet/lora/{key}: {shape} (rank {spec.lora.rank} expected)")
    if bad:
        raise mapping.MappingError([], [], bad, what)
    if spec.vae_parts:
        check_trainable(trainable["vae"]["params"], abstract_vae_parts(spec.vae_config, spec.vae_parts), what)


# --------------------------------------------------------------------------------------- base identity
class BaseTensors:
    """A base component's weights as diffusers names and PyTorch layouts, read one tensor at a time, from
    our checkpoint (converted on the fly) or a diffusers folder. A context manager.

    ``specs``: ``{diffusers key: (dtype, torch shape)}`` from the header (no data read); ``read(key)``: the
    tensor. ``folder``: the component folder (its ``config.json`` is the diffusers config)."""

    def __init__(self, base: str | os.PathLike, component: str):
        self.folder, ours = resolve(base, component)
        self._file = (
            SafetensorsFile(self.folder / PARAMS) if ours else open_diffusers_weights(self.folder, None)
        )
        self._source: dict[str, str] = {}  # diffusers key -> stored key
        self.specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for k, info in self._file.infos.items():
            key, shape = (
                mapping.torch_shape(tuple(k.split("/")), info.shape) if ours else (k, tuple(info.shape))
            )
            self._source[key] = k
            self.specs[key] = (info.dtype, tuple(shape))
        self._ours = ours

    def read(self, key: str) -> np.ndarray:
        stored = self._source[key]
        arr = self._file[stored]
        if self._ours:
            path = tuple(stored.split("/"))
            return np.ascontiguousarray(mapping.kind_of(path[-1], arr.ndim).to_torch(arr))
        return arr

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BaseTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def base_fingerprint(base: str | os.PathLike) -> dict[str, str]:
    """``{"unet": sha256, "vae": sha256}`` of a base's weights, by content: each tensor's diffusers name,
    shape and value as float32 in PyTorch layout, in name order. Our checkpoint and a diffusers folder of
    the same weights give the same digest, whatever their storage dtype holds exactly (a bf16 copy of fp32
    weights differs: its values do). Streams one tensor at a time."""
    out = {}
    for component in ("unet", "vae"):
        total = hashlib.sha256()
        with BaseTensors(base, component) as t:
            for key in sorted(t.specs):
                arr = t.read(key)
                total.update(f"{key}:{tuple(arr.shape)}:".encode())
                total.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
                del arr
        out[component] = total.hexdigest()
    return out


def base_configs(base: str | os.PathLike) -> tuple[UNetConfig, VAEConfig]:
    """The U-Net and VAE architectures of a base (our checkpoint or a diffusers folder); no weights read."""
    from bokehdiff_jax.convert.weights import time_ids_of

    unet_folder, _ = resolve(base, "unet")
    vae_folder, _ = resolve(base, "vae")
    unet = UNetConfig.from_diffusers(read_config(unet_folder), num_time_ids=time_ids_of(unet_folder))
    return unet, VAEConfig.from_diffusers(read_config(vae_folder))


def base_prompt(base: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The base's stored fixed-prompt embeddings (our checkpoint's ``prompt_embeds.safetensors``), or None."""
    p = Path(base)
    return load_prompt_embeds(p) if (p / PROMPT_EMBEDS).is_file() else None


# ---------------------------------------------------------------------------------------------- I/O
def save_trained(trained: Trained, dst: str | os.PathLike, *, inputs: tuple = ()) -> Path:
    """Writes ``trained`` to the folder ``dst`` atomically (replacing only an earlier one of ours).
    ``inputs``: paths the command read, never to be overwritten."""
    check_consistent(trained.trainable, trained.spec, "trained weights")
    check_apart(dst, list(inputs), flag="DST")
    check_replaceable(
        dst, marker=TRAINED_MANIFEST, format=TRAINED_FORMAT, names=TRAINED_NAMES, flag="DST", what="model"
    )
    from bokehdiff_jax import __version__

    flat = flatten(trained.trainable)
    specs = [TensorSpec(k, np.dtype(np.float32), tuple(np.shape(v))) for k, v in flat.items()]
    arrays = (np.ascontiguousarray(v, dtype=np.float32) for v in flat.values())  # one copy at a time
    manifest = {
        "format": TRAINED_FORMAT,
        "version": TRAINED_VERSION,
        **trained.spec.to_json(),
        "source": trained.source,
        "bokehdiff_jax_version": __version__,
    }
    with atomic_path(dst, is_dir=True) as tmp:
        write_safetensors(tmp / TRAINABLE, specs, arrays, {"format": TRAINED_FORMAT})
        save_dict(tmp / PROMPT_EMBEDS, {k: np.asarray(v, np.float32) for k, v in trained.cond.items()},
                  {"prompt": trained.spec.prompt})  # fmt: skip
        (tmp / TRAINED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(dst)


def is_trained(path: str | os.PathLike) -> bool:
    return (Path(path) / TRAINED_MANIFEST).is_file()


def load_trained(src: str | os.PathLike) -> Trained:
    """Reads a folder written by ``save_trained``, strictly (manifest, names, shapes)."""
    src = Path(src)
    p = src / TRAINED_MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{src}: not a trained bokehdiff_jax model (no {TRAINED_MANIFEST})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != TRAINED_FORMAT:
        raise InputError(f'{p}: not a trained-model manifest (need "format": "{TRAINED_FORMAT}")')
    if not isinstance(m.get("version"), int) or m["version"] > TRAINED_VERSION:
        raise InputError(
            f"{p}: version {m.get('version')!r}: this bokehdiff_jax reads version {TRAINED_VERSION}"
        )
    spec = ModelSpec.from_json(m, str(p))
    with SafetensorsFile(src / TRAINABLE) as f:
        flat = {k: np.asarray(f[k], np.float32) for k in f}
    trainable = unflatten(flat)
    check_consistent(trainable, spec, str(src / TRAINABLE))
    return Trained(trainable, load_prompt_embeds(src), spec, str(m.get("source", "")))
