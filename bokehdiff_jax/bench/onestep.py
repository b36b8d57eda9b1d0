"""``bokehdiff-jax bench onestep``: the one-step render of a trained model (issue 13 sections 1 and 4).

Part ``cpu``: a small SDXL-shaped model (``bench.unet.SMALL_SDXL`` U-Net, ``SMALL_VAE``: SDXL's VAE
layout at a quarter width; LoRA rank 8 on SPEC's targets with non-zero B, modified VAE parts, PISA in
SPEC's layers), written once as a diffusers base plus a ``bokehdiff-jax export`` folder, then loaded by
both sides from those files: ``OneStep.from_checkpoint(export)`` (jitted, PISA ``impl="auto"``) and the
PyTorch ``BokehDiffPipeline.from_export`` (diffusers + peft + the PyTorch PISA processor, eager,
``torch.no_grad``). Same image, disparity, focus and strength; fp32 on the CPU; medians of interleaved
runs, their ratio, the outputs' max difference.

Part ``aot``: the full SDXL model (U-Net + VAE + LoRA), bf16 weights and compute (the VAE in fp32, as its
config's ``force_upcast`` says), lowered and compiled from abstract shapes only (no weights made):
- 1024 x 1024: the whole untiled render; XLA's ``memory_analysis`` and ``cost_analysis`` (FLOPs, bytes
  accessed); the PISA layers' share, as the difference between the render with PISA (dense, so the cost
  analysis counts every pair: blockwise/sparse loops are counted once by XLA) and with vanilla attention
  in the same layers, and as one PISA layer compiled alone times the number of PISA layers;
- 2048 x 2048: the one-pass U-Net step (latents 256 x 256, PISA as ``impl="auto"`` picks on an
  accelerator: sparse) that runs between the exact tiled VAE's encode and decode, and the VAE's FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bokehdiff_jax.io.flags import int_in

# SDXL's VAE layout (four levels, two ResNets per level, mid-block attention, f = 8) at a quarter width.
SMALL_VAE = {
    "block_out_channels": [32, 64, 128, 128],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--part",
        choices=["cpu", "aot", "device", "all"],
        default="all",
        help="cpu: JAX vs PyTorch; aot: full-SDXL AOT costs; device: full-SDXL timing on the default device "
        "(an accelerator: launch/gpu_check.sh); all: cpu and aot",
    )
    parser.add_argument(
        "--sizes", type=int_in(16, 4096), nargs="+", default=[256, 512], help="cpu part: image sides, px"
    )
    parser.add_argument("--repeats", type=int_in(1, 100), default=3, help="cpu part: timed runs per side")
    parser.add_argument(
        "--aot-sizes", type=int_in(64, 8192), nargs="+", default=[1024, 2048], help="aot part: image sides"
    )
    parser.add_argument("--workdir", default=None, help="cpu part: where the base and export go (a temp dir)")
    parser.add_argument(
        "--device-sizes",
        type=int_in(64, 8192),
        nargs="+",
        default=[1024, 2048],
        help="device part: image sides timed on the default device (random weights)",
    )
    parser.add_argument(
        "--device-impls",
        nargs="+",
        choices=["auto", "dense", "sparse", "blockwise", "vanilla"],
        default=["auto"],
        help="device part: PISA implementations to time at the first size (vanilla: no PISA)",
    )
    parser.add_argument(
        "--device-model",
        choices=["sdxl", "small"],
        default="sdxl",
        help="device part: the full SDXL (bf16) or the small SDXL-shaped model (fp32; to try it on a CPU)",
    )


# --------------------------------------------------------------------------------------------- cpu part
def _write_model(root: Path) -> tuple[Path, Path]:
    """A random small SDXL-shaped base (diffusers folders) and a trained model on it, exported."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bokehdiff_jax.bench.unet import SMALL_SDXL
    from bokehdiff_jax.convert.importers import base_vae_parts
    from bokehdiff_jax.convert.peft_files import lora_shapes
    from bokehdiff_jax.convert.prompt import FIXED_PROMPT
    from bokehdiff_jax.convert.trained import (
        ModelSpec,
        Trained,
        abstract_vae_parts,
        base_configs,
        flatten,
        unet_shapes,
        unflatten,
    )
    from bokehdiff_jax.export.bundle import export_model
    from bokehdiff_jax.models.attention import AttentionRouting
    from bokehdiff_jax.models.bokehdiff import random_prompt_embeds
    from bokehdiff_jax.models.options import LoRAConfig
    from bokehdiff_jax.models.partition import SPEC_VAE_TRAINABLE

    base = root / "base"
    torch.manual_seed(0)
    UNet2DConditionModel(**SMALL_SDXL).save_pretrained(base / "unet")
    AutoencoderKL(**SMALL_VAE).save_pretrained(base / "vae")
    unet_config, vae_config = base_configs(base)
    lora = LoRAConfig()
    rng = np.random.default_rng(0)
    shapes = flatten(lora_shapes(unet_shapes(base), lora))
    tree = unflatten({k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in shapes.items()})
    parts = base_vae_parts(base, abstract_vae_parts(vae_config, SPEC_VAE_TRAINABLE))
    vae = unflatten({k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32)
                     for k, v in flatten(parts).items()})  # fmt: skip
    spec = ModelSpec(unet_config, vae_config, lora, SPEC_VAE_TRAINABLE, AttentionRouting(), 499, FIXED_PROMPT,
                     {"path": str(base.resolve()), "fingerprint": None})  # fmt: skip
    trained = Trained(
        {"unet": {"lora": tree}, "vae": {"params": vae}}, random_prompt_embeds(unet_config), spec
    )
    export_model(trained, root / "export")
    return base, root / "export"


