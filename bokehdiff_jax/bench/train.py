"""``bokehdiff-jax bench train``: the training program's figures (issue 9 section 6).

1. Dry runs (``train --dry-run``: the full step compiled from abstract shapes, no weights) of the paper's
   single-GPU setup at 512 x 512, batch 2, in bf16 + remat and in fp32 (the released script's precision),
   and of the pod setup at 1024 x 1024, global batch 16 on 8 fake devices: XLA's memory per device against
   the goals (16 GiB, 40 GiB, 16 GiB) and FLOPs per step. Each runs in its own process (the fake device
   count is fixed when JAX starts).
2. From those FLOPs, the images per second per chip implied at 40% MFU on a TPU v5e (197 TFLOP/s bf16)
   and an H200 (989 TFLOP/s dense bf16), printed next to
3. a measured CPU figure: ``tiny_cpu`` trained for a few steps on this machine (images/s after
   compilation, and the FLOP rate that implies from its own dry-run count).

Prints a Markdown table for BENCHMARKS.md. CPU dry runs of full SDXL take minutes each (compilation),
half an hour or more on a loaded 2-core machine. With ``--target cpu`` the memory is the CPU backend's
buffer assignment, which upcasts bf16 compute to f32 (bf16 temporaries come out no smaller than fp32
ones); ``--target tpu`` compiles the same steps with the TPU compiler for v5e slices (one chip for the
single-GPU setup, ``v5e:2x4`` for the pod; ``train --dry-run --topology``, libtpu, no TPU): the memory a
real 16 GiB v5e chip's program takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bokehdiff_jax.train.dry_run import DOES_NOT_FIT

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
PEAK_TFLOPS = {"TPU v5e (bf16)": 197.0, "H200 (dense bf16)": 989.0}
MFU = 0.40
# name -> (config spec, overrides, fake CPU devices, TPU slice for --target tpu, memory goal GiB)
DRY_RUNS = {
    "sdxl_gpu1 bf16+remat 512px b2": ("configs/sdxl_gpu1.py", [], 1, "v5e:1x1", 16.0),
    "sdxl_gpu1 fp32 512px b2": ("configs/sdxl_gpu1.py", ["--config.precision=fp32"], 1, "v5e:1x1", 40.0),
    "tpu_pod bf16+remat 1024px b16/8": ("configs/tpu_pod.py", [], 8, "v5e:2x4", 16.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="*", default=None, help=f"dry runs to do, of: {', '.join(DRY_RUNS)}")
    p.add_argument(
        "--target",
        choices=("cpu", "tpu"),
        default="cpu",
        help="compile the dry runs for fake CPU devices, or for TPU v5e slices without a TPU (needs libtpu)",
    )
    p.add_argument("--tiny-steps", type=int, default=60, help="tiny_cpu steps for the CPU figure (0: skip)")
    p.add_argument(
        "--out", default=None, help="folder for the dry-run workdirs and reports (default: temporary)"
    )
    p.add_argument(
        "--summarize",
        metavar="WORKDIR",
        default=None,
        help="instead: step time, peak memory and MFU of a run in WORKDIR that also holds its dry_run.json",
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's peak, for --summarize's MFU")


def _bdj(args: list[str], devices: int, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env_extra)
    cmd = [sys.executable, "-m", "bokehdiff_jax.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def dry_run(name: str, out: Path, target: str = "cpu") -> dict:
    spec, overrides, devices, topology, goal = DRY_RUNS[name]
    work = out / f"{target}_{name}".replace(" ", "_").replace("/", "-").replace("+", "")
    args = ["--config", spec, "--workdir", str(work), "--dry-run", *overrides]
    if target == "tpu":
        args += ["--topology", topology]
    proc = _bdj(args, devices)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode == 2 and DOES_NOT_FIT in last:  # a TPU compile over the chip's HBM
        return {"does_not_fit": last.removeprefix("error: "), "goal_gib": goal}
    if proc.returncode != 0:
        raise RuntimeError(f"dry run {name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((work / "dry_run.json").read_text())
    report["goal_gib"] = goal
    return report


def implied_images_per_s(flops_per_image: float) -> dict[str, float]:
    return {chip: MFU * tf * 1e12 / flops_per_image for chip, tf in PEAK_TFLOPS.items()}


def tiny_cpu(steps: int, out: Path) -> dict:
    """Trains ``tiny_cpu`` for ``steps`` steps; images/s is the median over logged rows after the first."""
    work = out / "tiny_cpu"
    args = ["--config", "configs/tiny_cpu.py", "--workdir", str(work), "--no-progress"]
    args += [f"--config.steps={steps}", "--config.log_every=5", f"--config.checkpoint_every={steps}"]
    proc = _bdj(args, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny_cpu failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    dry = _bdj(["--config", "configs/tiny_cpu.py", "--workdir", str(work), "--dry-run"], 1)
    if dry.returncode != 0:
        raise RuntimeError(f"tiny_cpu dry run failed:\n{dry.stderr[-3000:]}")
    report = json.loads((work / "dry_run.json").read_text())
    ips = statistics.median(r["images_per_s"] for r in rows[1:])
    return {
        "images_per_s": ips,
        "flops_per_image": report["flops_per_image"],
        "achieved_gflops": ips * report["flops_per_image"] / 1e9,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "memory_gib": report["memory_gib"],
    }


def summarize(workdir: Path, peak_tflops: float) -> dict:
    """Step time (median over the logged steps after the first two: compilation and warm-up), peak
    device memory (the largest ``peak_memory_gib`` logged) and MFU = per-device FLOPs per step (from the
    dry run) / step time / peak."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((workdir / "dry_run.json").read_text())
    steady = rows[2:] or rows
    step_s = statistics.median(1.0 / r["steps_per_s"] for r in steady)
    peak = max((r.get("peak_memory_gib", 0.0) for r in rows), default=0.0)
    out = {
        "steps": len(rows),
        "step_s": step_s,
        "images_per_s": report["batch_size"] / step_s,
        "peak_memory_gib": peak,
        "dry_run_memory_gib": report["memory_gib"],
        "gflop_per_step_per_device": report["flops"] / 1e9,
        "mfu": report["flops"] / step_s / (peak_tflops * 1e12),
        "loss_first_last": (rows[0]["loss"], rows[-1]["loss"]),
        "device": report["devices"]["kind"],
    }
    print(json.dumps(out, indent=1))
    return out


