"""The training loop: one function, ``train(config, workdir)`` (ARCHITECTURE habit 1: no trainer classes).

Order of events: join the other processes (``jax.distributed`` from the environment), build the run
from abstract shapes, check the workdir (a shape-changing config difference is an error before anything
is written), write ``config.json``, compile the step ahead of time (its memory and FLOPs are printed
before step 1), restore the latest checkpoint or initialise, then step.

Each step's metrics are fetched one step late (the device runs step ``n + 1`` while the host checks step
``n``), except at checkpoint steps, where every step up to the checkpoint is checked first: a non-finite
loss or gradient raises ``Diverged`` naming the step, and no checkpoint is ever made from a state after
it. SIGTERM finishes the current step, saves a checkpoint and returns (exit 0; pod preemption); with
several processes JAX's preemption service picks one step for all of them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import multihost

from bokehdiff_jax import sharding
from bokehdiff_jax.sharding import place
from bokehdiff_jax.train import config as config_lib
from bokehdiff_jax.train.build import Run, initial_values, make_run, param_counts
from bokehdiff_jax.train.checkpoint import Checkpoints
from bokehdiff_jax.train.data import make_dataset, to_global
from bokehdiff_jax.train.dry_run import compile_run, dry_run, flops, memory_report, topology_devices
from bokehdiff_jax.train.logs import Monitor
from bokehdiff_jax.train.step import abstract


class Diverged(RuntimeError):
    """A non-finite loss or gradient: ``step`` is the update that produced it (1-based)."""

    def __init__(self, step: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "objective", "grad_norm")
        )
        super().__init__(
            f"training diverged at step {step}: non-finite loss or gradient ({shown}); the last checkpoint "
            "is from before it"
        )
        self.step = step


def initialize_distributed() -> None:
    """Joins a multi-process run described by the environment; a no-op for one process.

    ``JAX_COORDINATOR_ADDRESS`` (host:port) with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: explicit
    (e.g. several processes on one machine); otherwise a cluster JAX detects itself (Cloud TPU pod
    slices, SLURM, Open MPI) when its variables say there is more than one host.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return
    if env.get("JAX_COORDINATOR_ADDRESS"):
        n, i = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(n) if n else None,
            process_id=int(i) if i else None,
        )
        return
    multi_host = (
        "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi_host:
        jax.distributed.initialize()


def _all_processes_ready(name: str, timeout_s: int = 3600) -> None:
    """Waits (a coordination-service barrier, no collective) until every process gets here. Processes
    compile and synthesize their first batch on their own, at different speeds, and the CPU backend's
    gloo collectives wait only 30 s for a late peer when they set up a communicator, so the first
    collective after those (orbax's sync, the step's all-reduce) would fail on a loaded host. A no-op
    for one process. ``name``: unique per barrier."""
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


class _StopFlag:
    """SIGTERM (preemption): ``should_stop(step)`` says whether to save and stop after ``step``.

    One process: a Python SIGTERM handler, restored on exit. Several: JAX's preemption service (the
    coordination service notices SIGTERM on any process and picks the same step for all, with no
    device collective: a per-step collective of its own, beside the step's, deadlocked the CPU backend
    now and then, and would make every step wait for the device)."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        def handler(signum, frame):
            self.set = True

        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not the main thread: no signal handling
                self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.set
        return multihost_utils.reached_preemption_sync_point(step)


def _host(metrics: Any) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in row order (no communication): the rows
    of the host batch it read."""
    shards = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _peak_memory_gib() -> float | None:
    """The largest device memory in use so far on this process's first device (None where the backend
    does not say: CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def prepare(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    for_dry_run: bool = False,
    devices: list[Any] | None = None,
) -> tuple[Run, list[str]]:
    """The run and notes for the user; refuses a workdir that cannot take this config (writes nothing).
    ``devices``: the mesh's (default: every process's)."""
    initialize_distributed()
    mesh = None if devices is None else sharding.make_mesh(config.mesh, devices)
    run = make_run(config, mesh=mesh, for_dry_run=for_dry_run)
    ckpt_dir = Path(workdir) / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    notes = config_lib.check_workdir(Path(workdir), config, has_ckpt)
    return run, notes


def train(
    config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True, echo=print
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint). Returns a summary:
    ``{"start_step", "step", "stopped" (by SIGTERM), "compile_s"}``. Raises ``Diverged``."""
    workdir = Path(workdir)
    run, notes = prepare(config, workdir)
    lead = jax.process_index() == 0
    for note in notes:
        echo(f"note: {note}") if lead else None
    if lead:
        config_lib.write_config(workdir, config)
    trainable, frozen_counts = param_counts(run)
    if lead:
        echo(
            f"devices: {jax.device_count()} ({jax.devices()[0].device_kind}) over {jax.process_count()} "
            f"process(es), mesh {dict(run.mesh.shape)}; architecture from {run.arch_source}"
        )
        echo(f"trainable params by group: {trainable}; frozen: {frozen_counts}")

    t0 = time.perf_counter()
    compiled = compile_run(run)
    compile_s = time.perf_counter() - t0
    mem = memory_report(compiled)
    if lead:
        echo(
            f"compiled the step in {compile_s:.1f} s: {mem['total_bytes'] / 2**30:.3f} GiB per device "
            f"(arguments {mem['argument_bytes'] / 2**30:.3f}, temporaries {mem['temp_bytes'] / 2**30:.3f}), "
            f"{flops(compiled) / 1e9:.2f} GFLOP per step per device"
        )

    _all_processes_ready("bokehdiff_jax.train.compiled")  # before orbax's first collective sync
    ckpts = Checkpoints(
        workdir,
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save,
    )
    iterator = iter(make_dataset(config, run.batch_shardings["aif"]))
    replicated = NamedSharding(run.mesh, P())
    key = jax.random.wrap_key_data(place(jax.random.key_data(run.run_key), replicated))
    state, frozen = initial_values(run)
    latest = ckpts.latest_step()
    if latest is not None:
        state, key = ckpts.restore(latest, abstract(run.state, run.state_shardings), key, iterator)
        if int(state.step) != latest:
            raise RuntimeError(f"checkpoint {latest} holds step {int(state.step)}")
        if lead:
            echo(f"resumed from the checkpoint at step {latest}")
    start = int(state.step)
    config_json = config_lib.to_dict(config)
    predict = jax.jit(run.objective.predict)
    monitor = Monitor(
        workdir,
        start_step=start,
        total_steps=config.steps,
        batch_size=config.batch_size,
        enabled=lead,
        progress=progress,
    )
    pending: list[tuple[int, Any, Any]] = []  # (step, device metrics, (host batch, device output) | None)

    def check(upto_all: bool) -> None:
        while pending and (upto_all or len(pending) > 1):
            step, metrics, images = pending.pop(0)
            host = _host(metrics)
            if not host.pop("finite"):
                raise Diverged(step, host)
            if step % config.log_every == 0 or step == config.steps:
                peak = _peak_memory_gib()
                monitor.log(step, host if peak is None else {**host, "peak_memory_gib": peak})
            if images is not None:
                monitor.images(step, images[0], _local_rows(images[1]))
            monitor.tick(step)

    step = start
    stopped = False
    try:
        with _StopFlag() as stop:
            while step < config.steps:
                batch_np = next(iterator)
                if step == start:  # every process has compiled and read its first batch
                    _all_processes_ready(f"bokehdiff_jax.train.first_step.{start}")
                batch = to_global(batch_np, run.batch_shardings)
                state, metrics = compiled(state, frozen, batch, key)
                step += 1
                images = None
                if config.image_every and step % config.image_every == 0:
                    images = (batch_np, predict(state.params, frozen, batch))
                pending.append((step, metrics, images))
                check(upto_all=False)
                stopped = stop.should_stop(step)
                if step % config.checkpoint_every == 0 or step == config.steps or stopped:
                    check(upto_all=True)  # never checkpoint a state without checking every step before it
                    ckpts.save(step, state, key, iterator, config_json)
                if stopped:
                    monitor.note(f"SIGTERM: saved the checkpoint at step {step}; stopping")
                    break
            check(upto_all=True)
    finally:
        ckpts.wait()
        ckpts.close()
        monitor.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return {"start_step": start, "step": step, "stopped": stopped, "compile_s": compile_s}


def train_dry_run(
    config: ml_collections.ConfigDict, workdir: str | Path, topology: str | None = None
) -> dict[str, Any]:
    """``--dry-run``: the compiled step's report (``dry_run.json``); writes ``config.json`` when absent.
    ``topology``: compile for that TPU slice (``dry_run.topology_devices``) instead of this machine."""
    workdir = Path(workdir)
    devices = None if topology is None else topology_devices(topology)
    run, _ = prepare(config, workdir, for_dry_run=True, devices=devices)
    if jax.process_index() == 0 and not (workdir / config_lib.CONFIG_JSON).exists():
        config_lib.write_config(workdir, config)
    return dry_run(run, workdir, topology)
