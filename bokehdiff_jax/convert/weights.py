"""Our checkpoint format, streamed conversion to and from diffusers folders, and one-call loading.

Checkpoint format (version 1), a folder::

    DST/
      bokehdiff_jax.json          manifest: {"format": "bokehdiff_jax", "version": 1, "dtype": "bfloat16",
                                   "components": ["unet", "vae"], "source": "<SRC path>",
                                   "prompt_embeds": true|false, "bokehdiff_jax_version": "..."}
      unet/config.json            the diffusers config.json, verbatim
      unet/params.safetensors     Flax params, Flax layout (conv HWIO, dense (in, out)), all in the
                                  manifest's dtype; key = "/".join(Flax path), e.g.
                                  "down_blocks_1/attentions_0/proj_in/kernel"
      vae/config.json, vae/params.safetensors     the same for the VAE
      prompt_embeds.safetensors   optional: the fixed prompt (SPEC section 3) encoded once:
                                  "prompt_embeds" [1, 77, 2048] and "text_embeds" [1, 1280], float32;
                                  metadata "prompt" holds the text

A component folder alone (``unet/``) is also a valid source for ``load_unet``/``load_vae``. The
manifest may also hold ``"num_time_ids": 5`` (a refiner-style U-Net: original size, crop, aesthetic
score) and ``"notes"``. ``to_diffusers`` writes ``unet/`` and/or ``vae/`` plus ``EXPORT_MARKER``.

Destinations are replaced only when they are absent, empty, or an earlier output of the same kind
(our manifest / export marker, and nothing else inside); never a folder holding a source.
Everything is written through ``atomic_path``; conversion reads, converts, casts and writes one
tensor at a time, so memory holds one tensor plus (for ``load_*``) the tree being built.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert import mapping
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path, check_apart, check_replaceable
from bokehdiff_jax.io.safetensors_io import (
    DTYPES,
    SafetensorsFile,
    TensorSpec,
    open_diffusers_weights,
    require_float,
    write_safetensors,
)

FORMAT, FORMAT_VERSION = "bokehdiff_jax", 1
MANIFEST = "bokehdiff_jax.json"
CONFIG = "config.json"
PARAMS = "params.safetensors"
PROMPT_EMBEDS = "prompt_embeds.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMPONENTS = ("unet", "vae")
CLASS_NAMES = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}
DTYPE_FLAGS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What our checkpoint folder may hold (an earlier one holding anything else is not replaced).
CHECKPOINT_NAMES = r"bokehdiff_jax\.json|unet|vae|prompt_embeds\.safetensors"
# ``to_diffusers`` output: the diffusers folders and the marker proving the folder is ours.
EXPORT_MARKER, EXPORT_FORMAT = "bokehdiff_jax_export.json", "bokehdiff_jax.diffusers_export"
EXPORT_NAMES = r"unet|vae"
SDXL_TIME_IDS, REFINER_TIME_IDS = 6, 5


def parse_dtype(name: str | Any) -> np.dtype:
    """``"bf16"``, ``"bfloat16"``, ``jnp.bfloat16``, ``np.float32``... -> a NumPy dtype (bf16: ml_dtypes)."""
    if isinstance(name, str):
        name = DTYPE_FLAGS.get(name, name)
        for d in DTYPES.values():
            if d.name == name:
                return d
        raise InputError(f"unknown dtype {name!r} (expected one of {sorted(DTYPE_FLAGS)})")
    return np.dtype(name)


def read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: no {CONFIG} (expected a diffusers model folder)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    except OSError as e:  # a folder named config.json, no permission: the input, not the machine
        raise InputError(f"{folder / CONFIG}: cannot read it ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{folder / CONFIG}: expected a JSON object")
    return cfg


def component_of(config: dict[str, Any], folder: Path) -> str:
    """``"unet"`` or ``"vae"`` from the config's ``_class_name``."""
    name = config.get("_class_name")
    if name not in CLASS_NAMES:
        raise InputError(
            f"{folder / CONFIG}: _class_name {name!r} is not a supported model "
            f"(expected one of {sorted(CLASS_NAMES)})"
        )
    return CLASS_NAMES[name]


