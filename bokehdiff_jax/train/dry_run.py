"""``train --dry-run``: compile the full train step from abstract shapes only (no weights, no data) and
report what it would take: parameter counts by group, XLA's memory analysis per device, FLOPs, devices,
mesh. Written to ``WORKDIR/dry_run.json``.

Memory is what XLA's buffer assignment reserves for one device's program: ``argument_bytes`` (state,
frozen weights, batch shard, key), ``output_bytes`` (new state, metrics), ``alias_bytes`` (outputs that
reuse donated arguments), ``temp_bytes`` (activations and workspace) and ``total_bytes = argument +
output - alias + temp``, the peak the program needs. FLOPs are XLA's ``cost_analysis`` count for one
device's program, per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from bokehdiff_jax.io.atomic import atomic_path
from bokehdiff_jax.train.build import Run, param_counts
from bokehdiff_jax.train.config import to_dict
from bokehdiff_jax.train.step import compile_step

DRY_RUN_JSON = "dry_run.json"
GIB = 2**30


# A dry run needs XLA's buffer assignment and cost analysis, not fast machine code: on CPU, skipping
# LLVM's optimisations cuts compile time by ~40% and changes neither figure (same memory and FLOPs).
ANALYSIS_ONLY = {"xla_backend_optimization_level": 0}


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


def dry_run(run: Run, workdir: str | Path | None = None) -> dict[str, Any]:
    """Compiles ``run``'s step and returns the report (also written to ``workdir/dry_run.json``)."""
    t0 = time.perf_counter()
    analysis_only = jax.default_backend() == "cpu"
    compiled = compile_run(run, ANALYSIS_ONLY if analysis_only else None)
    compile_s = time.perf_counter() - t0
    trainable, frozen = param_counts(run)
    devices = run.mesh.devices.flatten().tolist()
    per_device_batch = run.config.batch_size // len(devices)
    mem = memory_report(compiled)
    report = {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "memory": mem,
        "memory_gib": round(mem["total_bytes"] / GIB, 3),
        "flops": flops(compiled),
        "flops_per_image": flops(compiled) / max(per_device_batch, 1),
        "devices": {
            "count": len(devices),
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "processes": jax.process_count(),
        },
        "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
        "batch_size": run.config.batch_size,
        "per_device_batch": per_device_batch,
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
