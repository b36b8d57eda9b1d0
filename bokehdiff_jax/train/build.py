"""Everything a run needs before its first step, from the config: the architecture, the objective,
the optimiser, abstract shapes of every tree, their shardings on the mesh, and (for a real run) the
initial values, made directly in their shardings.

Params never materialise unsharded (ARCHITECTURE habit 8): shapes come from ``jax.eval_shape``,
shardings from ``sharding.param_shardings`` (frozen weights FSDP-split, LoRA replicated), and a random
base is initialised by one ``jit`` whose ``out_shardings`` are those shardings. A converted base is read
tensor by tensor on the host and placed shard by shard.

Keys, from ``config.seed``: ``key(seed)`` initialises a random base (as ``convert.load_base``),
``fold_in(., 1)`` the LoRA, ``fold_in(., 2)`` the discriminator head, ``fold_in(., 3)`` is the run key
that the step folds the step number into (dropout, PISA jitter).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bokehdiff_jax import sharding
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses import (
    ConvNeXt,
    backbone_channels,
    convnext_from_timm,
    init_discriminator,
)
from bokehdiff_jax.losses.lpips_weights import expected_shapes
from bokehdiff_jax.models.bokehdiff import random_prompt_embeds
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.partition import split
from bokehdiff_jax.train import optim
from bokehdiff_jax.train.objective import (
    BATCH_KEYS,
    Objective,
    build_model,
    compute_dtype,
    loss_config,
    needs_lpips_params,
    partition_config,
)
from bokehdiff_jax.train.step import TrainState, init_state, make_train_step

RANDOM = "random"


# ------------------------------------------------------------------------------------ architecture
def _arch(value: Any, cls: type, what: str) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return cls.from_diffusers(json_ready(value.to_dict()))
    if value == "sdxl":
        return cls.sdxl()
    if isinstance(value, str):
        return cls.from_diffusers(value)
    raise InputError(f"config model.{what}={value!r}: expected 'sdxl', a config.json path or a dict of keys")


def json_ready(d: Any) -> Any:
    """Tuples to lists, recursively (diffusers configs are JSON)."""
    if isinstance(d, dict):
        return {k: json_ready(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [json_ready(v) for v in d]
    return d


def architecture(
    config: ml_collections.ConfigDict, *, for_dry_run: bool = False
) -> tuple[UNetConfig, VAEConfig, str]:
    """``(unet_config, vae_config, where from)``. A ``base`` folder's own configs win (its weights are
    not read); ``"random"``, or a dry run whose base folder is absent, use ``model.unet``/``model.vae``."""
    if config.base != RANDOM:
        if Path(config.base).exists():
            from bokehdiff_jax.convert.weights import read_config, resolve

            unet = UNetConfig.from_diffusers(read_config(resolve(config.base, "unet")[0]))
            vae = VAEConfig.from_diffusers(read_config(resolve(config.base, "vae")[0]))
            return unet, vae, f"the configs of {config.base}"
        if not for_dry_run:
            raise InputError(
                f"config base={config.base!r}: no such folder (a converted checkpoint, or 'random')"
            )
    where = f"model.unet={_describe(config.model.unet)}, model.vae={_describe(config.model.vae)}"
    return _arch(config.model.unet, UNetConfig, "unet"), _arch(config.model.vae, VAEConfig, "vae"), where


def _describe(v: Any) -> str:
    return "<inline dict>" if isinstance(v, ml_collections.ConfigDict) else repr(v)


# ------------------------------------------------------------------------------------------- trees
def _to_fp32(tree: Any) -> Any:
    """Trained weights are fp32 master copies whatever the base's storage dtype (arrays or structs)."""

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float32:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return x.astype(jnp.float32)

    return jax.tree_util.tree_map(one, tree)


def _split(config: ml_collections.ConfigDict, variables: dict) -> tuple[Any, Any]:
    trainable, frozen = split(variables, partition_config(config))
    return _to_fp32(trainable), frozen