def build_module(
    component: str, config: dict[str, Any], dtype: Any = None, *, num_time_ids: int = SDXL_TIME_IDS
) -> Any:
    """The Flax module for a diffusers config dict; ``dtype`` is its compute dtype. ``num_time_ids``:
    the U-Net's micro-conditioning ids (6 for SDXL base, 5 for the refiner; see ``time_ids_of``)."""
    if component == "unet":
        from bokehdiff_jax.models.configs import UNetConfig
        from bokehdiff_jax.models.unet import UNet2DConditionModel

        cfg = UNetConfig.from_diffusers(config, num_time_ids=num_time_ids)
        return UNet2DConditionModel(config=cfg, dtype=dtype)
    from bokehdiff_jax.models.configs import VAEConfig
    from bokehdiff_jax.models.vae import AutoencoderKL

    return AutoencoderKL(config=VAEConfig.from_diffusers(config), dtype=dtype)


def abstract_params(module: Any) -> dict[str, Any]:
    """The module's ``params`` tree as ``ShapeDtypeStruct``s (``jax.eval_shape``: no weights made).

    Inputs are the smallest spatial size the architecture accepts: parameter shapes do not depend on it.
    """
    import jax
    import jax.numpy as jnp

    cfg = module.config
    side = 2 ** len(cfg.block_out_channels)
    if hasattr(module, "init_inputs"):
        inputs = module.init_inputs(batch=1, size=(side, side), seq=4)
    else:
        inputs = (jnp.zeros((1, side, side, cfg.in_channels), jnp.float32),)
    return jax.eval_shape(lambda k: module.init(k, *inputs), jax.random.key(0))["params"]


# -------------------------------------------------------------------------------------- resolving
def _is_ours(folder: Path) -> bool:
    return (folder / PARAMS).is_file() and (folder / CONFIG).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Our checkpoint's manifest, checked: format, version (a newer one is refused, not guessed at),
    and components (known names, each one present as a component folder)."""
    folder = Path(folder)
    p = folder / MANIFEST
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: not a bokehdiff_jax checkpoint (no {MANIFEST})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f'{p}: not a bokehdiff_jax checkpoint manifest (need "format": "{FORMAT}")')
    version = m.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{p}: version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{p}: checkpoint format version {version} was written by a newer bokehdiff_jax "
            f"(this one reads version {FORMAT_VERSION}); upgrade bokehdiff_jax"
        )
    comps = m.get("components")
    if not (isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps)):
        raise InputError(f"{p}: components must be a non-empty list of names, got {comps!r}")
    unknown = sorted(set(comps) - set(COMPONENTS))
    if unknown or len(set(comps)) != len(comps):
        raise InputError(
            f"{p}: unknown component(s) {unknown or comps} (expected distinct names from {list(COMPONENTS)})"
        )
    missing = [c for c in comps if not _is_ours(folder / c)]
    if missing:
        raise InputError(
            f"{p}: listed component(s) {missing} missing: no {', '.join(f'{c}/{PARAMS}' for c in missing)} "
            f"with its {CONFIG}"
        )
    n = m.get("num_time_ids", SDXL_TIME_IDS)
    if n not in (SDXL_TIME_IDS, REFINER_TIME_IDS) or isinstance(n, bool):
        raise InputError(f"{p}: num_time_ids must be 6 or 5, got {n!r}")
    return m


def time_ids_of(folder: Path) -> int:
    """The micro-conditioning ids a U-Net folder takes: 5 when its pipeline is refiner-style (diffusers'
    ``model_index.json`` has ``requires_aesthetics_score``; our manifest says ``num_time_ids``), else 6.
    A U-Net's own config does not record it (its width ``P + n * A`` is ambiguous)."""
    parent = folder.parent
    if (parent / MANIFEST).is_file():
        return int(read_manifest(parent).get("num_time_ids", SDXL_TIME_IDS))
    index = parent / "model_index.json"
    if index.is_file():
        try:
            pipe = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{index}: not valid JSON ({e})") from None
        if isinstance(pipe, dict) and pipe.get("requires_aesthetics_score") is True:
            return REFINER_TIME_IDS
    return SDXL_TIME_IDS


