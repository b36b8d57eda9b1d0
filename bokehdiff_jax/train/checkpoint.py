"""Training checkpoints with orbax: named items, asynchronous, keep-last-N plus every K-th, atomic.

One checkpoint ``WORKDIR/checkpoints/<step>/`` holds::

    state/    the TrainState: step, trained params (LoRA, trained VAE parts, discriminator head),
              optimiser state, carried state (spectral vectors); sharded arrays, restored into their
              shardings on any mesh
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

ITEMS = ("state", "rng", "data", "config")
CHECKPOINTS = "checkpoints"


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
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
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
        data = jax.random.key_data(like_key)
        abstract_rng = {"key": jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)}
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    rng=ocp.args.StandardRestore(abstract_rng),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"checkpoint {self.directory / str(step)} does not fit this config's state ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); use a new --workdir"
            ) from None
        key = jax.random.wrap_key_data(out["rng"]["key"], impl=jax.random.key_impl(like_key))
        return out["state"], key

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


def restore_model_params(state_dir: str | os.PathLike) -> dict[str, Any]:
    """``params["model"]`` of a saved ``TrainState`` (the trainable model tree), as float32 NumPy arrays,
    by a partial restore: nothing else (optimiser state, discriminator) is read."""
    state_dir = Path(state_dir)
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
