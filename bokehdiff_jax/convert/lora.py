"""peft <-> Flax LoRA weights: the key mapping and the layouts, both directions, strict.

Our LoRA is its own pytree (the ``"lora"`` collection of ``models.layers``): for each adapted module
``<flax path>/A`` and ``<flax path>/B``, with the base layer's layout (channels last)::

    Dense:  A [in, r]           B [r, out]
    Conv:   A [kh, kw, in, r]   B [r, out]        (A has the base conv's kernel, stride and padding)

peft stores the same factors as PyTorch modules ``<module>.lora_A`` / ``<module>.lora_B``::

    Linear: lora_A.weight [r, in]            lora_B.weight [out, r]
    Conv2d: lora_A.weight [r, in, kh, kw]    lora_B.weight [out, r, 1, 1]

Keys: ``<prefix><diffusers module path>.lora_A.weight``. ``peft.get_peft_model_state_dict(unet)`` has no
prefix; a diffusers pipeline LoRA file (``pytorch_lora_weights.safetensors``) prefixes ``unet.``; a live
peft model's ``state_dict()`` adds the adapter name (``.lora_A.default.weight``). The module path follows
``models.naming``. The scale ``alpha / r`` is not in the weights on either side (peft keeps it in its
``LoraConfig``, we in ``models.options.LoRAConfig``), so the caller carries it.

Every tensor must map one to one: unknown, missing, duplicated or wrongly shaped keys raise
``MappingError`` (an ``InputError``) listing all of them, never a partial result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bokehdiff_jax.convert.mapping import MappingError
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.naming import flax_module_to_torch, torch_module_to_flax

_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``(names, leaf)`` of a LoRA tree; every leaf must be an ``A`` or ``B`` under a module path."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if len(names) < 2 or names[-1] not in ("A", "B"):
            raise InputError(
                f"LoRA tree leaf {'/'.join(names)!r}: expected <module path>/A or <module path>/B"
            )
        out.append((names, leaf))
    return out


def _to_torch(factor: str, x: np.ndarray, conv: bool) -> np.ndarray:
    """Flax layout -> PyTorch layout (contiguous, so it can be written to safetensors as is)."""
    if factor == "A":  # [kh, kw, in, r] -> [r, in, kh, kw]; [in, r] -> [r, in]
        w = x.transpose(3, 2, 0, 1) if conv else x.T
    else:  # [r, out] -> [out, r, 1, 1] or [out, r]
        w = x.T[:, :, None, None] if conv else x.T
    return np.ascontiguousarray(w)


def _to_flax(factor: str, w: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout (the inverse of :func:`_to_torch`)."""
    if factor == "A":
        return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    return w.reshape(w.shape[:2]).T if w.ndim == 4 else w.T


def flax_lora_to_peft(lora_tree: Any, *, prefix: str = "unet.") -> dict[str, np.ndarray]:
    """Our ``"lora"`` collection -> peft tensors ``{prefix + module + ".lora_A.weight": [r, in], ...}``
    (NumPy, PyTorch layouts, the leaves' dtype). ``prefix="unet."`` is a diffusers pipeline LoRA file's
    spelling; ``prefix=""`` is what ``peft.set_peft_model_state_dict(unet, ...)`` takes."""
    leaves = _leaves(lora_tree)
    a_ndim = {names[:-1]: np.ndim(x) for names, x in leaves if names[-1] == "A"}
    out: dict[str, np.ndarray] = {}
    for names, x in leaves:
        module = names[:-1]
        if module not in a_ndim:
            raise InputError(f"LoRA tree: {'/'.join(module)} has a B factor but no A")
        out[f"{prefix}{flax_module_to_torch(module)}.lora_{names[-1]}.weight"] = _to_torch(
            names[-1], np.asarray(x), conv=a_ndim[module] == 4
        )
    return out


def peft_to_flax_lora(
    state_dict: Mapping[str, Any], abstract_lora_tree: Any, *, prefix: str = "unet.", adapter: str = "default"
) -> Any:
    """peft LoRA tensors -> a tree shaped like ``abstract_lora_tree`` (e.g. ``jax.eval_shape(module.init,
    ...)["lora"]``), NumPy leaves cast to its dtypes.

    Keys may carry ``prefix`` (stripped when present) and the adapter name ``adapter`` (peft's live
    ``state_dict()``; any other adapter name is unexpected). Values: anything ``np.asarray`` reads
    (NumPy, safetensors' NumPy reader, CPU float32 torch tensors). Strict: a key that is not a LoRA
    factor of a module in the tree, a missing factor, a duplicate or a shape mismatch is a
    ``MappingError`` listing all of them.
    """
    wanted = dict(_leaves(abstract_lora_tree))
    found: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    bad: set[tuple[str, ...]] = set()  # present but wrong: reported as mismatched, not also as missing
    for key, value in state_dict.items():
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        m = _KEY.fullmatch(name)
        if m is None or m["adapter"] not in (None, adapter):
            unexpected.append(key)
            continue
        try:
            names = (*torch_module_to_flax(m["module"]), m["factor"])
        except InputError:
            unexpected.append(key)
            continue
        if names not in wanted:
            unexpected.append(key)
        elif names in found or names in bad:
            mismatched.append(f"{key} (a second tensor for {'/'.join(names)})")
        else:
            x = _to_flax(m["factor"], np.asarray(value))
            leaf = wanted[names]
            if x.shape != tuple(leaf.shape):
                bad.add(names)
                mismatched.append(f"{key}: shape {tuple(np.shape(value))} does not fit {tuple(leaf.shape)}")
            else:
                found[names] = x.astype(leaf.dtype, copy=False)  # no second copy of a whole LoRA
    missing = sorted("/".join(n) for n in wanted if n not in found and n not in bad)
    if missing or unexpected or mismatched:
        raise MappingError(missing, sorted(unexpected), mismatched, "peft LoRA state dict")
    structure = jax.tree_util.tree_structure(abstract_lora_tree)
    return jax.tree_util.tree_unflatten(structure, [found[names] for names in wanted])