def resolve(path: str | os.PathLike, component: str) -> tuple[Path, bool]:
    """Finds ``component``'s folder under ``path``: returns ``(folder, is_our_format)``.

    ``path`` may be our checkpoint, its component folder, a diffusers model folder, or a diffusers
    pipeline folder holding ``unet/`` and ``vae/``.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if (p / MANIFEST).is_file() and component not in read_manifest(p)["components"]:
        raise InputError(f"{p}: this checkpoint holds no {component} (see its {MANIFEST})")
    for folder in (p, p / component):
        if not (folder / CONFIG).is_file():
            continue
        cfg = read_config(folder)
        if CLASS_NAMES.get(cfg.get("_class_name")) == component:
            return folder, _is_ours(folder)
        if folder == p and (p / component).is_dir():
            continue  # a folder with some other config.json beside its component/
        raise InputError(f"{folder}: holds a {cfg.get('_class_name')!r}, not a {component}")
    raise InputError(
        f"{p}: no {component} found (expected our checkpoint, a diffusers {component}/ folder, or a "
        f"pipeline folder containing {component}/)"
    )


def load_component(
    path: str | os.PathLike, component: str, dtype: Any = None, *, variant: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(module, {"params": tree})`` for ``component`` from our checkpoint or a diffusers folder."""
    import jax.numpy as jnp

    folder, ours = resolve(path, component)
    np_dtype = parse_dtype(dtype) if dtype is not None else np.dtype(np.float32)
    module = build_module(
        component, read_config(folder), jnp.dtype(np_dtype), num_time_ids=time_ids_of(folder)
    )
    abstract = abstract_params(module)
    # jnp.asarray per tensor: the NumPy copy is dropped as soon as its device copy exists.
    if ours:
        with SafetensorsFile(folder / PARAMS) as f:
            params = load_flat(f, abstract, np_dtype, jnp.asarray, what=str(folder / PARAMS))
    else:
        with open_diffusers_weights(folder, variant) as w:
            require_float(w.infos, str(folder))
            params = mapping.diffusers_to_flax(
                w, abstract, dtype=np_dtype, leaf_fn=jnp.asarray, what=str(folder)
            )
    return module, {"params": params}


def load_flat(
    f: SafetensorsFile,
    abstract: dict[str, Any],
    dtype: np.dtype | None,
    leaf_fn: Callable[[np.ndarray], Any] | None = None,
    what: str = "checkpoint",
) -> dict[str, Any]:
    """Our flat ``"a/b/kernel"`` file -> a Flax tree, strictly checked against ``abstract``."""
    want = check_flat(f, abstract, what)
    out: dict[str, Any] = {}
    for k in sorted(want):
        arr = f[k].astype(dtype if dtype is not None else want[k].dtype, copy=False)
        node = out
        *parents, leaf = k.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = leaf_fn(arr) if leaf_fn is not None else arr
    return out


