"""A training workdir's checkpoint -> ``convert.trained.Trained`` (what ``export`` writes out).

The layout is ``train.checkpoint``'s: ``WORKDIR/checkpoints/<step>/state`` (the ``TrainState``; only
``params["model"]``, the trainable model tree, is read, as NumPy, by a partial orbax restore: the optimiser
state is never loaded) and ``WORKDIR/checkpoints/<step>/config`` (the run's resolved config as JSON),
from which the architecture, LoRA, VAE parts, PISA placement and timestep are rebuilt exactly as the
trainer built them (``train.build.architecture``, ``train.objective.build_model``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bokehdiff_jax.convert.importers import base_reference, prompt_for_base
from bokehdiff_jax.convert.prompt import FIXED_PROMPT
from bokehdiff_jax.convert.trained import RANDOM, ModelSpec, Trained
from bokehdiff_jax.errors import InputError

CHECKPOINTS = "checkpoints"


def is_workdir(path: str | os.PathLike) -> bool:
    """True for a training workdir or one of its checkpoint folders."""
    p = Path(path)
    return (p / CHECKPOINTS).is_dir() or ((p / "state").is_dir() and (p / "config").is_dir())


def checkpoint_dir(path: str | os.PathLike, step: int | None = None) -> Path:
    """The checkpoint folder: ``path`` itself (a ``checkpoints/<step>`` folder), or the workdir's
    ``checkpoints/<step>`` (default: the latest complete one)."""
    p = Path(path)
    if (p / "state").is_dir() and (p / "config").is_dir():
        if step is not None and p.name != str(step):
            raise InputError(f"{p} is the checkpoint of step {p.name}, not {step}")
        return p
    root = p / CHECKPOINTS
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "state").is_dir())
    if not steps:
        raise InputError(f"{p}: no complete checkpoint under {root}")
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise InputError(f"{p}: no checkpoint of step {step} (have {steps})")
    return root / str(step)


def _restore_model_params(state_dir: Path) -> dict[str, Any]:
    """``params["model"]`` of a saved ``TrainState``, as NumPy arrays (nothing else is read)."""
    import jax
    import orbax.checkpoint as ocp

    try:
        tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
        sub = {"params": {"model": tree["params"]["model"]}}
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise InputError(f"{state_dir}: not a training state with params['model'] ({e})") from None
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub, is_leaf=is_leaf)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub, is_leaf=is_leaf)
    with ocp.PyTreeCheckpointer() as ck:
        out = ck.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
        )
    return jax.tree.map(lambda x: np.asarray(x, np.float32), out["params"]["model"])


def trained_from_workdir(
    path: str | os.PathLike, step: int | None = None, *, fingerprint: bool = True
) -> Trained:
    """The trained model of a workdir's checkpoint (``step``: default the latest)."""
    from bokehdiff_jax.train.build import architecture
    from bokehdiff_jax.train.config import config_from_json
    from bokehdiff_jax.train.objective import build_model

    ckpt = checkpoint_dir(path, step)
    try:
        config = config_from_json(json.loads((ckpt / "config" / "metadata").read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{ckpt / 'config'}: no readable run config ({e})") from None
    if config.trainable != "lora":
        raise InputError(
            f"{ckpt}: a trainable={config.trainable!r} run trains full weights, not a LoRA: write them with "
            "a full checkpoint instead of a LoRA export"
        )
    unet_config, vae_config, _ = architecture(config)
    base = config.base
    if base != RANDOM and not Path(base).exists():
        raise InputError(
            f"{ckpt}: the run's base {base} is not here (its architecture and prompt come from it)"
        )
    model = build_model(config, unet_config, vae_config)  # the trainer's own reading of its config
    spec = ModelSpec(
        unet_config=unet_config,
        vae_config=vae_config,
        lora=model.unet.lora,
        vae_parts=tuple(config.vae_parts),
        routing=model.unet.routing,
        timestep=model.schedule.timestep,
        prompt=FIXED_PROMPT,
        base={"path": RANDOM, "fingerprint": None} if base == RANDOM else base_reference(base, fingerprint),
    )
    trainable = _restore_model_params(ckpt / "state")
    if base == RANDOM:
        from bokehdiff_jax.models.bokehdiff import random_prompt_embeds

        cond = random_prompt_embeds(unet_config, config.seed)  # what the trainer used (train.build)
    else:
        cond = prompt_for_base(base, unet_config, prompt_seed=config.seed)
    return Trained(trainable, cond, spec, str(ckpt.resolve()))
