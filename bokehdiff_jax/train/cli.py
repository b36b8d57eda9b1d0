"""``bokehdiff-jax train``: thin; parses arguments and calls ``train.loop``.

    bokehdiff-jax train --config configs/tiny_cpu.py --workdir runs/tiny
    bokehdiff-jax train --config configs/sdxl_gpu1.py:no_occlusion --workdir runs/abl \\
        --config.base=sdxl_jax/ --config.precision=fp32
    bokehdiff-jax train --config configs/tpu_pod.py --workdir gs://.../run --dry-run
    bokehdiff-jax train --config configs/tpu_pod.py --workdir runs/aot --dry-run --topology v5e:2x4
"""

from __future__ import annotations

import argparse
import json
import sys

from bokehdiff_jax.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="config file, optionally with variants: configs/X.py[:a,b]"
    )
    p.add_argument(
        "--workdir", required=True, help="run folder: config.json, checkpoints/, metrics.jsonl, ..."
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the step from abstract shapes only; write WORKDIR/dry_run.json and exit",
    )
    p.add_argument(
        "--topology",
        metavar="NAME",
        default=None,
        help="with --dry-run: compile for this TPU slice instead of this machine's devices, without a TPU "
        "(JAX topology names: v5e:1x1 one v5e chip, v5e:2x4 eight, v5p:2x2x1, ...; needs libtpu: "
        "pip install 'jax[tpu]')",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (metrics.jsonl and TensorBoard are still written)",
    )
    p.epilog = "Any config key can be overridden: --config.KEY=VALUE (e.g. --config.steps=100)."
    p.set_defaults(_accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from bokehdiff_jax.train import config as config_lib

    if args.topology and not args.dry_run:
        raise InputError(f"--topology {args.topology} compiles for a TPU you do not have: it needs --dry-run")
    config = config_lib.resolve(args.config, list(getattr(args, "extra", [])))
    from bokehdiff_jax.train import loop

    if args.dry_run:
        report = loop.train_dry_run(config, args.workdir, args.topology)
        shown = {
            k: report[k]
            for k in ("trainable_params", "frozen_params", "memory_gib", "flops", "mesh", "devices")
        }
        print(json.dumps(shown))
        return 0
    try:
        summary = loop.train(config, args.workdir, progress=not args.no_progress)
    except loop.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    how = "stopped by SIGTERM" if summary["stopped"] else "done"
    print(f"{how}: step {summary['step']} (started at {summary['start_step']}) in {args.workdir}")
    return 0