def run(args: argparse.Namespace) -> int:
    if args.summarize:
        summarize(Path(args.summarize), args.peak_tflops)
        return 0
    names = args.only or list(DRY_RUNS)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_train_"))
    chips = list(PEAK_TFLOPS)
    backend = "CPU backend" if args.target == "cpu" else "TPU v5e compile"
    print(
        f"| setup | XLA memory / device, {backend} (goal) | GFLOP / step / device | "
        + " | ".join(f"img/s/chip at 40% MFU, {c}" for c in chips)
        + " | compile s |"
    )
    print("|---|---|---|" + "---|" * len(chips) + "---|")
    for name in names:
        r = dry_run(name, out, args.target)
        if "does_not_fit" in r:
            print(
                f"| {name} | {r['does_not_fit']} (<= {r['goal_gib']:.0f}: OVER) | - |"
                + " - |" * len(chips)
                + " - |"
            )
            continue
        ok = "ok" if r["memory_gib"] <= r["goal_gib"] else "OVER"
        implied = implied_images_per_s(r["flops_per_image"])
        print(
            f"| {name} | {r['memory_gib']:.2f} GiB (<= {r['goal_gib']:.0f}: {ok}) | {r['flops'] / 1e9:.0f} | "
            + " | ".join(f"{implied[c]:.2f}" for c in chips)
            + f" | {r['compile_s']:.0f} |",
            flush=True,
        )
    if args.tiny_steps:
        t = tiny_cpu(args.tiny_steps, out)
        print(
            f"\ntiny_cpu measured on this CPU: {t['images_per_s']:.2f} images/s, {t['achieved_gflops']:.2f} "
            f"GFLOP/s achieved ({t['flops_per_image'] / 1e9:.2f} GFLOP per image), "
            f"loss {t['loss_first']:.4f} -> {t['loss_last']:.4f} over {args.tiny_steps} steps, "
            f"{t['memory_gib']:.3f} GiB"
        )
    print(f"\nreports in {out}")
    return 0
