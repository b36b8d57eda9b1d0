"""Training checkpoints with orbax: named items, asynchronous, keep-last-N plus every K-th, atomic.

One checkpoint ``WORKDIR/checkpoints/<step>/`` holds::

    state/    the TrainState: step, trained params (LoRA, trained VAE parts, discriminator head),
              optimiser state, carried state (spectral vectors): replicated leaves packed into one
              vector per dtype, sharded ones as sharded arrays (``StateCodec``)
    layout/   the state's leaves (names, shapes, dtypes), checked on restore
    rng/      the run key (its raw key data)
    data/     the Grain iterator state, one file per process
    config/   the resolved config (JSON)

Frozen base weights are never saved here (they come from ``config.base``). Orbax writes each
checkpoint into a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoints usable and ``latest_step`` never sees a partial one. Saving is asynchronous: the arrays are
copied off the devices before ``save`` returns (the next step may donate them), the files are written in
the background.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.sharding import place

ITEMS = ("state", "layout", "rng", "data", "config")
CHECKPOINTS = "checkpoints"


def _name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class StateCodec:
    """How a TrainState is stored: replicated leaves packed on the host into one flat vector per dtype,
    sharded leaves (FSDP-split trained weights and their moments) as sharded arrays, named by path.

    Why: orbax writes each array as its own entry, at a few milliseconds each; a LoRA state has thousands
    of small replicated leaves (SDXL's LoRA, with two Adam moments, about 9,000), which packed cost one
    write. ``layout`` (names, shapes, dtypes in packing order) is saved beside, and restore refuses a
    checkpoint whose layout differs from this config's.
    """

    def __init__(self, abstract_state: Any) -> None:
        """``abstract_state``: the state's ``ShapeDtypeStruct``s with their shardings."""
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        self.names = [_name(p) for p, _ in with_path]
        self.leaves = [x for _, x in with_path]
        self.replicated = [x.sharding.is_fully_replicated for x in self.leaves]

    def layout(self) -> list[list[Any]]:
        return [
            [n, list(x.shape), str(x.dtype), r]
            for n, x, r in zip(self.names, self.leaves, self.replicated, strict=True)
        ]

    def _packed_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for x, r in zip(self.leaves, self.replicated, strict=True):
            if r:
                sizes[str(x.dtype)] = sizes.get(str(x.dtype), 0) + int(np.prod(x.shape))
        return sizes

    def encode(self, state: Any) -> dict[str, Any]:
        values = jax.tree_util.tree_leaves(state)
        packed: dict[str, list[np.ndarray]] = {}
        sharded: dict[str, Any] = {}
        for n, v, r in zip(self.names, values, self.replicated, strict=True):
            if r:  # every device (and process) holds the whole value: read one copy
                packed.setdefault(str(v.dtype), []).append(np.asarray(v.addressable_data(0)).ravel())
            else:
                sharded[n] = v
        return {"packed": {k: np.concatenate(v) for k, v in packed.items()}, "sharded": sharded}

    def abstract_encoded(self) -> dict[str, Any]:
        packed = {k: np.empty((n,), np.dtype(k)) for k, n in self._packed_sizes().items()}
        sharded = {n: x for n, x, r in zip(self.names, self.leaves, self.replicated, strict=True) if not r}
        return {"packed": packed, "sharded": sharded}

    def decode(self, encoded: dict[str, Any]) -> Any:
        offsets = dict.fromkeys(encoded["packed"], 0)
        out = []
        for n, x, r in zip(self.names, self.leaves, self.replicated, strict=True):
            if r:
                k = str(x.dtype)
                size = int(np.prod(x.shape))
                flat = np.asarray(encoded["packed"][k])[offsets[k] : offsets[k] + size]
                offsets[k] += size
                out.append(place(flat.reshape(x.shape), x.sharding))  # each process builds its shards
            else:
                out.append(encoded["sharded"][n])
        return jax.tree_util.tree_unflatten(self.treedef, out)


class Checkpoints:
    """A workdir's checkpoint manager (every process makes one and calls every method)."""

    def __init__(self, workdir: str | Path, *, keep: int, keep_every: int, async_save: bool = True) -> None:
        self.directory = Path(workdir).absolute() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # a killed save's temporary folder is removed on the next start
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=ITEMS,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "layout": ocp.JsonCheckpointHandler(),
                "rng": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, key: jax.Array, data_iterator: Any, config: dict) -> None:
        """Starts saving checkpoint ``step`` (returns once the arrays are off the devices)."""
        codec = StateCodec(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(codec.encode(state)),
                layout=ocp.args.JsonSave({"leaves": codec.layout()}),
                rng=ocp.args.StandardSave({"key": jax.random.key_data(key)}),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(
        self, step: int, abstract_state: Any, like_key: jax.Array, data_iterator: Any
    ) -> tuple[Any, jax.Array]:
        """``(state, run key)`` of checkpoint ``step``: the state restored into ``abstract_state``'s shapes
        and shardings (``ShapeDtypeStruct``s), the key in ``like_key``'s implementation and sharding;
        ``data_iterator`` is moved to the saved position in place."""
        codec = StateCodec(abstract_state)
        data = jax.random.key_data(like_key)
        abstract_rng = {"key": jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)}
        where = self.directory / str(step)
        layout = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
        if layout != {"leaves": codec.layout()}:
            raise InputError(
                f"checkpoint {where} holds a different state layout than this config; use a new --workdir"
            )
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(codec.abstract_encoded()),
                    rng=ocp.args.StandardRestore(abstract_rng),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"checkpoint {where} does not fit this config's state ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); use a new --workdir"
            ) from None
        key = jax.random.wrap_key_data(out["rng"]["key"], impl=jax.random.key_impl(like_key))
        return codec.decode(out["state"]), key

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------ reading a workdir (export, inference)
def is_workdir(path: str | os.PathLike) -> bool:
    """True for a training workdir or one of its ``checkpoints/<step>`` folders."""
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