def _scene(size: int):
    """A textured image in [-1, 1] with a near disc over a tilted background: ``(image, disparity)``."""
    import numpy as np

    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(9 * xx + 3 * c) * np.cos(7 * yy - c) for c in range(3)], -1)
    image = (0.8 * image + 0.2 * rng.uniform(-1, 1, image.shape)).astype(np.float32)
    disparity = (0.2 + 0.3 * yy).astype(np.float32)
    disparity[(xx - 0.5) ** 2 + (yy - 0.55) ** 2 < 0.04] = 0.85
    return image[None], disparity[None]


def _cpu(sizes: list[int], repeats: int, workdir: str | None) -> None:
    import jax
    import numpy as np
    import torch

    from bokehdiff_jax.bench.common import median_time
    from bokehdiff_jax.pipeline import OneStep
    from bokehdiff_jax.torch import BokehDiffPipeline

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t0 = time.perf_counter()
        base, export = _write_model(Path(tmp))
        ours = OneStep.from_checkpoint(export)
        theirs = BokehDiffPipeline.from_export(export, base, check_base=False)
        print(f"small SDXL-shaped model written and loaded by both sides in {time.perf_counter() - t0:.1f} s")
        n_unet = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.variables["unet"]))
        n_vae = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.variables["vae"]))
        print(
            f"  U-Net {n_unet / 1e6:.1f} M params (LoRA included), VAE {n_vae / 1e6:.1f} M; fp32, "
            f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
        )
        focus, strength = 0.5, 0.1
        for size in sizes:
            image, disparity = _scene(size)
            k = strength * size  # CoC radii up to 0.065 of the side (a few tokens of the PISA layers)
            t0 = time.perf_counter()
            out_jax = np.asarray(jax.block_until_ready(ours(image, disparity, focus, k)))
            compile_s = time.perf_counter() - t0
            timg = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
            tdisp = torch.from_numpy(disparity)
            out_torch = theirs(timg, tdisp, focus, k).numpy().transpose(0, 2, 3, 1)
            err = float(np.abs(out_jax - out_torch).max() / np.abs(out_torch).max())
            run_jax = lambda: jax.block_until_ready(ours(image, disparity, focus, k))  # noqa: B023
            run_torch = lambda: theirs(timg, tdisp, focus, k)  # noqa: B023
            jt, tt = [], []
            for _ in range(repeats):  # interleaved: both sides see the same load
                jt.append(median_time(run_jax, repeats=1, warmup=0))
                tt.append(median_time(run_torch, repeats=1, warmup=0))
            j, t = statistics.median(jt), statistics.median(tt)
            print(
                f"  {size}x{size}: JAX {j:.3f} s, PyTorch {t:.3f} s, JAX / PyTorch {j / t:.2f} "
                "(goal <= 0.7); "
                f"max |diff| / max |torch| = {err:.1e}; first JAX call {compile_s:.1f} s (compile), "
                f"max CoC {k * 0.65:.1f} px"
            )


