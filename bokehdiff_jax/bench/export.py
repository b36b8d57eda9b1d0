"""``bokehdiff-jax bench export``: export and import of a full-size SDXL model (LoRA rank 8 on SPEC's 14
targets, random, plus the trained VAE parts): wall time and peak RSS over the interpreter's baseline.

1. Setup (not measured): a *sparse* SDXL base folder (diffusers ``unet/`` and ``vae/`` whose safetensors
   hold the real headers, names and shapes from diffusers' own models built on the ``meta`` device, with
   unwritten data: the export/import paths read only headers and configs), and a random trained model in
   our trained-model folder.
2. ``export``: ``load_trained`` + ``export_model`` in a fresh subprocess.
3. ``import``: ``import_lora`` of that export + ``save_trained`` in another fresh subprocess; the result
   must equal the original bit for bit.

Each child imports everything, resets the kernel's peak-RSS mark, then works: the peak (VmHWM) minus the
RSS before the work is compared with the LoRA file's size (goal <= 2x). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bokehdiff_jax.io.flags import int_in

# Children: import everything and start JAX's CPU client (the baseline), reset the kernel's peak-RSS mark
# (``/proc/self/clear_refs``), work, then report the new peak (VmHWM) over the baseline (VmRSS).
_CHILD = """
import sys, time
import jax, numpy as np
import bokehdiff_jax.models.partition, bokehdiff_jax.models.vae, bokehdiff_jax.models.bokehdiff
from bokehdiff_jax.convert.importers import import_lora
from bokehdiff_jax.convert.trained import load_trained, save_trained
from bokehdiff_jax.export.bundle import export_model
jax.numpy.zeros(1).block_until_ready()  # the XLA CPU client: part of the interpreter's baseline

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
{work}
print("result", base, status("VmHWM"), time.perf_counter() - t0)
"""
EXPORT_SNIPPET = _CHILD.replace("{work}", "export_model(load_trained(sys.argv[1]), sys.argv[2])")
IMPORT_SNIPPET = _CHILD.replace(
    "{work}", "save_trained(import_lora(sys.argv[1], sys.argv[2], fingerprint=False), sys.argv[3])"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="where the temporary files go (default: system temp)")
    parser.add_argument("--rank", type=int_in(1, 256), default=8, help="LoRA rank of the random model")
    parser.add_argument("--seed", type=int_in(0), default=0, help="seed of the random weights")
    parser.add_argument(
        "--repeats", type=int_in(1, 100), default=3, help="runs of each child; medians are reported"
    )


def write_sparse_base(root: Path) -> None:
    """diffusers ``unet/`` and ``vae/`` folders of SDXL with real safetensors headers and sparse (unwritten)
    data: enough for everything that reads names, shapes and configs."""
    import struct

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bokehdiff_jax.models.configs import SDXL_CONFIG_DIR

    for component, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        config = json.loads((SDXL_CONFIG_DIR / f"{component}_config.json").read_text())
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k in sorted(shapes):
            n = 4 * int(torch.Size(shapes[k]).numel())
            header[k] = {"dtype": "F32", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        folder = root / component
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        path = folder / "diffusion_pytorch_model.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)


def write_random_trained(base: Path, dst: Path, rank: int, seed: int) -> int:
    """A random trained model (LoRA rank ``rank`` with non-zero B, VAE parts) on ``base``; returns the
    number of LoRA parameters."""
    import numpy as np

    from bokehdiff_jax.convert.peft_files import lora_shapes
    from bokehdiff_jax.convert.trained import (
        ModelSpec,
        Trained,
        abstract_vae_parts,
        base_configs,
        flatten,
        save_trained,
        unet_shapes,
        unflatten,
    )
    from bokehdiff_jax.models.attention import AttentionRouting
    from bokehdiff_jax.models.bokehdiff import random_prompt_embeds
    from bokehdiff_jax.models.options import LoRAConfig
    from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE

    unet_config, vae_config = base_configs(base)
    lora = LoRAConfig(rank=rank, alpha=float(rank))
    rng = np.random.default_rng(seed)
    draw = lambda tree: unflatten(  # noqa: E731
        {k: (0.02 * rng.standard_normal(v.shape, dtype=np.float32)) for k, v in flatten(tree).items()}
    )
    shapes = lora_shapes(unet_shapes(base), lora)
    trainable = {
        "unet": {"lora": draw(shapes)},
        "vae": {"params": draw(abstract_vae_parts(vae_config, SPEC_VAE_TRAINABLE))},
    }
    spec = ModelSpec(unet_config, vae_config, lora, SPEC_VAE_TRAINABLE, AttentionRouting(), 499, "bench",
                     {"path": str(base), "fingerprint": None})  # fmt: skip
    save_trained(Trained(trainable, random_prompt_embeds(unet_config, seed), spec, "bench"), dst)
    return sum(int(np.prod(v.shape)) for v in flatten(shapes).values())


def _child(snippet: str, *args: str) -> tuple[float, float]:
    """``(seconds, peak RSS over the child's baseline in bytes)`` of one fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", snippet, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("result"))
    _, base, peak, dt = line.split()
    return float(dt), float(int(peak) - int(base))


def run(args: argparse.Namespace) -> int:
    import contextlib
    import statistics

    import numpy as np

    from bokehdiff_jax.convert.trained import TRAINABLE
    from bokehdiff_jax.errors import InputError
    from bokehdiff_jax.io.atomic import sweep_stale, temporary_folder
    from bokehdiff_jax.io.safetensors_io import SafetensorsFile

    workdir = Path(args.workdir or tempfile.gettempdir())
    if not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is not a folder")
    for note in sweep_stale(workdir):  # what a killed run left
        print(f"note: {note}", file=sys.stderr)
    scratch = contextlib.ExitStack()
    root = scratch.enter_context(temporary_folder(workdir, "bench_export"))
    try:
        t0 = time.perf_counter()
        write_sparse_base(root / "base")
        n_lora = write_random_trained(root / "base", root / "trained", args.rank, args.seed)
        print(f"setup: sparse SDXL base, random model (LoRA rank {args.rank}: {n_lora / 1e6:.2f} M params) "
              f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        exports, imports = [], []
        for i in range(args.repeats):
            exports.append(_child(EXPORT_SNIPPET, str(root / "trained"), str(root / f"export{i}")))
            imports.append(
                _child(IMPORT_SNIPPET, str(root / f"export{i}"), str(root / "base"), str(root / f"back{i}"))
            )
        lora_bytes = (root / "export0" / "pytorch_lora_weights.safetensors").stat().st_size
        with (
            SafetensorsFile(root / "trained" / TRAINABLE) as a,
            SafetensorsFile(root / "back0" / TRAINABLE) as b,
        ):
            same = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
        mb = 1024.0**2
        print(
            f"LoRA file: {lora_bytes / mb:.1f} MiB; round trip ours -> export -> import bit-identical: {same}"
        )
        for name, runs in (("export", exports), ("import", imports)):
            dt = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            ratio = rss / lora_bytes
            print(f"{name}: {dt:.2f} s, peak RSS over baseline {rss / mb:.0f} MiB = {ratio:.2f}x the LoRA "
                  f"file (goal <= 2x)  [median of {len(runs)}]")  # fmt: skip
        return 0 if same else 1
    finally:
        scratch.close()
