"""The optimiser: AdamW per parameter group with a warm-up + cosine schedule and per-group clipping.

The trained pytree is ``{"model": <partition.split's trainable tree>, "discriminator": <head params>}``;
each leaf belongs to one group by its path (``group_of``):

- ``lora``: the U-Net's LoRA collection (``model/unet/lora/...``);
- ``unet``: U-Net weights trained in full (``model/unet/params/...``: ``trainable="all"`` or listed parts);
- ``vae``: VAE weights trained in full (``model/vae/...``);
- ``discriminator``: the adversarial head (``discriminator/...``).

Every group has its own AdamW (``optax.multi_transform``) at ``optimizer.lr * optimizer.lr_scale[group]``
times one shared schedule, and its gradient is clipped to ``optimizer.clip_norm`` on its own (the
discriminator's gradient never shrinks the generator's step). Moments and updates are fp32 like the
params they update (SPEC section 6: the released code let LoRA drift to bf16).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

GROUPS = ("lora", "unet", "vae", "discriminator")


def _name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def group_of(path: tuple[str, ...]) -> str:
    """The group of a leaf of the trained tree, from its path of names."""
    if path[0] == "discriminator":
        return "discriminator"
    if path[:1] != ("model",) or len(path) < 3:
        raise ValueError(f"trained leaf {'/'.join(path)} is outside model/ and discriminator/")
    if path[1] == "unet":
        return "lora" if path[2] == "lora" else "unet"
    if path[1] == "vae":
        return "vae"
    raise ValueError(f"trained leaf {'/'.join(path)}: expected model/unet/... or model/vae/...")


def group_labels(tree: Any) -> Any:
    """A tree of group names, one per leaf of ``tree``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: group_of(tuple(_name(k) for k in p)), tree)


def group_sizes(tree: Any) -> dict[str, int]:
    """``{group: number of elements}`` over the leaves of ``tree`` (arrays or shape structs)."""
    out: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        g = group_of(tuple(_name(k) for k in path))
        out[g] = out.get(g, 0) + int(leaf.size)
    return out


def unit_schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """The learning-rate multiplier at a step: linear warm-up from 0 to 1 over ``o.warmup_steps``, then a
    cosine to ``o.end_lr_factor`` at ``steps`` (``"cosine"``) or 1 (``"constant"``)."""
    warmup = int(o.warmup_steps)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=1.0,
            warmup_steps=warmup,
            decay_steps=max(int(steps), warmup + 1),
            end_value=float(o.end_lr_factor),
        )
    if warmup == 0:
        return optax.constant_schedule(1.0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup]
    )


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """AdamW per group present in ``params`` (arrays or shape structs), as ``optax.multi_transform``."""
    o = config.optimizer
    unit = unit_schedule(o, config.steps)
    present = sorted(set(jax.tree_util.tree_leaves(group_labels(params))))
    transforms = {}
    for g in present:
        peak = float(o.lr) * float(o.lr_scale[g])
        adamw = optax.adamw(
            learning_rate=lambda step, peak=peak: peak * unit(step),
            b1=float(o.b1),
            b2=float(o.b2),
            eps=float(o.eps),
            weight_decay=float(o.weight_decay),
        )
        transforms[g] = (
            optax.chain(optax.clip_by_global_norm(float(o.clip_norm)), adamw) if o.clip_norm else adamw
        )
    return optax.multi_transform(transforms, group_labels)


def learning_rate(config: ml_collections.ConfigDict, step: Any, group: str = "lora") -> Any:
    """The learning rate of ``group`` at ``step`` (for logs)."""
    o = config.optimizer
    return float(o.lr) * float(o.lr_scale[group]) * unit_schedule(o, config.steps)(step)