def read_checkpoint_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The run config (JSON dict) saved with the checkpoint folder ``ckpt``."""
    path = Path(ckpt) / "config" / "metadata"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{Path(ckpt) / 'config'}: no readable run config ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the run config is not a JSON object")
    return data


def _restore_numpy(state_dir: Path, pick: Any) -> Any:
    """A partial restore of the saved tree at ``state_dir`` as NumPy: ``pick(metadata tree)`` chooses the
    sub-tree (same nesting) to read; nothing else is loaded."""
    try:
        tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
        sub = pick(tree)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise InputError(f"{state_dir}: not a training state with params['model'] ({e})") from None
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub, is_leaf=is_leaf)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), sub, is_leaf=is_leaf)
    with ocp.PyTreeCheckpointer() as ck:
        return ck.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
        )


def restore_model_params(state_dir: str | os.PathLike) -> dict[str, Any]:
    """``params["model"]`` of a saved ``TrainState`` (the trainable model tree), as float32 NumPy arrays,
    read without the optimiser state where the format allows: from ``StateCodec``'s packed vectors and
    sharded leaves, following the checkpoint's ``layout`` (or, for a checkpoint without one, by a partial
    restore of the plain tree). ``state_dir``: the checkpoint's ``state`` folder."""
    # Orbax finds a checkpoint's metadata only from an absolute path (a relative one reads as
    # "no metadata"), and a user passes workdirs relative to where they are.
    state_dir = Path(state_dir).absolute()
    layout_file = state_dir.parent / "layout" / "metadata"
    prefix = "params.model."
    if not layout_file.is_file():  # the first format: the TrainState tree itself
        out = _restore_numpy(state_dir, lambda t: {"params": {"model": t["params"]["model"]}})
        return jax.tree.map(lambda x: np.asarray(x, np.float32), out["params"]["model"])
    try:
        leaves = json.loads(layout_file.read_text())["leaves"]
        names = [(str(n), tuple(shape), str(dtype), bool(rep)) for n, shape, dtype, rep in leaves]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{layout_file}: not a readable state layout ({e})") from None
    wanted = [x for x in names if x[0].startswith(prefix)]
    if not wanted:
        raise InputError(f"{state_dir}: the state holds no params['model'] leaves")
    needed = {n for n, _, _, rep in wanted if not rep}
    encoded = _restore_numpy(
        state_dir,
        lambda t: {"packed": dict(t.get("packed", {})), "sharded": {n: t["sharded"][n] for n in needed}},
    )
    offsets: dict[str, int] = {}
    model: dict[str, Any] = {}
    for name, shape, dtype, rep in names:
        if rep:
            at = offsets.get(dtype, 0)
            size = int(np.prod(shape))
            offsets[dtype] = at + size
            if not name.startswith(prefix):
                continue
            value = np.asarray(encoded["packed"][dtype])[at : at + size].reshape(shape)
        elif name.startswith(prefix):
            value = np.asarray(encoded["sharded"][name])
        else:
            continue
        node = model
        *parents, leaf = name[len(prefix) :].split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.asarray(value, np.float32)
    return model
