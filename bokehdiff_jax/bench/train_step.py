"""``bokehdiff-jax bench train-step``: one LoRA training step, our jitted JAX step against PyTorch.

In one process, with the same small SDXL-shaped model and the same weights (U-Net ``bench.unet.SMALL_SDXL``,
VAE ``SMALL_VAE``: SDXL's 4-level layout at reduced width), CPU fp32, batch 2 of 256 x 256 images:

- ours: the training package's step (``train.build.make_run`` -> ``train.step.compile_step``): the one-step
  model forward, MSE + edge + LPIPS-VGG (paper weights 1 / 1 / 5), backward with respect to the LoRA and
  the VAE encoder parts only, per-group clipping and AdamW; jitted, state donated; remat off;
- PyTorch: ``torch.train_step.TorchTrainStep`` (diffusers U-Net + AutoencoderKL, peft LoRA via
  ``add_adapter``, the plain-torch LPIPS, eager, ``torch.optim.AdamW``), built from our trees;
- ours with PISA on (SPEC's layers, training mode): a second line, no PyTorch counterpart.

PISA is off on both sides for the ratio. The three are timed interleaved (one step of each per round), so
all see the same load; medians over rounds, the ratio ours / PyTorch, the loss of each at step 0 (and
after one update) with their difference, and how each step's CPU time spread over threads.
``--threads 1,2`` runs each thread count in a fresh process (``bench.common.limit_threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bokehdiff_jax.bench.unet import SMALL_SDXL
from bokehdiff_jax.io.flags import int_in

# SDXL's VAE layout (4 levels: 8x downsampling, 2 ResNets per level, mid-block attention, fp32 upcast,
# SDXL's scaling factor) at 1/4 of its width.
SMALL_VAE = {
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "scaling_factor": 0.13025,
    "force_upcast": True,
    "sample_size": 256,
}
GOAL = 0.7  # issue 8: ours <= 0.7x PyTorch's time
LOSS_TOL = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", type=int_in(8, 4096), default=256, help="image side in pixels (default 256)"
    )
    parser.add_argument("--batch", type=int_in(1, 256), default=2, help="images per step (default 2)")
    parser.add_argument("--repeats", type=int_in(1, 1000), default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="comma-separated thread counts, each run in a fresh process (default 1,2); 0: as the "
        "machine gives, in this process",
    )
    parser.add_argument("--no-pisa-line", action="store_true", help="skip the PISA-on line (ours only)")
    parser.add_argument(
        "--omp-passive",
        action="store_true",
        help="PyTorch's OpenMP threads sleep at barriers instead of spinning (OMP_WAIT_POLICY=PASSIVE): "
        "on a machine loaded by other jobs, spinning threads wait for preempted partners",
    )
    parser.add_argument("--seed", type=int_in(0), default=0, help="weights and data seed (default 0)")


def bench_config(
    unet: dict, vae: dict, *, size: int, batch: int, pisa: bool, seed: int = 0
) -> Any:  # ml_collections.ConfigDict
    """The training config of the benchmark: LoRA mode (SPEC's rank 8 LoRA + VAE encoder parts), fp32,
    no remat, MSE + edge + LPIPS at the paper's weights, no adversarial term, constant learning rate,
    PISA in SPEC's layers or nowhere."""
    from bokehdiff_jax.train.config import default_config, set_architecture

    c = default_config()
    set_architecture(c, unet=unet, vae=vae)
    c.base = "random"
    c.trainable = "lora"
    c.precision = "fp32"
    c.model.remat = False  # the PyTorch step keeps its activations too
    c.batch_size = batch
    c.resolution = size
    c.seed = seed
    if not pisa:
        c.pisa_paths = ()
    c.losses.adversarial = 0.0
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    return c


def make_batch(size: int, batch: int, seed: int) -> dict:
    """A seeded batch in the loader's format (NumPy, NHWC, [0, 1]): a smooth random image, its 5x5 box blur
    as the target, a tilted-plane disparity, focus 0.5, strength 8 px."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x7472])
    coarse = rng.uniform(0.0, 1.0, (batch, size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    aif = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :size, :size]
    aif = np.clip(aif + 0.1 * rng.standard_normal(aif.shape, np.float32), 0.0, 1.0)
    pad = np.pad(aif, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    bokeh = sum(pad[:, i : i + size, j : j + size] for i in range(5) for j in range(5)) / 25.0
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    disparity = np.broadcast_to(0.5 * ramp[None, :, None] + 0.5 * ramp[None, None, :], (batch, size, size))
    return {
        "aif": aif.astype(np.float32),
        "bokeh": bokeh.astype(np.float32),
        "disparity": np.ascontiguousarray(disparity),
        "focus": np.full((batch,), 0.5, np.float32),
        "strength": np.full((batch,), 8.0, np.float32),
    }


@dataclasses.dataclass
class JaxSide:
    """Our step and its arguments: ``step()`` runs one compiled update and returns its metrics;
    ``loss_terms()`` evaluates the step's loss function (``Objective.loss``) at the current state."""

    run: Any
    compiled: Any
    state: Any
    frozen: Any
    batch: Any
    compile_s: float

    def step(self) -> dict:
        import jax

        self.state, metrics = self.compiled(self.state, self.frozen, self.batch, self.run.run_key)
        return jax.block_until_ready(metrics)

    def loss_terms(self, params: Any = None) -> dict[str, float]:
        """The terms the step would report (``loss`` = the weighted total) for ``params`` (default: the
        current ones), without a gradient: the forward pass alone compiles in a fraction of the step's
        time."""
        import jax

        s = self.state
        key = jax.random.fold_in(self.run.run_key, s.step)  # as train.step draws it
        terms = self._loss_fn(
            s.params if params is None else params, s.carry, self.frozen, self.batch, key, s.step
        )
        return {k: float(v) for k, v in terms.items()}

    @functools.cached_property
    def _loss_fn(self) -> Any:
        import jax

        return jax.jit(lambda p, c, f, b, k, t: self.run.objective.loss(p, c, f, b, k, t)[1][0])


def build_jax(config: Any, batch: dict, *, lora_b_std: float = 0.0, compile: bool = True) -> JaxSide:
    """Our step for ``config`` on one device, compiled (unless ``compile=False``); ``lora_b_std > 0``
    moves the LoRA B factors off zero (seeded), so a test sees the LoRA in the forward pass."""
    import jax

    from bokehdiff_jax import sharding
    from bokehdiff_jax.train.build import initial_values, make_run
    from bokehdiff_jax.train.step import compile_step

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    run = make_run(config, mesh=mesh)
    state, frozen = initial_values(run)
    if lora_b_std > 0:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
        keys = jax.random.split(jax.random.fold_in(run.seed_key, 7), len(leaves))
        moved = [
            lora_b_std * jax.random.normal(k, x.shape, x.dtype) if getattr(p[-1], "key", None) == "B" else x
            for (p, x), k in zip(leaves, keys, strict=True)
        ]
        state = state.replace(params=jax.tree_util.tree_unflatten(treedef, moved))
    jbatch = jax.device_put(batch, run.batch_shardings)
    if not compile:
        return JaxSide(run, None, state, frozen, jbatch, 0.0)
    t0 = time.perf_counter()
    compiled = compile_step(
        run.train_step,
        state=state,
        frozen=frozen,
        batch=jbatch,
        key=run.run_key,
        state_shardings=run.state_shardings,
        frozen_shardings=run.frozen_shardings,
        batch_shardings=run.batch_shardings,
        mesh=mesh,
    )
    return JaxSide(run, compiled, state, frozen, jbatch, time.perf_counter() - t0)


def build_torch(side: JaxSide) -> Any:
    """The PyTorch step from our side's current trees (same weights, same loss and optimiser config)."""
    import jax
    import numpy as np

    from bokehdiff_jax.torch.train_step import TorchTrainStep

    config = side.run.config
    host = jax.tree_util.tree_map(np.asarray, (side.state.params["model"], side.frozen["model"]))
    optimizer = config.optimizer.to_dict()
    return TorchTrainStep.from_jax(
        side.run.objective.model,
        host[0],
        host[1],
        side.run.objective.losses,
        optimizer,
        lpips_weights=config.losses.lpips_weights or None,
    )


def torch_batch(batch: dict) -> dict:
    import numpy as np
    import torch

    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return {"aif": nchw(batch["aif"]), "bokeh": nchw(batch["bokeh"])}


def _timed(fn, record: dict) -> None:
    """Runs ``fn()``; appends its wall time and its CPU seconds per thread (busiest first) to ``record``."""
    from bokehdiff_jax.bench.common import thread_cpu_seconds

    before = thread_cpu_seconds()
    t0 = time.perf_counter()
    fn()
    record["wall"].append(time.perf_counter() - t0)
    after = thread_cpu_seconds()
    record["cpu"].append(sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True))


