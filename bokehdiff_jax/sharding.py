"""Meshes and sharding rules: the mesh axis names, ``make_mesh(config)``, the parameter and activation
rules, and the reading of the ambient mesh that ``models.attention.attend`` uses to pick sharded PISA.

One code path from one device to a pod: a single device is a ``(data=1, fsdp=1)`` mesh.

- ``DATA``: pure data parallelism (parameters replicated across it).
- ``FSDP``: data parallelism whose devices also split the big frozen weights (fully sharded data
  parallel): each holds a slice of a weight and XLA gathers it where it is used.
- The batch is split over both axes (``LOGICAL_RULES["batch"]``).

A mesh is made active with ``jax.set_mesh(mesh)`` (context manager or global setter); modules never
store one. Under it, ``ambient_axes`` tells code traced inside ``jit`` which of the axes it may split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bokehdiff_jax.errors import InputError

DATA = "data"
FSDP = "fsdp"
MESH_AXES: tuple[str, ...] = (DATA, FSDP)  # outer to inner: an FSDP group is neighbouring devices
BATCH_AXES: tuple[str, ...] = (DATA, FSDP)  # the mesh axes a batch is split over

# Logical activation axes -> mesh axes (flax's ``logical_axis_rules`` form); ``None``: replicated.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("tokens", None),
    ("heads", None),
    ("channels", None),
)

# Parameter rules: (regex over the ``/``-joined tree path, strategy); the first match wins.
# "fsdp": split the largest axis the FSDP size divides, for arrays of at least ``min_size`` elements;
# "replicate": a full copy on every device. LoRA factors (leaves ``A``, ``B``) are small and trained.
PARAM_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|.*/)(A|B)$", "replicate"),
    (r".*", "fsdp"),
)
STRATEGIES = ("fsdp", "replicate")
# Below this many elements a weight is replicated: gathering it would cost more than storing it.
MIN_FSDP_SIZE = 2**14


def _as_dict(shape: Any) -> dict[str, Any]:
    # A plain mapping or an ml_collections ConfigDict (which has keys() and [] but is no Mapping).
    if isinstance(shape, Mapping) or hasattr(shape, "keys"):
        return {k: shape[k] for k in shape.keys()}
    raise InputError(f"mesh config {shape!r}: expected a mapping of axis name to size, e.g. {{'data': -1}}")


def mesh_shape(shape: Any, n_devices: int) -> dict[str, int]:
    """The resolved ``{axis: size}`` (in ``MESH_AXES`` order, every axis present) of a mesh config.

    ``shape``: e.g. ``{"data": -1, "fsdp": 1}``; ``-1`` (at most one axis) takes the devices left; a
    missing axis has size 1. The sizes must multiply to ``n_devices``.
    """
    cfg = _as_dict(shape)
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise InputError(f"mesh axes {unknown}: expected only {list(MESH_AXES)}")
    sizes = {a: cfg.get(a, 1) for a in MESH_AXES}
    for a, s in sizes.items():
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
            raise InputError(f"mesh axis {a}={s!r}: expected a positive int or -1 (the devices left)")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise InputError(f"mesh axes {rest} are all -1: at most one axis may take the devices left")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if n_devices % fixed:
            raise InputError(f"mesh {cfg}: {n_devices} devices do not divide by the fixed axes' {fixed}")
        sizes[rest[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise InputError(f"mesh {cfg} has {math.prod(sizes.values())} devices: expected {n_devices}")
    return {a: int(s) for a, s in sizes.items()}


def make_mesh(shape: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh from a config such as ``{"data": -1, "fsdp": 1}`` (a mapping or a
    ``ConfigDict``; ``-1``: the devices left). ``devices``: default all of ``jax.devices()`` (every
    host's). Axes are ``Auto`` (XLA propagates shardings; explicit-sharding types are not used)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_spec(*names: str | None) -> P:
    """The ``PartitionSpec`` of an array whose axes have these logical names (``None``: replicated)."""
    rules = dict(LOGICAL_RULES)
    out = []
    for n in names:
        if n is not None and n not in rules:
            raise InputError(f"logical axis {n!r}: expected one of {sorted(rules)} or None")
        out.append(None if n is None else rules[n])
    return P(*out)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array of rank ``ndim``: batch over ``(data, fsdp)``."""
    return NamedSharding(mesh, logical_spec("batch", *([None] * (ndim - 1))))


def param_spec(shape: Sequence[int], strategy: str, fsdp_size: int, min_size: int = MIN_FSDP_SIZE) -> P:
    """``"fsdp"``: the largest axis that ``fsdp_size`` divides (the first of equal ones) on ``FSDP``, if
    the array has ``min_size`` elements or more and ``fsdp_size > 1``; otherwise (and for
    ``"replicate"``) replicated."""
    if strategy not in STRATEGIES:
        raise InputError(f"sharding strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "replicate" or fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    fits = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not fits:
        return P()
    axis = max(fits, key=lambda i: (shape[i], -i))
    return P(*([None] * axis), FSDP)


def param_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, str]] = PARAM_RULES,
    min_size: int = MIN_FSDP_SIZE,
) -> Any:
    """A tree of ``NamedSharding`` for a tree of arrays (or ``ShapeDtypeStruct``s, e.g. from
    ``jax.eval_shape``) by the first rule whose regex fully matches the leaf's ``/``-joined path."""
    compiled = [(re.compile(rx), strategy) for rx, strategy in rules]
    fsdp_size = mesh.shape.get(FSDP, 1)

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for rx, strategy in compiled:
            if rx.fullmatch(name):
                return NamedSharding(mesh, param_spec(np.shape(leaf), strategy, fsdp_size, min_size))
        raise InputError(f"no sharding rule matches parameter {name!r}: add one (rules are regexes)")

    return jax.tree_util.tree_map_with_path(one, tree)


def ambient_axes(names: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """The active abstract mesh (set by ``jax.set_mesh``; usable inside ``jit``) and those of ``names``
    it has with size above 1 and not in manual mode (inside a ``shard_map`` over them): the axes that
    code traced now may split. ``(mesh, ())`` when there is no mesh or nothing to split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return mesh, ()
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    usable = tuple(n for n in names if mesh.shape.get(n, 1) > 1 and types[n] != AxisType.Manual)
    return mesh, usable


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` with a sharding constraint from the logical names of its axes under the ambient mesh: an
    axis is split over its rule's mesh axes (those the mesh has, of size above 1, not manual) when
    their size divides it. A no-op without a mesh. Pins activations to the batch split so that
    FSDP-sharded weights do not make XLA spread them over other axes."""
    rules = dict(LOGICAL_RULES)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = []
    for name, size in zip(names, x.shape, strict=True):
        axes = ambient_axes(rules.get(name) or ())[1] if name is not None else ()
        spec.append(axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec))


def place(tree: Any, shardings: Any) -> Any:
    """Host values (NumPy or single-device arrays, equal on every process) -> global arrays with these
    shardings; each process builds only the shards its devices hold (works across hosts, where
    ``device_put`` of a local array onto devices of other processes does not)."""

    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree, shardings)
