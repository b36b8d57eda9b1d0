"""``bokehdiff-jax bench NAME``: benchmarks that print medians and ratios against a reference run
made in the same process. Their figures go into BENCHMARKS.md with the command that made them.

Each benchmark is a module ``bokehdiff_jax.bench.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "unet": "Flax U-Net forward vs diffusers PyTorch; full-SDXL memory and FLOPs from abstract shapes",
    "convert": "convert a random full-size SDXL U-Net from diffusers safetensors: time and peak RSS",
    "pisa": "PISA dense / blockwise / sparse vs a dense PyTorch reference: time and memory",
    "render": "scatter renderer and layered ray tracer vs a NumPy scatter reference: throughput",
    "synth": "synthesized targets: cost and convergence vs many-ray renders, blur distribution vs released",
    "export": "export / import of a full-size SDXL LoRA (rank 8) + VAE parts: time and peak RSS",
    "onestep": "one-step render with a trained model: JAX vs PyTorch on CPU; full-SDXL AOT memory/FLOPs",
    "train": "training: dry-run memory/FLOPs of sdxl_gpu1 and tpu_pod, implied img/s at 40%% MFU, CPU figure",
    "train-step": "one LoRA training step (model, MSE + edge + LPIPS, backward, AdamW): JAX vs PyTorch",
}


def _module(name: str) -> str:
    return f"bokehdiff_jax.bench.{name.replace('-', '_')}"  # train-step -> bench/train_step.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_ in BENCHMARKS.items():
        # argparse %-formats `help` but prints `description` as is: unescape "%%" there.
        p = sub.add_parser(name, help=help_, description=help_.replace("%%", "%"))
        importlib.import_module(_module(name)).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(_module(args.benchmark)).run(args)