def _spread(cpu: list[list[float]]) -> str:
    """Median CPU seconds per step and the share of the two busiest threads."""
    total = statistics.median(sum(c) for c in cpu)
    first = statistics.median(c[0] / max(sum(c), 1e-9) for c in cpu)
    second = statistics.median((c[1] if len(c) > 1 else 0.0) / max(sum(c), 1e-9) for c in cpu)
    return f"CPU {total:6.2f} s/step, busiest threads {first:4.0%} + {second:4.0%}"


def _one(args: argparse.Namespace, threads: int) -> int:
    if args.omp_passive:
        if "torch" in sys.modules:
            print("warning: torch is already loaded; --omp-passive has no effect", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads its OpenMP runtime
    if threads > 0:
        from bokehdiff_jax.bench.common import limit_threads

        limit_threads(threads)
    import jax
    import numpy as np
    import torch

    batch = make_batch(args.size, args.batch, args.seed)
    off = build_jax(
        bench_config(SMALL_SDXL, SMALL_VAE, size=args.size, batch=args.batch, pisa=False, seed=args.seed),
        batch,
    )
    ref = build_torch(off)
    tb = torch_batch(batch)
    on = None
    if not args.no_pisa_line:
        on = build_jax(
            bench_config(SMALL_SDXL, SMALL_VAE, size=args.size, batch=args.batch, pisa=True, seed=args.seed),
            batch,
        )
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(off.frozen["model"]))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(off.state.params))
    print(
        f"train step: small SDXL-shaped U-Net + VAE ({n_frozen / 1e6:.1f} M frozen, {n_train / 1e6:.2f} M "
        f"trained: LoRA r8 + VAE encoder parts), batch {args.batch} x {args.size}^2, fp32, CPU, "
        f"threads: XLA pool {os.environ.get('PJRT_NPROC', 'default')}, torch {torch.get_num_threads()}"
        + (" (OMP_WAIT_POLICY=PASSIVE)" if args.omp_passive else "")
    )
    pisa_compile = f", ours + PISA {on.compile_s:.1f} s" if on else ""
    print(f"  compile (apart): ours {off.compile_s:.1f} s{pisa_compile}")
    # Step 0 and step 1: the losses of the same weights, then after one update on each side.
    losses = []
    for _ in range(2):
        m = off.step()
        t = ref.step(tb)
        losses.append((float(m["loss"]), t["loss"]))
    for i, (a, b) in enumerate(losses):
        print(f"  loss at step {i}: ours {a:.7f}  torch {b:.7f}  |diff| {abs(a - b):.2e}")
    step0_ok = abs(losses[0][0] - losses[0][1]) <= LOSS_TOL
    if on is not None:
        on.step()  # warm-up
    rounds = {k: {"wall": [], "cpu": []} for k in ("ours", "torch", "pisa")}
    for _ in range(args.repeats):
        _timed(off.step, rounds["ours"])
        _timed(lambda: ref.step(tb), rounds["torch"])
        if on is not None:
            _timed(on.step, rounds["pisa"])
    med = {k: statistics.median(r["wall"]) for k, r in rounds.items() if r["wall"]}
    print(f"  ours (jit), PISA off : {med['ours'] * 1e3:9.1f} ms  ({_spread(rounds['ours']['cpu'])})")
    print(f"  PyTorch eager        : {med['torch'] * 1e3:9.1f} ms  ({_spread(rounds['torch']['cpu'])})")
    ratio = med["ours"] / med["torch"]
    print(f"  ratio ours / PyTorch : {ratio:9.2f}  (goal <= {GOAL}; medians of {args.repeats} interleaved)")
    if on is not None:
        print(f"  ours (jit), PISA on  : {med['pisa'] * 1e3:9.1f} ms  ({_spread(rounds['pisa']['cpu'])})")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not step0_ok:
        print(f"error: step-0 losses differ by more than {LOSS_TOL}", file=sys.stderr)
        return 1
    return 0


