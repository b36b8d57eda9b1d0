"""Trainable and frozen parameters as two pytrees (SPEC section 3), cut from the one-step model's
``variables`` (``models.bokehdiff``) by a config, and joined again without copying.

SPEC's split (``PartitionConfig()``): trainable = the U-Net's LoRA collection (rank 8, alpha 8, on the
14 ``SPEC_LORA_TARGETS``; peft's Gaussian init) and the VAE encoder's ``conv_in``, ``mid_block`` and
``conv_out`` in full; frozen = every other U-Net and VAE weight and the prompt embeddings.
``PartitionConfig(trainable="all")`` trains every U-Net and VAE weight (no LoRA), for small models
trained from scratch.

Both trees keep the ``variables`` layout (``{"unet": {"lora": ...}, "vae": {"params": ...}}``), so
``merge(trainable, frozen)`` is a dict union whose leaves *are* the inputs' arrays. A train step takes
gradients with respect to ``trainable`` only and receives ``frozen`` as a separate argument::

    loss, grads = jax.value_and_grad(lambda t: loss_fn(model.apply(merge(t, frozen), ...)))(trainable)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping
from typing import Any

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.layers import LORA_COLLECTION
from bokehdiff_jax.models.naming import flax_module_to_torch
from bokehdiff_jax.models.options import LoRAConfig

# SPEC section 3: the VAE parts trained in full, as diffusers module paths.
SPEC_VAE_TRAINABLE: tuple[str, ...] = ("encoder.conv_in", "encoder.mid_block", "encoder.conv_out")
TRAINABLE_MODES = ("lora", "all")

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """What trains.

    Attributes:
      trainable: ``"lora"`` (LoRA on the U-Net plus the listed full parts) or ``"all"`` (every U-Net and
        VAE weight; ``lora``, ``vae_parts`` and ``unet_parts`` are then unused).
      lora: rank, alpha and target modules of the U-Net's LoRA (peft's ``target_modules`` rule: a module
        path equal to a target or ending in ``"." + target``).
      vae_parts, unet_parts: parts trained in full, as diffusers module paths (fnmatch wildcards allowed):
        a part covers every parameter of that module and below it. Each must match some parameter.
    """

    trainable: str = "lora"
    lora: LoRAConfig = LoRAConfig()
    vae_parts: tuple[str, ...] = SPEC_VAE_TRAINABLE
    unet_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_MODES:
            raise InputError(
                f"PartitionConfig.trainable={self.trainable!r}: expected one of {TRAINABLE_MODES}"
            )
        if self.lora.rank < 1 or not self.lora.targets:
            raise InputError(
                f"PartitionConfig.lora: rank {self.lora.rank} and targets {self.lora.targets!r}: "
                "expected rank >= 1 and at least one target"
            )

    @property
    def unet_lora(self) -> LoRAConfig | None:
        """The ``lora`` argument of the model (``BokehDiff.create``): None in ``"all"`` mode."""
        return self.lora if self.trainable == "lora" else None


def _module_path(path: tuple[str, ...]) -> str:
    """The diffusers module path of a parameter's Flax path (its last name is the parameter's)."""
    return flax_module_to_torch(path[:-1])


def _matches(module: str, part: str) -> bool:
    return fnmatch.fnmatchcase(module, part) or fnmatch.fnmatchcase(module, part + ".*")


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _insert(tree: Tree, path: tuple[str, ...], leaf: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = leaf


def _split_params(params: Mapping, parts: tuple[str, ...], what: str) -> tuple[Tree, Tree]:
    """``params`` -> ``(covered by parts, the rest)``; a part that covers nothing is an error."""
    take: Tree = {}
    keep: Tree = {}
    used: set[str] = set()
    for path, leaf in _leaves(params):
        module = _module_path(path)
        hit = [p for p in parts if _matches(module, p)]
        used.update(hit)
        _insert(take if hit else keep, path, leaf)
    unused = [p for p in parts if p not in used]
    if unused:
        raise InputError(f"{what} parts {unused} match no parameter (expected diffusers module paths)")
    return take, keep


def split(variables: Mapping, config: PartitionConfig = PartitionConfig()) -> tuple[Tree, Tree]:
    """``variables`` -> ``(trainable, frozen)``, two trees in the ``variables`` layout that share its leaves
    (nothing is copied; leaves may be arrays or ``jax.ShapeDtypeStruct``s).

    Raises ``InputError`` if LoRA is asked for and ``variables["unet"]`` has no ``"lora"`` collection
    (build the model with ``lora=config.unet_lora`` and call ``add_lora``), if LoRA is there in ``"all"``
    mode, or if a listed part matches nothing.
    """
    unet, vae = variables.get("unet", {}), variables.get("vae", {})
    rest = {k: v for k, v in variables.items() if k not in ("unet", "vae")}
    if config.trainable == "all":
        if LORA_COLLECTION in unet:
            raise InputError('trainable="all" trains full weights: build the model without LoRA')
        return {"unet": dict(unet), "vae": dict(vae)}, rest
    if not unet.get(LORA_COLLECTION):
        raise InputError(
            'trainable="lora" but the U-Net variables hold no LoRA: build the model with '
            "lora=PartitionConfig.unet_lora and call BokehDiff.add_lora"
        )
    unet_take, unet_keep = _split_params(unet.get("params", {}), config.unet_parts, "U-Net")
    vae_take, vae_keep = _split_params(vae.get("params", {}), config.vae_parts, "VAE")
    unet_other = {k: v for k, v in unet.items() if k not in ("params", LORA_COLLECTION)}
    vae_other = {k: v for k, v in vae.items() if k != "params"}
    trainable = {"unet": {LORA_COLLECTION: unet[LORA_COLLECTION]}}
    if unet_take:
        trainable["unet"]["params"] = unet_take
    if vae_take:
        trainable["vae"] = {"params": vae_take}
    frozen = {
        "unet": {"params": unet_keep, **unet_other},
        "vae": {"params": vae_keep, **vae_other},
        **rest,
    }
    return trainable, frozen


def merge(trainable: Mapping, frozen: Mapping) -> Tree:
    """The full ``variables``: a dict union of the two trees. Only dicts are rebuilt; every leaf is the
    input's own object (no copy, no device transfer). A leaf in both trees is an error."""
    out: Tree = dict(frozen)
    for k, v in trainable.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = merge(v, out[k])
        else:
            raise ValueError(f"merge: {k!r} is in both the trainable and the frozen tree")
    return out


def describe(trainable: Mapping, frozen: Mapping, size: Callable[[Any], int] | None = None) -> dict[str, int]:
    """``{"trainable": n, "frozen": m}`` parameter counts (for logs); ``size(leaf)`` defaults to its
    number of elements."""
    count = size or (lambda x: math.prod(x.shape))
    return {
        "trainable": sum(count(v) for _, v in _leaves(trainable)),
        "frozen": sum(count(v) for _, v in _leaves(frozen)),
    }
