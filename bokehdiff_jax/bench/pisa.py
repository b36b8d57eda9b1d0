"""``bokehdiff-jax bench pisa``: PISA dense / blockwise / sparse vs a dense PyTorch reference.

The scene is the embedded motorcycle (``bokehdiff_jax.data.samples.motorcycle``: disparity holes filled
from valid neighbours, normalised to [0, 1] with near = 1), stretched to a square ``--image`` pixels;
``K`` is chosen so the largest CoC radius is ``--max-coc`` image pixels (issue 3: ~40 px at 1024^2).
Times are medians over ``--repeats`` runs after a warm-up; memory is XLA's compile-time temp allocation
(``memory_analysis().temp_size_in_bytes``) for JAX, and the peak RSS growth of a fresh process for
PyTorch. JAX dense configurations whose ``N^2 T S`` ray samples exceed ``--dense-max-samples`` are
compiled for their memory figure but not run, and the PyTorch reference is not run above
``--torch-max-samples`` (it materialises them: they would not fit this machine next to other work).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bokehdiff_jax.io.flags import float_in, int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes", type=int_in(2, 512), nargs="+", default=[32, 64, 128], help="token grid sides: N = side^2"
    )
    parser.add_argument("--heads", type=int_in(1, 64), default=10, help="attention heads")
    parser.add_argument("--head-dim", type=int_in(1, 512), default=64, help="channels per head")
    parser.add_argument(
        "--segments", type=int_in(1, 64), default=7, help="T: occlusion samples along each query-key segment"
    )
    parser.add_argument(
        "--supersample", type=int_in(1, 16), default=5, help="S: disparity samples per token (its sub-pixels)"
    )
    parser.add_argument(
        "--image", type=int_in(8, 8192), default=1024, help="image side in pixels the tokens stand for"
    )
    parser.add_argument(
        "--max-coc", type=float_in(0, 4096), default=40.0, help="largest CoC radius, image pixels (sets K)"
    )
    parser.add_argument(
        "--block", type=int_in(1, 4096), default=128, help="blockwise/sparse block size (queries and keys)"
    )
    parser.add_argument(
        "--tolerance", type=float_in(0, 1), default=1e-6, help="sparse: weight below which a block is skipped"
    )
    parser.add_argument(
        "--repeats", type=int_in(1, 1000), default=3, help="timed runs per measurement (median)"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=["torch", "dense", "blockwise", "sparse"],
        default=["torch", "dense", "blockwise", "sparse"],
        help="implementations to run (torch = the dense PyTorch reference)",
    )
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument(
        "--dense-max-samples",
        type=float_in(0),
        default=2e9,
        help="largest N^2 T S run by JAX dense (larger: compiled for memory only)",
    )
    parser.add_argument(
        "--torch-max-samples", type=float_in(0), default=1e8, help="largest N^2 T S run by torch"
    )
    parser.add_argument(
        "--max-seconds", type=float_in(0), default=120.0, help="skip timing runs slower than this, seconds"
    )


def _torch_dense(q, k, v, xy, d_tok, radius, fine, offsets, image, segments, beta):
    """Dense PISA written from SPEC section 2 in PyTorch, the shape of the released code: it
    materialises the N x N weights and the N x N x S x T ray samples. Batch 1."""
    import torch

    scale = q.shape[-1] ** -0.5
    a = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    dist = torch.cdist(xy, xy)  # [N, N] image pixels
    c_mask = torch.sigmoid(beta * (radius[0][None, :] - dist))
    a = a - a.amax(dim=-2, keepdim=True)  # column max: softmax over queries
    e = torch.exp(a) * c_mask
    w = e / e.sum(dim=-2, keepdim=True)
    c = torch.linspace(0.1, 0.9, segments)
    d_k = d_tok[0].clamp(max=1 - 1e-4)
    t = c[None, :] * d_k[:, None] + (1 - c[None, :])  # [N, T]
    factor = (1 - t) * d_k[:, None] / ((1 - d_k[:, None]) * t)  # [N, T]
    p_s = xy[:, None, :] + offsets[0]  # [N, S, 2]
    pq = xy[:, None, None, None, :]
    pts = pq + factor[None, :, None, :, None] * (p_s[None, :, :, None, :] - pq)  # [Nq, Nk, S, T, 2]
    hf, wf = fine.shape[-2:]
    fx = (pts[..., 0] * (wf / image) - 0.5).clamp(0, wf - 1)
    fy = (pts[..., 1] * (hf / image) - 0.5).clamp(0, hf - 1)
    x0 = fx.floor().long().clamp(max=wf - 2)
    y0 = fy.floor().long().clamp(max=hf - 2)
    ax, ay = fx - x0, fy - y0
    f = fine[0]
    top = f[y0, x0] * (1 - ax) + f[y0, x0 + 1] * ax
    bot = f[y0 + 1, x0] * (1 - ax) + f[y0 + 1, x0 + 1] * ax
    scene = top * (1 - ay) + bot * ay
    vis = (scene <= t[None, :, None, :]).all(dim=-1).float().mean(dim=-1)  # [Nq, Nk]
    return torch.einsum("bhqk,bkhd->bqhd", w * vis, v)


def _torch_worker(conn, arrays, image, segments, beta, backward, repeats):
    """Runs in a fresh process so its peak RSS growth is the reference's own memory."""
    import resource

    import psutil
    import torch

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    ts = {k: torch.from_numpy(np.array(x)) for k, x in arrays.items()}
    for name in ("q", "k", "v"):
        ts[name].requires_grad_(backward)
    base = psutil.Process().memory_info().rss
    args = (ts["q"], ts["k"], ts["v"], ts["xy"], ts["d_tok"], ts["radius"], ts["fine"], ts["offsets"])
    times = []
    out = None
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = _torch_dense(*args, image, segments, beta)
        if backward:
            (out * ts["g"]).sum().backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    conn.send((float(np.median(times[1:])), peak - base, out.detach().numpy()))
    conn.close()