# --------------------------------------------------------------------------------------------- aot part
def _costs(lowered):
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return mem, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _random_variables(abstract, key):
    """Random weights shaped like ``abstract`` (kernels N(0, 0.02^2), norm scales 1, biases 0), made on
    the default device by one jitted program (timing only: the values do not matter, finiteness does)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def make(key):
        out = []
        for i, (path, sds) in enumerate(leaves):
            name = getattr(path[-1], "key", "")
            if name == "scale":
                out.append(jnp.ones(sds.shape, sds.dtype))
            elif name == "bias":
                out.append(jnp.zeros(sds.shape, sds.dtype))
            else:
                x = 0.02 * jax.random.normal(jax.random.fold_in(key, i), sds.shape, jnp.float32)
                out.append(x.astype(sds.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(make)(key)


def _device(sizes: list[int], impls: list[str], which: str, repeats: int) -> None:
    import jax

    from bokehdiff_jax.pipeline import OneStep

    dev = jax.devices()[0]
    print(f"one-step render on {dev.device_kind} ({dev.platform}), {which} model, random weights:")
    for impl in impls:
        model, abstract = (
            _small_model(impl)
            if which == "small"
            else _sdxl_model("auto" if impl == "vanilla" else impl, pisa=impl != "vanilla")
        )
        t0 = time.perf_counter()
        variables = jax.block_until_ready(_random_variables(abstract, jax.random.key(0)))
        made = time.perf_counter() - t0
        render = OneStep(model, variables, pisa_impl=None)
        for size in sizes if impl == impls[0] else sizes[:1]:
            _time_render(render, size, repeats, f"PISA {impl}", f"weights made in {made:.1f} s")
        del render, variables


def _time_render(render, size: int, repeats: int, what: str, note: str) -> None:
    import jax
    import numpy as np

    from bokehdiff_jax.bench.common import median_time

    dev = jax.devices()[0]
    image, disparity = _scene(size)
    k = 0.03 * size
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(render(image, disparity, 0.5, k)))
    first = time.perf_counter() - t0
    sec = median_time(
        lambda: jax.block_until_ready(render(image, disparity, 0.5, k)), repeats=repeats, warmup=0
    )
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    print(
        f"  {size}x{size}, {what}: {sec:.3f} s/image (median of {repeats}; first call {first:.1f} s incl. "
        f"compile; {note}); " + (f"peak device memory so far {peak / 2**30:.2f} GiB; " if peak else "")
        + f"tiled VAE: {render.needs_tiling(size, size)}; finite: {bool(np.all(np.isfinite(out)))}"
    )  # fmt: skip


def _small_model(impl: str):
    """The cpu part's small SDXL-shaped architecture (random init, fp32), for trying the device part."""
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.bench.unet import SMALL_SDXL
    from bokehdiff_jax.models.attention import AttentionRouting
    from bokehdiff_jax.models.bokehdiff import BokehDiff
    from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
    from bokehdiff_jax.models.options import LoRAConfig
    from bokehdiff_jax.pisa.config import PisaConfig

    routing = (
        AttentionRouting(pisa_paths=()) if impl == "vanilla" else AttentionRouting(pisa=PisaConfig(impl=impl))
    )
    model = BokehDiff.create(UNetConfig.from_diffusers(SMALL_SDXL), VAEConfig.from_diffusers(SMALL_VAE),
                             routing=routing, lora=LoRAConfig())  # fmt: skip
    cfg = model.unet.config
    cond = {
        "prompt_embeds": jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), jnp.float32),
        "text_embeds": jax.ShapeDtypeStruct((1, cfg.text_embeds_dim), jnp.float32),
    }
    return model, {**model.abstract_variables(), "cond": cond}


def _sdxl_model(impl: str, pisa: bool):
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.models.attention import AttentionRouting
    from bokehdiff_jax.models.bokehdiff import BokehDiff
    from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
    from bokehdiff_jax.models.options import LoRAConfig
    from bokehdiff_jax.pipeline.onestep import inference_model
    from bokehdiff_jax.pisa.config import PisaConfig

    routing = AttentionRouting(pisa=PisaConfig(impl=impl)) if pisa else AttentionRouting(pisa_paths=())
    model = BokehDiff.create(UNetConfig.sdxl(), VAEConfig.sdxl(), routing=routing, lora=LoRAConfig(),
                             dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)  # fmt: skip
    model = inference_model(model, None)
    cfg = model.unet.config
    variables = {
        **model.abstract_variables(),
        "cond": {
            "prompt_embeds": jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), jnp.float32),
            "text_embeds": jax.ShapeDtypeStruct((1, cfg.text_embeds_dim), jnp.float32),
        },
    }
    return model, variables