def _lpips_abstract() -> dict:
    tree: dict = {}
    for name, shape in expected_shapes().items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


@dataclasses.dataclass
class Run:
    """The static parts of a run and the abstract shapes and shardings of its trees.

    ``state``, ``frozen``, ``batch``: trees of ``jax.ShapeDtypeStruct`` (global shapes); ``*_shardings``:
    matching ``NamedSharding`` trees. ``train_step``: the pure step (not yet compiled).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    unet_config: UNetConfig
    vae_config: VAEConfig
    arch_source: str
    objective: Objective
    tx: optax.GradientTransformation
    state: TrainState
    frozen: dict
    batch: dict
    state_shardings: Any
    frozen_shardings: Any
    batch_shardings: dict
    train_step: Any

    @property
    def seed_key(self) -> jax.Array:
        return jax.random.key(self.config.seed)

    @property
    def run_key(self) -> jax.Array:
        return jax.random.fold_in(self.seed_key, 3)


def abstract_batch(config: ml_collections.ConfigDict) -> dict:
    """Global batch shapes: images ``[B, S, S, 3]`` in [0, 1], disparity ``[B, S, S]``, focus and
    strength ``[B]``."""
    b, s = config.batch_size, config.resolution
    f32 = jnp.float32
    return {
        "aif": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "bokeh": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "disparity": jax.ShapeDtypeStruct((b, s, s), f32),
        "focus": jax.ShapeDtypeStruct((b,), f32),
        "strength": jax.ShapeDtypeStruct((b,), f32),
    }


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    n = math.prod(mesh.shape[a] for a in sharding.MESH_AXES)
    per_micro = config.batch_size // config.optimizer.grad_accum
    if config.batch_size % n or per_micro % n:
        raise InputError(
            f"config batch_size={config.batch_size} (micro-batch {per_micro}) must divide by the {n} devices "
            f"of the mesh {dict(mesh.shape)}"
        )


def make_run(
    config: ml_collections.ConfigDict, *, mesh: jax.sharding.Mesh | None = None, for_dry_run: bool = False
) -> Run:
    """Builds the abstract run (no weights are read or made)."""
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    check_batch(config, mesh)
    unet_cfg, vae_cfg, where = architecture(config, for_dry_run=for_dry_run)
    model = build_model(config, unet_cfg, vae_cfg)
    objective = Objective(model, loss_config(config))
    cond = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in random_prompt_embeds(unet_cfg, 0).items()
    }
    trainable, model_frozen = _split(config, {**model.abstract_variables(), "cond": cond})
    params: dict = {"model": trainable}
    carry: dict = {}
    frozen: dict = {"model": model_frozen}
    losses = objective.losses
    if losses.adv_weight > 0:
        head, spectral = jax.eval_shape(
            lambda k: init_discriminator(k, backbone_channels(losses.adversarial), losses.adversarial),
            jax.random.key(0),
        )
        params["discriminator"], carry["spectral"] = head, spectral
        if losses.adversarial.backbone == "convnext":
            if not config.losses.discriminator.weights:
                raise InputError(
                    "config losses.discriminator.backbone='convnext' needs losses.discriminator.weights "
                    "(a timm ConvNeXt-base safetensors file)"
                )
            convnext = ConvNeXt(losses.adversarial.convnext)
            frozen["disc_backbone"] = jax.eval_shape(
                lambda k: convnext.init(k, jnp.zeros((1, 32, 32, 3), jnp.float32)), jax.random.key(0)
            )["params"]
    if needs_lpips_params(losses):
        frozen["lpips"] = _lpips_abstract()
    tx = optim.make_optimizer(config, params)
    state = jax.eval_shape(lambda p, c: init_state(p, tx, c), params, carry)
    unit = optim.unit_schedule(config.optimizer, config.steps)
    lr_main = float(config.optimizer.lr)
    train_step = make_train_step(
        objective.loss, tx, accum=config.optimizer.grad_accum, lr_fn=lambda s: lr_main * unit(s)
    )
    batch = abstract_batch(config)
    return Run(
        config=config,
        mesh=mesh,
        unet_config=unet_cfg,
        vae_config=vae_cfg,
        arch_source=where,
        objective=objective,
        tx=tx,
        state=state,
        frozen=frozen,
        batch=batch,
        state_shardings=sharding.param_shardings(state, mesh),
        frozen_shardings=sharding.param_shardings(frozen, mesh),
        batch_shardings={k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()},
        train_step=train_step,
    )


# ---------------------------------------------------------------------------------------- values
def base_variables(config: ml_collections.ConfigDict, model: Any, base: str | None = None) -> dict:
    """The run's base variables ``{"unet": {"params"}, "vae": {"params"}, "cond"}`` (no LoRA): a random
    base drawn from ``key(config.seed)`` with ``random_prompt_embeds(seed)``, or ``config.base`` (or
    ``base``, the same weights elsewhere) loaded in the compute dtype. The inference pipeline rebuilds a
    run's frozen weights with it."""
    source = config.base if base is None else base
    if source == RANDOM:
        variables = model.init_base_params(jax.random.key(config.seed))
        cond = random_prompt_embeds(model.unet.config, config.seed)
        return {**variables, "cond": {k: jnp.asarray(v) for k, v in cond.items()}}
    from bokehdiff_jax.convert.base import load_base

    return load_base(source, dtype=compute_dtype(config), seed=config.seed, prompt_seed=config.seed).variables


