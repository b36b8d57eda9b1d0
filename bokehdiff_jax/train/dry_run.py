"""``train --dry-run``: compile the full train step from abstract shapes only (no weights, no data) and
report what it would take: parameter counts by group, XLA's memory analysis per device, FLOPs, devices,
mesh. Written to ``WORKDIR/dry_run.json``.

Memory is what XLA's buffer assignment reserves for one device's program: ``argument_bytes`` (state,
frozen weights, batch shard, key), ``output_bytes`` (new state, metrics), ``alias_bytes`` (outputs that
reuse donated arguments), ``temp_bytes`` (activations and workspace) and ``total_bytes = argument +
output - alias + temp``, the peak the program needs. FLOPs are XLA's ``cost_analysis`` count for one
device's program, per step; XLA counts a loop's body once, so with ``optimizer.grad_accum = k`` the step
is counted as k times the program's count (``flops_xla``; the optimiser update, a few FLOPs per
trained parameter, is then counted k times too).

``--topology NAME`` compiles for a TPU slice this machine does not have (JAX's deviceless ahead-of-time
compilation: the TPU compiler from ``libtpu``, no TPU): the memory and FLOPs a real chip's program
would take, where the CPU backend's figures say little (it computes bf16 in f32 and may undo remat).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
from jax.experimental import topologies

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.atomic import atomic_path
from bokehdiff_jax.train.build import Run, param_counts
from bokehdiff_jax.train.config import to_dict
from bokehdiff_jax.train.step import compile_step

DRY_RUN_JSON = "dry_run.json"
GIB = 2**30


# A dry run needs XLA's buffer assignment and cost analysis, not fast machine code: on CPU, skipping
# LLVM's optimisations cuts compile time by ~40% and changes neither figure (same memory and FLOPs).
ANALYSIS_ONLY = {"xla_backend_optimization_level": 0}
# How a dry run's error starts when the step is over the target chip's memory (``bench train`` reads it).
DOES_NOT_FIT = "the step does not fit one"


def topology_devices(name: str) -> list[Any]:
    """The devices of the TPU slice ``name`` (JAX's topology names: ``v5e:1x1`` one v5e chip, ``v5e:2x4``
    eight, ``v5p:2x2x1``...), to compile for without one. Needs ``libtpu`` (``pip install 'jax[tpu]'``)."""
    if importlib.util.find_spec("libtpu") is None:
        raise InputError(
            f"--topology {name}: compiling for a TPU needs libtpu, which is not installed "
            "(pip install 'jax[tpu]'; no TPU is needed)"
        )
    # A compile-only process holds no chip: it need not take libtpu's one-process-per-host lock, nor ask
    # a cloud metadata server what TPU this machine has.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # libtpu's own message: an unknown name, or a slice smaller than one host
        first = e
    try:  # a slice smaller than a host (v5e:1x1): say that one host holds all of it
        dims = [int(d) for d in name.split(":")[1].split("x")]
        bounds = (dims + [1, 1, 1])[:3]
        return list(topologies.get_topology_desc(name, "tpu", chips_per_host_bounds=bounds).devices)
    except Exception:
        why = str(first).splitlines()[0]
        raise InputError(
            f"--topology {name}: not a TPU slice libtpu knows (e.g. v5e:1x1, v5e:2x4): {why}"
        ) from None


def compile_run(run: Run, compiler_options: dict[str, Any] | None = None) -> jax.stages.Compiled:
    """The AOT-compiled step of ``run``, from its abstract trees."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return compile_step(
        run.train_step,
        state=run.state,
        frozen=run.frozen,
        batch=run.batch,
        key=key,
        state_shardings=run.state_shardings,
        frozen_shardings=run.frozen_shardings,
        batch_shardings=run.batch_shardings,
        mesh=run.mesh,
        compiler_options=compiler_options,
    )


def memory_report(compiled: jax.stages.Compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def dry_run(run: Run, workdir: str | Path | None = None, topology: str | None = None) -> dict[str, Any]:
    """Compiles ``run``'s step and returns the report (also written to ``workdir/dry_run.json``);
    ``topology``: the TPU slice ``run``'s mesh was made for (recorded in the report)."""
    t0 = time.perf_counter()
    devices = run.mesh.devices.flatten().tolist()
    analysis_only = devices[0].platform == "cpu"
    try:
        compiled = compile_run(run, ANALYSIS_ONLY if analysis_only else None)
    except jax.errors.JaxRuntimeError as e:  # a TPU compile refuses a program over the chip's memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        why = " ".join(str(e).split("[type.googleapis")[0].split())
        raise InputError(f"{DOES_NOT_FIT} {devices[0].device_kind}: {why}") from None
    compile_s = time.perf_counter() - t0
    trainable, frozen = param_counts(run)
    per_device_batch = run.config.batch_size // len(devices)
    accum = run.config.optimizer.grad_accum
    flops_xla = flops(compiled)  # the accumulation loop's body counted once
    mem = memory_report(compiled)
    report = {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "memory": mem,
        "memory_gib": round(mem["total_bytes"] / GIB, 3),
        "flops": flops_xla * accum,
        "flops_xla": flops_xla,
        "flops_per_image": flops_xla * accum / max(per_device_batch, 1),
        "devices": {
            "count": len(devices),
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "processes": len({d.process_index for d in devices}),
        },
        "topology": topology,
        "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
        "batch_size": run.config.batch_size,
        "per_device_batch": per_device_batch,
        "grad_accum": accum,
        "resolution": run.config.resolution,
        "precision": run.config.precision,
        "remat": run.config.model.remat,
        "architecture": run.arch_source,
        "compile_s": round(compile_s, 2),
        "config": to_dict(run.config),
    }
    if workdir is not None and jax.process_index() == 0:
        path = Path(workdir) / DRY_RUN_JSON
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    return report
