"""``bokehdiff-jax bench unet``: the Flax U-Net against diffusers' PyTorch one, and full-SDXL costs.

Part 1, in one process with the same weights: a small SDXL-shaped U-Net, batch 1, fp32 on CPU, the
jitted Flax forward against diffusers' eager PyTorch forward (``torch.no_grad``); medians of
interleaved runs, their ratio, and the Flax compile time apart. Part 2: the full SDXL U-Net at
1024 x 1024 (latent 128 x 128) in bf16, lowered and compiled from abstract shapes only (no weights):
XLA's ``memory_analysis()`` and
``cost_analysis()`` FLOPs for the jitted forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bokehdiff_jax.io.flags import int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--latent", type=int_in(4, 512), default=64, help="latent side of the small-model run (default 64)"
    )
    parser.add_argument("--repeats", type=int_in(1, 1000), default=5, help="timed runs per side (default 5)")
    parser.add_argument(
        "--sdxl-latent",
        type=int_in(4, 1024),
        default=128,
        help="latent side for the full SDXL (128 = 1024 px)",
    )
    parser.add_argument(
        "--threads",
        type=int_in(0, 1),
        default=0,
        help="1: both sides single-threaded (steadier on a shared machine); 0: the libraries' defaults",
    )
    parser.add_argument("--skip-small", action="store_true", help="only the full-SDXL abstract analysis")
    parser.add_argument("--skip-sdxl", action="store_true", help="only the small-model timing")


# SDXL's layout at reduced width and depth: the same block types, text_time, linear projections.
SMALL_SDXL = {
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 2],
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": 256,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 6 * 32 + 128,
}


def _small(latent: int, repeats: int) -> None:
    import jax
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from bokehdiff_jax.bench.common import median_time
    from bokehdiff_jax.convert.mapping import diffusers_to_flax
    from bokehdiff_jax.models.configs import UNetConfig
    from bokehdiff_jax.models.unet import UNet2DConditionModel

    cfg = UNetConfig.from_diffusers(SMALL_SDXL)
    torch.manual_seed(0)
    ref = TorchUNet(**SMALL_SDXL).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, latent, latent, 4)).astype(np.float32)
    t = np.array([499.0], np.float32)
    ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
    text = rng.standard_normal((1, cfg.text_embeds_dim)).astype(np.float32)
    ids = np.array([[8 * latent, 8 * latent, 0, 0, 8 * latent, 8 * latent]], np.float32)

    module = UNet2DConditionModel(cfg)
    inputs = tuple(jax.device_put(a) for a in (x, t, ctx, text, ids))
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    params = diffusers_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, abstract)
    params = jax.device_put(params)
    fwd = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - t0

    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    targs = (tx, torch.from_numpy(t), torch.from_numpy(ctx))
    tkw = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(ids)}}

    def run_torch():
        with torch.no_grad():
            return ref(*targs, **tkw).sample

    out_flax = np.asarray(compiled(params, *inputs))
    out_torch = run_torch().numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(out_flax - out_torch).max() / np.abs(out_torch).max())
    # Interleaved, so both sides see the same load on a shared machine.
    run_flax = lambda: jax.block_until_ready(compiled(params, *inputs))
    run_flax(), run_torch()  # warm-up
    flax_t, torch_t = [], []
    for _ in range(repeats):
        flax_t.append(median_time(run_flax, repeats=1, warmup=0))
        torch_t.append(median_time(run_torch, repeats=1, warmup=0))
    flax_s, torch_s = statistics.median(flax_t), statistics.median(torch_t)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(
        f"small SDXL-shaped U-Net ({n_params / 1e6:.1f} M params), batch 1, latent {latent}x{latent}, fp32, "
        f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"  flax jit forward   : {flax_s * 1e3:9.1f} ms (median of {repeats}; "
        f"compile {compile_s:.1f} s apart)"
    )
    print(f"  torch eager forward: {torch_s * 1e3:9.1f} ms (median of {repeats})")
    print(f"  ratio flax / torch : {flax_s / torch_s:9.2f}  (goal <= 0.8)")
    print(f"  max |flax - torch| / max |torch| = {err:.2e}")


def _sdxl(latent: int) -> None:
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.models.configs import UNetConfig
    from bokehdiff_jax.models.unet import UNet2DConditionModel

    cfg = UNetConfig.sdxl()
    module = UNet2DConditionModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    inputs = (
        sds((1, latent, latent, 4)),
        sds((1,), jnp.float32),
        sds((1, 77, cfg.cross_attention_dim)),
        sds((1, cfg.text_embeds_dim)),
        sds((1, 6), jnp.float32),
    )
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    t0 = time.perf_counter()
    lowered = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(params, *inputs)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gib = 2.0**30
    print(
        f"full SDXL U-Net, bf16 params and compute, batch 1, {8 * latent}x{8 * latent} px "
        f"(latent {latent}x{latent}), {jax.devices()[0].platform}; lower+compile {compile_s:.1f} s"
    )
    if mem is not None:
        print(
            f"  arguments {mem.argument_size_in_bytes / gib:.2f} GiB, "
            f"outputs {mem.output_size_in_bytes / gib:.4f} GiB, "
            f"temporaries {mem.temp_size_in_bytes / gib:.2f} GiB"
        )
    if cost and "flops" in cost:
        print(f"  XLA cost analysis: {cost['flops'] / 1e12:.1f} TFLOPs per forward")


def run(args: argparse.Namespace) -> int:
    if args.threads == 1:
        import sys

        from bokehdiff_jax.bench.common import limit_threads

        # XLA's thread pool is sized once, from PJRT_NPROC (XLA flags do not shrink it: the earlier
        # "--xla_cpu_multi_thread_eigen=false" runs still used two threads on the JAX side).
        try:
            limit_threads(1)
        except RuntimeError as e:
            print(f"warning: {e}; --threads 1 applies to PyTorch only", file=sys.stderr)
            import torch

            torch.set_num_threads(1)
    if not args.skip_small:
        _small(args.latent, args.repeats)
    if not args.skip_sdxl:
        _sdxl(args.sdxl_latent)
    return 0