def check_flat(f: SafetensorsFile, abstract: dict[str, Any], what: str) -> dict[str, Any]:
    """Checks our flat file against the model, reading no data: names one to one, shapes, float
    dtypes. Returns ``{flat name: abstract leaf}``; raises one ``InputError`` listing every fault."""
    require_float(f.infos, what)
    want = {"/".join(p): a for p, a in mapping.iter_leaves(abstract)}
    missing = sorted(set(want) - set(f.infos))
    unexpected = sorted(set(f.infos) - set(want))
    mismatched = [
        f"{k}: {f.infos[k].shape}, expected {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(f.infos))
        if tuple(f.infos[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise mapping.MappingError(missing, unexpected, mismatched, what)
    return want


def load_unet(path: str | os.PathLike, dtype: Any = None, *, variant: str | None = None) -> tuple[Any, dict]:
    """The Flax U-Net and ``{"params": ...}`` from our checkpoint or a diffusers unet/pipeline folder.

    ``dtype`` (default float32) is both the parameter dtype and the module's compute dtype.
    """
    return load_component(path, "unet", dtype, variant=variant)


def load_vae(path: str | os.PathLike, dtype: Any = None, *, variant: str | None = None) -> tuple[Any, dict]:
    """The Flax VAE and ``{"params": ...}``; see ``load_unet``."""
    return load_component(path, "vae", dtype, variant=variant)


def load_prompt_embeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{"prompt_embeds": [1, 77, C], "text_embeds": [1, P]}`` stored in our checkpoint."""
    p = Path(path) / PROMPT_EMBEDS
    if not p.is_file():
        raise InputError(f"{path}: no {PROMPT_EMBEDS} (convert a pipeline folder with its text encoders)")
    with SafetensorsFile(p) as f:
        return {k: f[k] for k in f}


# ----------------------------------------------------------------------------------- conversion
def _components_in(src: Path) -> list[tuple[str, Path]]:
    """``[(component, folder)]``: ``src`` itself when it is a model folder, else its unet/ and vae/."""
    if (
        (src / CONFIG).is_file()
        and "_class_name" in (cfg := read_config(src))
        and cfg["_class_name"] in CLASS_NAMES
    ):
        return [(component_of(cfg, src), src)]
    found = [(c, src / c) for c in COMPONENTS if (src / c / CONFIG).is_file()]
    if not found:
        raise InputError(
            f"{src}: not a diffusers model folder (config.json with _class_name UNet2DConditionModel or "
            "AutoencoderKL) nor a pipeline folder containing unet/ or vae/"
        )
    for c, folder in found:
        if component_of(read_config(folder), folder) != c:
            raise InputError(f"{folder}: {CONFIG} does not describe a {c}")
    return found


def convert_component(
    src: Path,
    dst: Path,
    component: str,
    dtype: np.dtype | None,
    variant: str | None,
    num_time_ids: int = SDXL_TIME_IDS,
) -> str:
    """diffusers model folder -> our component folder (``dst`` must exist), streamed.

    ``dtype=None`` keeps each tensor's stored dtype (then the conversion is lossless both ways).
    Returns the stored dtype's name (``"mixed"`` if the source mixes dtypes and ``dtype`` is None).
    """
    config = read_config(src)
    abstract = abstract_params(build_module(component, config, num_time_ids=num_time_ids))
    with open_diffusers_weights(src, variant) as w:
        require_float(w.infos, str(src))
        steps = mapping.plan_diffusers_to_flax(mapping.source_shapes(w), abstract, what=str(src))
        dtypes = [dtype if dtype is not None else w.infos[s.key].dtype for s in steps]
        specs = [TensorSpec("/".join(s.path), d, s.shape) for s, d in zip(steps, dtypes, strict=True)]
        arrays = (mapping.run_step(s, w, d) for s, d in zip(steps, dtypes, strict=True))
        write_safetensors(dst / PARAMS, specs, arrays, {"format": "flax"})
    (dst / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else "mixed"


def from_diffusers(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = "fp32",
    variant: str | None = None,
    prompt_embeds: bool = True,
) -> dict[str, Any]:
    """Converts a diffusers unet/ or vae/ folder, or a pipeline folder, into our checkpoint at ``dst``.

    ``dtype``: ``"fp32"``, ``"bf16"``, ``"fp16"`` (or a dtype), or None to keep the stored dtypes.
    ``variant`` (``"fp16"``) picks the weights files of every component, text encoders included.

    For a pipeline folder with ``text_encoder``, ``text_encoder_2``, ``tokenizer`` and
    ``tokenizer_2`` (and ``prompt_embeds=True``) it also stores the fixed-prompt embeddings, which
    needs the ``torch`` extra; when they are skipped, the manifest's ``notes`` say why. ``dst`` must
    be absent, empty or an earlier checkpoint (``check_replaceable``); it appears complete or not at
    all. Returns the manifest.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder (expected a diffusers model or pipeline folder)")
    np_dtype = parse_dtype(dtype) if dtype is not None else None
    found = _components_in(src)
    encoders = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    with_prompt = prompt_embeds and all((src / n).is_dir() for n in encoders)
    check_apart(dst, [src, *(folder for _, folder in found)], flag="DST")
    check_replaceable(
        dst, marker=MANIFEST, format=FORMAT, names=CHECKPOINT_NAMES, flag="DST", what="checkpoint"
    )
    time_ids = next((time_ids_of(f) for c, f in found if c == "unet"), SDXL_TIME_IDS)
    notes = []
    if time_ids == REFINER_TIME_IDS:
        notes.append("refiner-style pipeline (requires_aesthetics_score): its U-Net takes 5 time ids")
    if prompt_embeds and not with_prompt and (src / "model_index.json").is_file():
        absent = [n for n in encoders if not (src / n).is_dir()]
        notes.append(
            f"prompt embeddings not stored: the pipeline has no {', '.join(absent)} (the fixed prompt "
            "is encoded with both SDXL text encoders)"
        )
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": None,  # filled in below: the stored dtype
        "components": [c for c, _ in found],
        "source": str(src.resolve()),
        "prompt_embeds": with_prompt,
        "bokehdiff_jax_version": _version(),
    }
    if time_ids != SDXL_TIME_IDS:
        manifest["num_time_ids"] = time_ids
    if notes:
        manifest["notes"] = notes
    with atomic_path(dst, is_dir=True) as tmp:
        for c, folder in found:
            (tmp / c).mkdir()
            stored = convert_component(folder, tmp / c, c, np_dtype, variant, time_ids)
            manifest["dtype"] = stored if manifest["dtype"] in (None, stored) else "mixed"
        if with_prompt:
            from bokehdiff_jax.convert.prompt import FIXED_PROMPT, encode_prompt
            from bokehdiff_jax.io.safetensors_io import save_dict

            embeds = encode_prompt(src, FIXED_PROMPT, variant=variant)
            save_dict(tmp / PROMPT_EMBEDS, embeds, {"prompt": FIXED_PROMPT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def to_diffusers(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Our checkpoint (or one component folder of it) -> diffusers ``unet/`` and/or ``vae/`` folders.

    The source is checked as strictly as ``load_unet`` checks it (manifest, components, every
    tensor's name, shape and float dtype) before anything is written. Tensors keep their stored dtype
    and bytes (only the layout changes), so converting back gives bit-identical parameters. ``dst``
    must be absent, empty or an earlier export (it holds ``EXPORT_MARKER``). Returns the components
    written.
    """
    src = Path(src)
    if (src / MANIFEST).is_file():
        manifest = read_manifest(src)
        found = [(c, src / c) for c in manifest["components"]]
        time_ids = int(manifest.get("num_time_ids", SDXL_TIME_IDS))
    elif _is_ours(src):
        found = [(component_of(read_config(src), src), src)]
        time_ids = time_ids_of(src)
    else:
        raise InputError(f"{src}: not a bokehdiff_jax checkpoint (no {MANIFEST} or {PARAMS})")
    check_apart(dst, [src, *(folder for _, folder in found)], flag="DST")
    check_replaceable(
        dst, marker=EXPORT_MARKER, format=EXPORT_FORMAT, names=EXPORT_NAMES, flag="DST", what="export"
    )
    for c, folder in found:  # everything checked before the first byte is written
        if component_of(read_config(folder), folder) != c:
            raise InputError(f"{folder}: {CONFIG} does not describe a {c}")
        abstract = abstract_params(build_module(c, read_config(folder), num_time_ids=time_ids))
        with SafetensorsFile(folder / PARAMS) as f:
            check_flat(f, abstract, str(folder / PARAMS))
    with atomic_path(dst, is_dir=True) as tmp:
        for c, folder in found:
            out = tmp / c
            out.mkdir()
            with SafetensorsFile(folder / PARAMS) as f:
                paths = [tuple(k.split("/")) for k in f]
                specs = []
                for k, p in zip(f, paths, strict=True):
                    key, shape = mapping.torch_shape(p, f.infos[k].shape)
                    specs.append(TensorSpec(key, f.infos[k].dtype, shape))
                arrays = (
                    mapping.kind_of(p[-1], len(f.infos[k].shape)).to_torch(f[k])
                    for k, p in zip(f, paths, strict=True)
                )
                write_safetensors(out / DIFFUSERS_WEIGHTS, specs, arrays, {"format": "pt"})
            shutil.copyfile(folder / CONFIG, out / CONFIG)
        marker = {"format": EXPORT_FORMAT, "source": str(src.resolve()), "components": [c for c, _ in found]}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return [c for c, _ in found]


def _version() -> str:
    from bokehdiff_jax import __version__

    return __version__