def _pisa_layers(model) -> list[tuple[str, int, int, int]]:
    """``(path, heads, head_dim, downsampling)`` of the U-Net's down-path self-attentions that use PISA
    (from the config and the routing: SPEC's are ``down_blocks.1.attentions.0.*.attn1``)."""
    cfg = model.unet.config
    out = []
    for i, kind in enumerate(cfg.down_block_types):
        if kind != "CrossAttnDownBlock2D":
            continue
        heads = cfg.num_attention_heads[i]
        for a in range(cfg.layers_per_block):
            for t in range(cfg.transformer_layers_per_block[i]):
                path = f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn1"
                if model.unet.routing.uses_pisa(path):
                    out.append((path, heads, cfg.block_out_channels[i] // heads, 2**i))
    return out


def _aot(sizes: list[int]) -> None:
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.models.attention import vanilla_attention
    from bokehdiff_jax.pipeline.onestep import VAE_TILE, lower_latent_step, lower_render
    from bokehdiff_jax.pisa import PisaConfig, pisa_attention

    gib = 2.0**30
    platform = jax.devices()[0].platform
    for size in sizes:
        print(f"full SDXL one-step render, {size}x{size}, bf16 weights and compute (VAE fp32), {platform}:")
        if size <= 1024:
            t0 = time.perf_counter()
            model, variables = _sdxl_model("dense", pisa=True)
            mem, flops, nbytes = _costs(lower_render(model, variables, size, size))
            print(
                f"  whole render (lower+compile {time.perf_counter() - t0:.0f} s): arguments "
                f"{mem.argument_size_in_bytes / gib:.2f} GiB, "
                f"temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, "
                f"{flops / 1e12:.2f} TFLOPs, {nbytes / gib:.1f} GiB accessed"
            )
            vmodel, vvars = _sdxl_model("dense", pisa=False)
            _, vflops, vbytes = _costs(lower_render(vmodel, vvars, size, size))
            print(
                f"  same with vanilla attention in the PISA layers: {vflops / 1e12:.2f} TFLOPs, "
                f"{vbytes / gib:.1f} GiB "
                f"accessed -> PISA adds {(flops - vflops) / flops:.2%} of the FLOPs, "
                f"{(nbytes - vbytes) / nbytes:.2%} of the bytes"
            )
            layers = _pisa_layers(model)
            lf = lb = 0.0
            for _path, heads, dim, down in layers:
                h = w = size // (8 * down)
                q = jax.ShapeDtypeStruct((1, h * w, heads, dim), jnp.bfloat16)
                dsp = jax.ShapeDtypeStruct((1, size, size), jnp.float32)
                vec = jax.ShapeDtypeStruct((1,), jnp.float32)
                fn = lambda q, k, v, d, f, s, h=h, w=w: pisa_attention(  # noqa: E731
                    q, k, v, grid=(h, w), disparity=d, focus=f, strength=s, config=PisaConfig(impl="dense")
                )
                _, pf, pb = _costs(jax.jit(fn).lower(q, q, q, dsp, vec, vec))
                _, af, ab = _costs(jax.jit(vanilla_attention).lower(q, q, q))
                lf, lb = lf + pf, lb + pb
            print(
                f"  {len(layers)} PISA layers compiled alone (dense: every pair): {lf / 1e9:.1f} GFLOPs "
                f"({lf / flops:.2%} of the render), {lb / gib:.2f} GiB accessed ({lb / nbytes:.2%}); "
                f"vanilla attention there: {len(layers) * af / 1e9:.1f} GFLOPs"
            )
        else:
            t0 = time.perf_counter()
            model, variables = _sdxl_model("auto", pisa=True)
            mem, flops, nbytes = _costs(lower_latent_step(model, variables, size, size))
            print(
                f"  one-pass U-Net step, latents {size // 8}^2, PISA sparse (lower+compile "
                f"{time.perf_counter() - t0:.0f} s): arguments {mem.argument_size_in_bytes / gib:.2f} GiB, "
                f"temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, >= {flops / 1e12:.2f} TFLOPs "
                "(XLA counts a loop body once)"
            )
            vae_mem, vae_flops, _ = _costs(
                jax.jit(lambda v, x, m=model: m.decode(v, m.encode(v, x))).lower(
                    variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
                )
            )
            print(
                f"  VAE encode + decode: {vae_flops / 1e12:.2f} TFLOPs; untiled it would need "
                f"{vae_mem.temp_size_in_bytes / gib:.1f} GiB of temporaries (mid-block attention over "
                f"{(size // 8) ** 2} tokens): it runs as the exact tiled VAE ({VAE_TILE} px tiles)"
            )
            # A tile op of the tiled VAE is about the VAE on one tile (plus its halo and the per-tile
            # statistics, small): the untiled VAE at the tile size bounds what one op holds.
            tile_mem, _, _ = _costs(
                jax.jit(lambda v, x, m=model: m.decode(v, m.encode(v, x))).lower(
                    variables, jax.ShapeDtypeStruct((1, VAE_TILE, VAE_TILE, 3), jnp.float32)
                )
            )
            step_gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / gib
            print(
                f"  the VAE on one {VAE_TILE} px tile (about one tiled-VAE op): temporaries "
                f"{tile_mem.temp_size_in_bytes / gib:.2f} GiB; the render's peak is the U-Net step's "
                f"{step_gib:.2f} GiB (arguments + temporaries) or the weights plus a tile op, the larger"
            )


def run(args: argparse.Namespace) -> int:
    if args.part in ("cpu", "all"):
        _cpu(args.sizes, args.repeats, args.workdir)
    if args.part in ("aot", "all"):
        _aot(args.aot_sizes)
    if args.part == "device":
        _device(args.device_sizes, args.device_impls, args.device_model, args.repeats)
    return 0
