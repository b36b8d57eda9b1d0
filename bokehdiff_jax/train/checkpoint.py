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

from pathlib import Path
from typing import Any

import grain
import jax
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
