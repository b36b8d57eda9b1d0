"""The declarative diffusers <-> Flax parameter table: one naming rule plus per-kind layout hooks.

Naming rule (its one home is ``bokehdiff_jax.models.naming``): a Flax module name is the
diffusers module name with each numeric index joined to the preceding name by ``"_"``::

    down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0.weight
    <-> ("down_blocks_1", "attentions_0", "transformer_blocks_1", "attn1", "to_out_0", "kernel")

There is one spelling: a linen name holding a ``"."`` is an error, so a checkpoint's keys never
depend on how a model happened to name its children.

An index may only follow one of the ``INDEXED_CONTAINERS`` (diffusers' ``ModuleList`` /
``Sequential`` attributes); that is what makes the rule invertible (``time_embedding.linear_1`` is a
module *called* ``linear_1``, not index 1 of ``linear``). A diffusers key that breaks the rule, or a
Flax leaf that fits no kind, is an error, never a guess.

Kinds (``KINDS``): a parameter's kind is fixed by its Flax leaf name and rank and the diffusers rank:

==================  ==========  ==========  =============================================
kind                Flax leaf   diffusers   layout change (diffusers -> Flax)
==================  ==========  ==========  =============================================
conv_kernel         kernel 4-D  weight 4-D  OIHW -> HWIO
dense_kernel        kernel 2-D  weight 2-D  (out, in) -> (in, out)
norm_scale          scale 1-D   weight 1-D  none
bias                bias 1-D    bias 1-D    none
==================  ==========  ==========  =============================================

``proj_in``/``proj_out`` are 2-D (linear projection) or 4-D 1x1 convs in both libraries, so they fall
under ``dense_kernel`` or ``conv_kernel`` with no special case.

Old diffusers VAE checkpoints name the mid-block attention ``query/key/value/proj_attn``
(``DEPRECATED_RENAMES``); they are accepted on input (as diffusers itself does) and never written.

Streaming: ``diffusers_to_flax`` takes any ``Mapping`` (e.g. a lazy safetensors reader) and reads,
converts and casts one tensor at a time, so only the output tree and one tensor are ever held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.safetensors_io import FLOAT_DTYPES
from bokehdiff_jax.models.naming import flax_module_to_torch

# Pre-0.14 diffusers VAE attention names -> current names (input only; diffusers renames them too).
DEPRECATED_RENAMES: dict[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

MAX_LISTED = 20  # per category in an error message; the counts are always exact


class MappingError(InputError):
    """Parameters did not match one to one. Carries the full lists for programmatic use."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], what: str):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        for label, items in (
            ("missing (Flax params with no source tensor)", missing),
            ("unexpected (source tensors with no Flax param)", unexpected),
            ("shape/kind mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:MAX_LISTED]) + (" ..." if len(items) > MAX_LISTED else "")
                parts.append(f"{len(items)} {label}: {shown}")
        super().__init__(f"{what} does not match the model one to one; " + "; ".join(parts))


@dataclasses.dataclass(frozen=True)
class Kind:
    """One parameter kind: how its leaf is named and laid out on each side."""

    name: str
    flax_leaf: str
    flax_ndim: int
    torch_leaf: str
    torch_ndim: int
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


KINDS: tuple[Kind, ...] = (
    Kind("conv_kernel", "kernel", 4, "weight", 4,
         lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    Kind("dense_kernel", "kernel", 2, "weight", 2, lambda w: w.T, lambda k: k.T),
    Kind("norm_scale", "scale", 1, "weight", 1, _identity, _identity),
    Kind("bias", "bias", 1, "bias", 1, _identity, _identity),
)  # fmt: skip
_BY_FLAX = {(k.flax_leaf, k.flax_ndim): k for k in KINDS}


def _apply_renames(module: str) -> str:
    head, _, last = module.rpartition(".")
    if last in DEPRECATED_RENAMES and head.endswith("mid_block.attentions.0"):
        return f"{head}.{DEPRECATED_RENAMES[last]}"
    return module


# ------------------------------------------------------------------------------------------ trees
def _unwrap(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """Accepts ``{"params": {...}}`` (what ``Module.init`` returns) or the inner dict."""
    if set(tree.keys()) == {"params"} and isinstance(tree["params"], Mapping):
        return tree["params"], True
    return tree, False


def iter_leaves(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yields ``(path, leaf)`` in sorted key order (deterministic: the order files are written in)."""
    for k in sorted(tree.keys()):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from iter_leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def kind_of(flax_leaf: str, ndim: int) -> Kind:
    """The kind of a Flax leaf; ``InputError`` if none fits."""
    kind = _BY_FLAX.get((flax_leaf, ndim))
    if kind is None:
        raise InputError(f"Flax leaf {flax_leaf!r} with {ndim} dims fits no parameter kind "
                         f"(known: {sorted(_BY_FLAX)})")  # fmt: skip
    return kind


def flax_key(path: tuple[str, ...]) -> str:
    """The diffusers key of a Flax path: ``(..., "to_out_0", "kernel")`` -> ``...to_out.0.weight``."""
    leaf = path[-1]
    torch_leaf = {k.flax_leaf: k.torch_leaf for k in KINDS}.get(leaf)
    if torch_leaf is None:
        raise InputError(f"Flax path {'/'.join(path)!r}: leaf {leaf!r} fits no parameter kind")
    return f"{flax_module_to_torch(path[:-1])}.{torch_leaf}"


# ------------------------------------------------------------------------------------- directions
@dataclasses.dataclass(frozen=True)
class Step:
    """One planned conversion: read ``key``, apply ``kind.to_flax``, store at ``path``."""

    key: str
    path: tuple[str, ...]
    kind: Kind
    shape: tuple[int, ...]  # Flax shape
    dtype: np.dtype  # the abstract leaf's dtype


def source_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading data when the mapping can (our safetensors readers' ``infos``)."""
    infos = getattr(tensors, "infos", None)
    if infos is not None:
        return {k: tuple(i.shape) for k, i in infos.items()}
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


def plan_diffusers_to_flax(
    shapes: Mapping[str, tuple[int, ...]], abstract_params: Mapping[str, Any], *, what: str = "checkpoint"
) -> list[Step]:
    """Checks names and shapes only (no data) and returns the steps in Flax path order.

    Raises ``MappingError`` (an ``InputError``) listing every missing key (Flax parameter with no
    source), unexpected key (source tensor with no Flax parameter) and shape mismatch at once.
    """
    inner, _ = _unwrap(abstract_params)
    # The inverse table, built from the target tree: diffusers key -> Flax path. A Flax leaf that
    # fits no kind, or two leaves sharing a key, is reported with the rest.
    table: dict[str, tuple[tuple[str, ...], Any]] = {}
    mismatched: list[str] = []
    for path, abstract in iter_leaves(inner):
        try:
            kind_of(path[-1], len(abstract.shape))
            key = flax_key(path)
        except InputError as e:
            mismatched.append(str(e))
            continue
        if key in table:
            mismatched.append(f"{'/'.join(path)} and {'/'.join(table[key][0])} both map to {key}")
        table[key] = (path, abstract)
    steps: dict[tuple[str, ...], Step] = {}
    claimed: set[tuple[str, ...]] = set()
    unexpected: list[str] = []
    for key in sorted(shapes):
        src_shape = tuple(shapes[key])
        module, _, torch_leaf = key.rpartition(".")
        target = table.get(f"{_apply_renames(module)}.{torch_leaf}")
        if target is None:
            unexpected.append(key)
            continue
        path, abstract = target
        if path in claimed:
            unexpected.append(f"{key} (duplicate of {'/'.join(path)})")
            continue
        claimed.add(path)  # a mismatch is reported once, as a mismatch, not also as missing
        want = tuple(abstract.shape)
        kind = kind_of(path[-1], len(want))
        if kind.torch_ndim != len(src_shape):
            mismatched.append(f"{key}: {src_shape} cannot map onto {'/'.join(path)} {want}")
            continue
        got = tuple(kind.to_flax(np.broadcast_to(np.zeros((), np.uint8), src_shape)).shape)
        if got != want:
            shown = f"{src_shape} -> {got}" if got != src_shape else f"{src_shape}"
            mismatched.append(f"{key}: {shown}, expected {want} at {'/'.join(path)}")
            continue
        steps[path] = Step(key, path, kind, want, np.dtype(abstract.dtype))
    missing = [f"{'/'.join(p)} (= {k})" for k, (p, _) in sorted(table.items()) if p not in claimed]
    if missing or unexpected or mismatched:
        raise MappingError(missing, unexpected, mismatched, what)
    return [steps[p] for p in sorted(steps)]


def run_step(step: Step, tensors: Mapping[str, np.ndarray], dtype: Any = None) -> np.ndarray:
    """Reads one source tensor, changes its layout and casts it (to ``dtype`` or the abstract dtype).

    An integer or boolean source is refused: a parameter is a float, and a cast would change it."""
    src = tensors[step.key]
    if np.dtype(src.dtype) not in FLOAT_DTYPES:
        raise InputError(f"{step.key}: stored as {np.dtype(src.dtype)}; parameters must be floating point")
    arr = step.kind.to_flax(src)
    # ascontiguousarray after the cast: one copy per tensor, never of the whole checkpoint.
    return np.ascontiguousarray(arr.astype(np.dtype(dtype if dtype is not None else step.dtype), copy=False))


def diffusers_to_flax(
    tensors: Mapping[str, np.ndarray],
    abstract_params: Mapping[str, Any],
    *,
    dtype: Any = None,
    leaf_fn: Callable[[np.ndarray], Any] | None = None,
    what: str = "checkpoint",
) -> dict[str, Any]:
    """Maps a diffusers state dict onto a Flax parameter tree, strictly.

    Args:
      tensors: diffusers key -> array (torch layout). May be lazy: each value is read once, after
        all names and shapes have been checked (``plan_diffusers_to_flax``).
      abstract_params: the target tree (``jax.eval_shape(module.init, ...)`` output, or any tree of
        objects with ``.shape`` and ``.dtype``), with or without the outer ``{"params": ...}``.
      dtype: cast every tensor to this dtype; default: each abstract leaf's dtype.
      leaf_fn: applied to each converted NumPy array before it goes into the tree (e.g.
        ``jnp.asarray`` to move it to the device one tensor at a time).
      what: names the source in error messages.

    Returns the filled tree, wrapped like ``abstract_params``. Raises ``MappingError`` (an
    ``InputError``) listing every missing key, unexpected key and shape mismatch at once.
    """
    _, wrapped = _unwrap(abstract_params)
    out: dict[str, Any] = {}
    for step in plan_diffusers_to_flax(source_shapes(tensors), abstract_params, what=what):
        arr = run_step(step, tensors, dtype)
        _set(out, step.path, leaf_fn(arr) if leaf_fn is not None else arr)
    return {"params": out} if wrapped else out


def iter_flax_to_diffusers(params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(diffusers key, torch-layout array)`` one parameter at a time, in Flax path order.

    Arrays keep their dtype (no cast), so Flax -> diffusers -> Flax is bit-identical.
    """
    inner, _ = _unwrap(params)
    for path, leaf in iter_leaves(inner):
        arr = np.asarray(leaf)
        kind = kind_of(path[-1], arr.ndim)
        yield f"{flax_module_to_torch(path[:-1])}.{kind.torch_leaf}", np.ascontiguousarray(kind.to_torch(arr))


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The diffusers key and shape of a Flax parameter, from its path and shape only (no data)."""
    kind = kind_of(path[-1], len(flax_shape))
    probe = np.broadcast_to(np.zeros((), np.uint8), flax_shape)  # a zero-byte stand-in for the data
    return f"{flax_module_to_torch(path[:-1])}.{kind.torch_leaf}", tuple(kind.to_torch(probe).shape)


def flax_to_diffusers(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax tree -> diffusers state dict (NumPy, torch layout). See ``iter_flax_to_diffusers``."""
    out: dict[str, np.ndarray] = {}
    for key, arr in iter_flax_to_diffusers(params):
        if key in out:
            raise InputError(f"two Flax parameters map to the diffusers key {key!r}")
        out[key] = arr
    return out
