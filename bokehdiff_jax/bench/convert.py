"""``bokehdiff-jax bench convert``: convert a random full-size SDXL U-Net (bf16 diffusers safetensors).

1. Writes a random SDXL U-Net (2.57 G params) as ``unet/diffusion_pytorch_model.safetensors`` in bf16
   into a temporary folder, streamed tensor by tensor (names and shapes from the Flax tree via the
   mapping's inverse, so no torch and no full model in memory).
2. Converts it with ``convert.weights.from_diffusers`` in a fresh subprocess and reports its wall
   time and peak RSS (``ru_maxrss`` of the child) against the bf16 weight bytes. Goal: <= 1.5x.
3. Optionally loads the converted checkpoint with ``load_unet`` in another subprocess (its output
   is the whole tree, so ~1x the weights plus the interpreter is the floor there).

The temporary folder (about 2 x 5.1 GB) is deleted afterwards; one a killed run left behind is
removed by the next run (``io.atomic.sweep_stale``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bokehdiff_jax.io.flags import int_in

CONVERT_SNIPPET = """
import sys
from bokehdiff_jax.convert.weights import from_diffusers
from_diffusers(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
"""
# Each child reports its own peak: RUSAGE_CHILDREN in the parent is a max over all children.
PEAK_SNIPPET = """
import resource
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
LOAD_SNIPPET = """
import sys, jax
from bokehdiff_jax.convert import load_unet
_, params = load_unet(sys.argv[1], dtype=sys.argv[2])
print(sum(x.size for x in jax.tree.leaves(params)))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default=None, help="where the temporary ~10 GB go (default: system temp)"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="converted dtype")
    parser.add_argument("--seed", type=int_in(0), default=0, help="seed of the random weights")
    parser.add_argument("--skip-load", action="store_true", help="skip the load_unet measurement")


def write_random_sdxl_unet(folder: Path, seed: int) -> int:
    """Streams a random bf16 SDXL U-Net in diffusers layout into ``folder``; returns the tensor bytes."""
    import ml_dtypes
    import numpy as np

    from bokehdiff_jax.convert import mapping, weights
    from bokehdiff_jax.io.safetensors_io import TensorSpec, write_safetensors
    from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR

    config = json.loads((SDXL_CONFIG_DIR / "unet_config.json").read_text())
    abstract = weights.abstract_params(weights.build_module("unet", config))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = []
    for path, leaf in mapping.iter_leaves(abstract):
        key, shape = mapping.torch_shape(path, tuple(leaf.shape))
        specs.append(TensorSpec(key, bf16, shape))
    rng = np.random.default_rng(seed)

    def tensors():
        for s in specs:  # one tensor alive at a time
            yield (0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(bf16)

    folder.mkdir(parents=True)
    write_safetensors(folder / weights.DIFFUSERS_WEIGHTS, specs, tensors(), {"format": "pt"})
    (folder / weights.CONFIG).write_text(json.dumps(config))
    return sum(int(np.prod(s.shape)) * 2 for s in specs)


def _child(snippet: str, *args: str) -> tuple[float, int, str]:
    """Runs ``snippet`` in a fresh interpreter; returns (wall s, its peak RSS in bytes, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", snippet + PEAK_SNIPPET, *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    *lines, last = proc.stdout.strip().splitlines()
    return wall, int(last.split()[1]) * 1024, "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from bokehdiff_jax.bench.common import peak_rss_bytes
    from bokehdiff_jax.errors import InputError
    from bokehdiff_jax.io.atomic import sweep_stale, temporary_folder

    workdir = Path(args.workdir or tempfile.gettempdir())
    if not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is not a folder")
    for note in sweep_stale(workdir):  # ~10 GB a killed run may have left
        print(f"note: {note}", file=sys.stderr)
    with temporary_folder(workdir, "bench_convert") as tmp:
        t0 = time.perf_counter()
        weight_bytes = write_random_sdxl_unet(tmp / "sdxl" / "unet", args.seed)
        write_s = time.perf_counter() - t0
        gb = weight_bytes / 1e9
        print(f"wrote random SDXL U-Net: {gb:.2f} GB bf16 in {write_s:.1f} s (writer peak RSS "
              f"{peak_rss_bytes() / 1e9:.2f} GB)")  # fmt: skip
        wall, peak, _ = _child(CONVERT_SNIPPET, str(tmp / "sdxl"), str(tmp / "ck"), args.dtype)
        out_bytes = (tmp / "ck" / "unet" / "params.safetensors").stat().st_size
        print(f"convert from-diffusers --dtype {args.dtype}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB = "
              f"{peak / weight_bytes:.2f}x the bf16 weights (goal <= 1.5x); "
              f"{weight_bytes / 1e6 / wall:.0f} MB/s; output {out_bytes / 1e9:.2f} GB")  # fmt: skip
        if not args.skip_load:
            wall, peak, n = _child(LOAD_SNIPPET, str(tmp / "ck"), args.dtype)
            print(f"load_unet({args.dtype}): {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB = "
                  f"{peak / weight_bytes:.2f}x the bf16 weights; {int(n):,} params")  # fmt: skip
    return 0