def initial_values(run: Run) -> tuple[TrainState, dict]:
    """``(state at step 0, frozen)`` as sharded arrays: a random base made in place by one ``jit``, or a
    converted base loaded from ``config.base`` and placed shard by shard."""
    config, model = run.config, run.objective.model
    seed_key = run.seed_key
    model_sh = run.frozen_shardings["model"]
    train_sh = run.state_shardings.params["model"]
    variables = base_variables(config, model)
    trainable, model_frozen = _split(config, model.add_lora(variables, jax.random.fold_in(seed_key, 1)))
    trainable = sharding.place(trainable, train_sh)
    model_frozen = sharding.place(model_frozen, model_sh)
    params: dict = {"model": trainable}
    carry: dict = {}
    frozen: dict = {"model": model_frozen}
    losses = run.objective.losses
    if losses.adv_weight > 0:
        head, spectral = init_discriminator(
            jax.random.fold_in(seed_key, 2), backbone_channels(losses.adversarial), losses.adversarial
        )
        params["discriminator"] = sharding.place(head, run.state_shardings.params["discriminator"])
        carry["spectral"] = sharding.place(spectral, run.state_shardings.carry["spectral"])
    if "disc_backbone" in run.frozen:
        frozen["disc_backbone"] = sharding.place(
            convnext_from_timm(config.losses.discriminator.weights, losses.adversarial.convnext),
            run.frozen_shardings["disc_backbone"],
        )
    if "lpips" in run.frozen:
        from bokehdiff_jax.losses import lpips_params

        path = config.losses.lpips_weights or None
        frozen["lpips"] = sharding.place(lpips_params(path), run.frozen_shardings["lpips"])
    init = jax.jit(lambda p, c: init_state(p, run.tx, c), out_shardings=run.state_shardings)
    with jax.set_mesh(run.mesh):
        state = init(params, carry)
    return state, frozen


def param_counts(run: Run) -> tuple[dict[str, int], dict[str, int]]:
    """``(trainable by group, frozen by group)`` element counts (``frozen``: unet, vae, cond, lpips...)."""
    trainable = optim.group_sizes(run.state.params)
    frozen: dict[str, int] = {}
    for top, sub in run.frozen.items():
        if top == "model":
            for name, tree in sub.items():
                frozen[name] = sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
        else:
            frozen[top] = sum(int(x.size) for x in jax.tree_util.tree_leaves(sub))
    return trainable, frozen


__all__ = [
    "BATCH_KEYS",
    "base_variables",
    "Run",
    "abstract_batch",
    "architecture",
    "initial_values",
    "make_run",
    "param_counts",
]
