"""Training workdirs for the inference tests, written by the trainer's own checkpoint code without
training: the micro config of tests/train (``trainable="all"`` or ``"lora"`` on a random base), with
trained weights that differ from the base (imported by module name: no package)."""

from __future__ import annotations

import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.models.partition import merge, split
from bokehdiff_jax.train import config as config_lib
from bokehdiff_jax.train.build import architecture, base_variables
from bokehdiff_jax.train.checkpoint import Checkpoints
from bokehdiff_jax.train.objective import build_model, partition_config
from bokehdiff_jax.train.step import TrainState

MICRO = pathlib.Path(__file__).resolve().parent / "train" / "micro_config.py"


def micro_config(trainable: str = "all"):
    c = config_lib.load_config(str(MICRO))
    c.trainable = trainable
    c.pisa.impl = "dense"  # as trained; inference picks its own ("auto")
    return c


def write_workdir(root: pathlib.Path, trainable: str = "all", step: int = 3, seed: int = 5):
    """``(workdir, config, model, variables)``: a checkpoint at ``step`` whose trained tree is the base's
    (or, with LoRA, a fresh adapter's) plus seeded noise; ``variables`` is what inference must use."""
    config = micro_config(trainable)
    unet_cfg, vae_cfg, _ = architecture(config)
    model = build_model(config, unet_cfg, vae_cfg)
    variables = base_variables(config, model)
    if trainable == "lora":
        variables = model.add_lora(variables, jax.random.key(1))
    train, frozen = split(variables, partition_config(config))
    rng = np.random.default_rng(seed)
    train = jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape), jnp.float32), train)
    ckpts = Checkpoints(root, keep=2, keep_every=0, async_save=False)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params={"model": train}, opt_state={}, carry={})
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpts.save(step, state, jax.random.key(0), data, config_lib.to_dict(config))
    ckpts.wait()
    ckpts.close()
    config_lib.write_config(root, config)
    return root, config, model, merge(train, frozen)