def _thread_counts(spec: str) -> list[int]:
    from bokehdiff_jax.errors import InputError

    try:
        counts = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise InputError(f"--threads {spec!r}: expected comma-separated counts >= 0, e.g. 1,2")
    return counts


def run(args: argparse.Namespace) -> int:
    counts = _thread_counts(args.threads)
    if len(counts) == 1:
        return _one(args, counts[0])
    rc = 0
    # A fresh process per count (XLA sizes its thread pool once per process). Each compiles its own step:
    # a shared persistent compilation cache does not hit across thread counts (measured: the 2-thread
    # process compiled for 300 s after the 1-thread one had filled the cache).
    for n in counts:
        cmd = [
            sys.executable,
            "-m",
            "bokehdiff_jax.bench.train_step",
            f"--size={args.size}",
            f"--batch={args.batch}",
            f"--repeats={args.repeats}",
            f"--threads={n}",
            f"--seed={args.seed}",
        ]
        cmd += ["--no-pisa-line"] * args.no_pisa_line + ["--omp-passive"] * args.omp_passive
        sys.stdout.flush()
        rc = max(rc, subprocess.run(cmd, check=False).returncode)
    return rc


if __name__ == "__main__":  # one thread count in a fresh process (see ``run``)
    _parser = argparse.ArgumentParser(prog="bokehdiff-jax bench train-step")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