def _run_torch(arrays, image, segments, beta, backward, repeats):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_torch_worker, args=(child, arrays, image, segments, beta, backward, repeats))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from bokehdiff_jax.bench.common import median_time
    from bokehdiff_jax.data.samples import motorcycle
    from bokehdiff_jax.pisa import PisaConfig, pisa_attention
    from bokehdiff_jax.pisa.geometry import prepare

    image = args.image
    disp = motorcycle((image, image)).disparity
    focus = float(np.median(disp))
    strength = args.max_coc / max(abs(disp.max() - focus), abs(disp.min() - focus))
    disparity, f, k_ = jnp.asarray(disp)[None], jnp.asarray([focus]), jnp.asarray([strength], jnp.float32)
    print(
        f"scene: motorcycle at {image}^2, focus d_f={focus:.3f}, K={strength:.1f} px "
        f"(max CoC {args.max_coc} px)"
    )
    print(
        f"heads={args.heads} x {args.head_dim}, T={args.segments}, S={args.supersample}, block={args.block}, "
        f"sparse tolerance={args.tolerance}, repeats={args.repeats}, devices={jax.devices()}"
    )
    rows = []
    passes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    for side in args.sizes:
        n = side * side
        rng = np.random.default_rng(0)
        q, kk, v, g = (
            rng.standard_normal((1, n, args.heads, args.head_dim)).astype(np.float32) for _ in range(4)
        )
        samples = n * n * args.segments * args.supersample
        reference = {}
        for impl in args.impls:
            for mode in passes:
                backward = mode == "fwd+bwd"
                if impl == "torch":
                    if samples > args.torch_max_samples:
                        rows.append((n, impl, mode, None, None, "not run: N^2 T S floats too large"))
                        continue
                    cfg = PisaConfig(segments=args.segments, supersample=args.supersample)
                    st, scene, tok = prepare(
                        cfg, (side, side), args.heads, disparity, f, k_, None, None, False
                    )
                    arrays = dict(
                        q=q,
                        k=kk,
                        v=v,
                        g=g,
                        xy=tok.xy,
                        d_tok=tok.disp,
                        radius=tok.radius,
                        fine=scene.fine,
                        offsets=tok.offsets,
                    )
                    sec, mem, out = _run_torch(
                        arrays, image, args.segments, float(scene.beta), backward, args.repeats
                    )
                    reference.setdefault("torch", out)
                    rows.append((n, impl, mode, sec, mem, "peak RSS growth"))
                    print(rows[-1], flush=True)
                    continue
                cfg = PisaConfig(
                    segments=args.segments,
                    supersample=args.supersample,
                    impl=impl,
                    block_q=args.block,
                    block_k=args.block,
                    sparse_tolerance=args.tolerance,
                )
                fwd = lambda q, k, v, cfg=cfg, side=side: pisa_attention(
                    q, k, v, grid=(side, side), disparity=disparity, focus=f, strength=k_, config=cfg
                )
                if backward:
                    fn = jax.jit(
                        jax.grad(lambda q, k, v, g, fwd=fwd: jnp.sum(fwd(q, k, v) * g), argnums=(0, 1, 2))
                    )
                else:
                    fn = jax.jit(lambda q, k, v, g, fwd=fwd: fwd(q, k, v))
                xs = tuple(jnp.asarray(x) for x in (q, kk, v, g))
                compiled = fn.lower(*xs).compile()
                mem = compiled.memory_analysis().temp_size_in_bytes
                if impl == "dense" and samples > args.dense_max_samples:
                    rows.append((n, impl, mode, None, mem, "compiled only (XLA temp bytes)"))
                    print(rows[-1], flush=True)
                    continue
                t0 = time.perf_counter()
                out = jax.block_until_ready(compiled(*xs))
                first = time.perf_counter() - t0
                if first > args.max_seconds or args.repeats <= 1:
                    sec = first
                else:
                    sec = median_time(
                        lambda c=compiled, xs=xs: jax.block_until_ready(c(*xs)),
                        repeats=args.repeats,
                        warmup=0,
                    )
                if not backward:
                    reference.setdefault(impl, np.asarray(out))
                rows.append((n, impl, mode, sec, mem, "XLA temp bytes"))
                print(rows[-1], flush=True)
        base = reference.get("dense", reference.get("torch"))
        for impl, out in reference.items():
            if base is not None:
                err = np.abs(out - base).max() / np.abs(base).max()
                print(
                    f"N={n}: {impl} vs {'dense' if 'dense' in reference else 'torch'}: "
                    f"max rel. diff {err:.2e}"
                )

    print(
        "\n| N | impl | pass | time (s) | memory | speed-up vs torch | note |\n|---|---|---|---|---|---|---|"
    )
    for n, impl, mode, sec, mem, note in rows:
        ref = next((r for r in rows if r[0] == n and r[1] == "torch" and r[2] == mode and r[3]), None)
        ratio = f"{ref[3] / sec:.1f}x" if ref and sec and impl != "torch" else ""
        sec_s = f"{sec:.3f}" if sec is not None else "-"
        mem_s = _fmt_bytes(mem) if mem is not None else "-"
        print(f"| {n} | {impl} | {mode} | {sec_s} | {mem_s} | {ratio} | {note} |")
    return 0
