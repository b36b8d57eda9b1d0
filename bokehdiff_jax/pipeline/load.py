"""A trained BokehDiff model from disk, whatever wrote it: the one-step model and its full ``variables``.

Three sources, told apart by their markers:

- a training workdir (``train.checkpoint``: ``checkpoints/<step>/{state,config}``), or one of its
  ``checkpoints/<step>`` folders: the run's config rebuilds the architecture and PISA exactly as the
  trainer did (``train.build.architecture``, ``train.objective.build_model``); the trained tree is
  ``params["model"]`` (LoRA + VAE parts, or every weight of a ``trainable="all"`` run), the frozen rest is
  the run's base (``train.build.base_variables``: the seeded random init, or the converted checkpoint);
- a trained-model folder (``convert.trained``: ``bokehdiff_model.json``), on the base it records;
- an export folder (``bokehdiff-jax export``: ``bokehdiff.json`` + the PEFT LoRA), read back through
  ``convert.importers.import_lora`` on the base it records.

``base`` overrides the recorded base (the same weights elsewhere, e.g. on another machine).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bokehdiff_jax.convert.peft_files import EXPORT_MANIFEST
from bokehdiff_jax.convert.trained import RANDOM, Trained, is_trained, load_trained
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.bokehdiff import BokehDiff, Variables
from bokehdiff_jax.models.partition import merge, split
from bokehdiff_jax.train.checkpoint import (
    checkpoint_dir,
    is_workdir,
    read_checkpoint_config,
    restore_model_params,
)

SOURCE_KINDS = ("workdir", "trained", "export")


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to run.

    Attributes:
      model: the one-step model's static structure (routing, LoRA, dtypes, schedule).
      variables: the full tree (``models.bokehdiff``'s layout), trained weights merged with the base.
      kind: ``"workdir"``, ``"trained"`` or ``"export"``.
      source: what was read (the checkpoint folder, or the model folder), for logs and reports.
      base: the base the frozen weights came from (a path, or ``"random"``).
    """

    model: BokehDiff
    variables: Variables
    kind: str
    source: str
    base: str


def source_kind(path: str | os.PathLike) -> str:
    """``"workdir"``, ``"trained"`` or ``"export"``; ``InputError`` for anything else."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model {p}: no such file or folder")
    if is_workdir(p):
        return "workdir"
    if is_trained(p):
        return "trained"
    if (p / EXPORT_MANIFEST).is_file():
        return "export"
    raise InputError(
        f"model {p}: not a training workdir (checkpoints/), a checkpoint folder (state/, config/), a "
        f"trained-model folder (bokehdiff_model.json) nor an export folder ({EXPORT_MANIFEST})"
    )


def _to_jax(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.numpy.asarray(x), tree)


def _from_workdir(path: Path, step: int | None, base: str | None, initial: bool) -> LoadedModel:
    from bokehdiff_jax.train.build import architecture, base_variables
    from bokehdiff_jax.train.config import config_from_json
    from bokehdiff_jax.train.objective import build_model, partition_config

    ckpt = checkpoint_dir(path, step)
    config = config_from_json(read_checkpoint_config(ckpt))
    source = base if base is not None else config.base
    if source != RANDOM and not Path(source).exists():
        raise InputError(f"{ckpt}: the run's base {source} is not here (pass the same weights as base)")
    if source != config.base:
        config.unlock()
        config.base = str(source)  # the architecture is read from where the weights are
        config.lock()
    unet_config, vae_config, _ = architecture(config)
    model = build_model(config, unet_config, vae_config)  # the trainer's own reading of its config
    # The run's starting point, as train.build.initial_values makes it (the adapter from fold_in(seed, 1)).
    variables = model.add_lora(
        base_variables(config, model), jax.random.fold_in(jax.random.key(config.seed), 1)
    )
    start, frozen = split(variables, partition_config(config))
    if initial:
        trainable = jax.tree.map(lambda x: np.asarray(x, np.float32), start)  # trained copies are fp32
        what = f"{ckpt.parent.parent} at step 0 (the run's initial weights)"
    else:
        trainable = restore_model_params(ckpt / "state")
        _check_same_layout(trainable, start, str(ckpt))
        what = str(ckpt)
    return LoadedModel(model, merge(_to_jax(trainable), frozen), "workdir", what, str(source))


def _check_same_layout(got: Any, want: Any, what: str) -> None:
    """Strict: the restored trainable tree has the names and shapes this config's model expects."""
    from bokehdiff_jax.convert.trained import check_trainable

    check_trainable(got, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), want), what)


def _on_base(trained: Trained, base: str | None, kind: str, dtype: Any) -> LoadedModel:
    from bokehdiff_jax.convert.base import load_base

    spec = trained.spec
    source = base if base is not None else (spec.base or {}).get("path")
    if source in (None, RANDOM):
        raise InputError(
            f"{trained.source}: the model records no base weights (trained on a random base): pass the base"
        )
    loaded = load_base(source, dtype=dtype)
    if (loaded.unet_config, loaded.vae_config) != (spec.unet_config, spec.vae_config):
        raise InputError(f"base {source}: its architecture differs from the one the model was trained on")
    model = BokehDiff.create(
        spec.unet_config,
        spec.vae_config,
        routing=spec.routing,
        lora=spec.lora,
        dtype=dtype,
        param_dtype=dtype if dtype is not None else jax.numpy.float32,
        timestep=spec.timestep,
    )
    cond = {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in trained.cond.items()}
    variables = model.add_lora({**loaded.variables, "cond": cond}, jax.random.key(0))
    _, frozen = split(variables, spec.partition)
    return LoadedModel(model, merge(_to_jax(trained.trainable), frozen), kind, trained.source, str(source))


def load_model(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    step: int | None = None,
    dtype: Any = None,
    initial: bool = False,
) -> LoadedModel:
    """The model at ``path`` (a training workdir or checkpoint, a trained-model folder or an export).

    Args:
      base: the base weights (default: the ones the model records).
      step: a workdir's checkpoint step (default: the latest).
      initial: a workdir's model before training (step 0: the base, and a fresh adapter or the random
        init the run started from), to compare trained against untrained.
      dtype: compute and base-parameter dtype for trained-model and export folders (default float32; a
        workdir uses its run's ``precision``). Trained weights stay float32.
    """
    kind = source_kind(path)
    base = None if base is None else str(base)
    if (step is not None or initial) and kind != "workdir":
        what = "a step" if step is not None else "the initial model"
        raise InputError(f"model {path}: {what} applies to a training workdir, not to a {kind} folder")
    if kind == "workdir":
        return _from_workdir(Path(path), step, base, initial)
    if kind == "trained":
        return _on_base(load_trained(path), base, kind, dtype)
    from bokehdiff_jax.convert.importers import import_lora

    with warnings.catch_warnings():
        # The export brings its own prompt embeddings; a base without them only warns about a fallback
        # that is not used.
        warnings.filterwarnings("ignore", message=".*random prompt embeddings")
        exported = Path(path)
        manifest_base = _export_base(exported)
        trained = import_lora(exported, base if base is not None else manifest_base, fingerprint=False)
    return _on_base(trained, base if base is not None else manifest_base, kind, dtype)


def _export_base(folder: Path) -> str:
    import json

    try:
        m = json.loads((folder / EXPORT_MANIFEST).read_text())
        path = m["base"]["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder / EXPORT_MANIFEST}: no base path recorded ({e}); pass the base") from None
    if path in (None, RANDOM):
        raise InputError(f"{folder}: the export records no base weights (a random base): pass the base")
    return str(path)
