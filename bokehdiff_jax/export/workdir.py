"""A training workdir's checkpoint -> ``convert.trained.Trained`` (what ``export`` writes out).

The layout is ``train.checkpoint``'s: ``WORKDIR/checkpoints/<step>/state`` (the ``TrainState``; only
``params["model"]``, the trainable model tree, is read, as NumPy, by a partial orbax restore: the optimiser
state is never loaded) and ``WORKDIR/checkpoints/<step>/config`` (the run's resolved config as JSON),
from which the architecture, LoRA, VAE parts, PISA placement and timestep are rebuilt exactly as the
trainer built them (``train.build.architecture``, ``train.objective.build_model``).
"""

from __future__ import annotations

import os
from pathlib import Path

from bokehdiff_jax.convert.importers import base_reference, prompt_for_base
from bokehdiff_jax.convert.prompt import FIXED_PROMPT
from bokehdiff_jax.convert.trained import RANDOM, ModelSpec, Trained
from bokehdiff_jax.errors import InputError

# The workdir reader is the trainer's (one home, also used by the inference pipeline); re-exported here.
from bokehdiff_jax.train.checkpoint import (  # noqa: F401
    CHECKPOINTS,
    checkpoint_dir,
    is_workdir,
    read_checkpoint_config,
    restore_model_params,
)


def trained_from_workdir(
    path: str | os.PathLike, step: int | None = None, *, fingerprint: bool = True
) -> Trained:
    """The trained model of a workdir's checkpoint (``step``: default the latest)."""
    from bokehdiff_jax.train.build import architecture
    from bokehdiff_jax.train.config import config_from_json
    from bokehdiff_jax.train.objective import build_model

    ckpt = checkpoint_dir(path, step)
    config = config_from_json(read_checkpoint_config(ckpt))
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
    trainable = restore_model_params(ckpt / "state")
    if base == RANDOM:
        from bokehdiff_jax.models.bokehdiff import random_prompt_embeds

        cond = random_prompt_embeds(unet_config, config.seed)  # what the trainer used (train.build)
    else:
        cond = prompt_for_base(base, unet_config, prompt_seed=config.seed)
    return Trained(trainable, cond, spec, str(ckpt.resolve()))
