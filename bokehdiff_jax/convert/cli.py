"""``bokehdiff-jax convert``: diffusers folders <-> our checkpoint (format: ``convert.checkpoint``).

bokehdiff-jax convert from-diffusers SRC DST [--dtype fp32|bf16|fp16|keep] [--variant fp16] [--no-prompt]
bokehdiff-jax convert to-diffusers SRC DST
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    p = sub.add_parser(
        "from-diffusers",
        help="diffusers unet/, vae/ or SDXL pipeline folder -> bokehdiff_jax checkpoint",
        description="Convert a diffusers model folder (unet/ or vae/) or a whole SDXL pipeline folder into a "
        "bokehdiff_jax checkpoint, streamed tensor by tensor. A pipeline folder with both text encoders "
        "and tokenizers also gets the fixed-prompt embeddings (needs the torch extra).",
    )
    p.add_argument("src", help="diffusers model or pipeline folder (safetensors weights)")
    p.add_argument("dst", help="output checkpoint folder (written atomically; replaced if present)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16", "keep"],
        default="fp32",
        help="stored dtype; keep = each tensor's source dtype (lossless both ways)",
    )
    p.add_argument(
        "--variant", default=None, help="weights variant to read, e.g. fp16 (default: fp32, else fp16)"
    )
    p.add_argument("--no-prompt", action="store_true", help="skip the prompt embeddings (no torch needed)")
    q = sub.add_parser(
        "to-diffusers",
        help="bokehdiff_jax checkpoint -> diffusers unet/ and vae/ folders",
        description="Write diffusers folders (loadable by from_pretrained) from a bokehdiff_jax checkpoint; "
        "tensors keep their dtype and bytes.",
    )
    q.add_argument("src", help="bokehdiff_jax checkpoint folder")
    q.add_argument("dst", help="output folder (gets unet/ and/or vae/; written atomically)")


def run(args: argparse.Namespace) -> int:
    import time

    from bokehdiff_jax.convert import weights

    t0 = time.perf_counter()
    if args.direction == "from-diffusers":
        m = weights.from_diffusers(
            args.src,
            args.dst,
            dtype=None if args.dtype == "keep" else args.dtype,
            variant=args.variant,
            prompt_embeds=not args.no_prompt,
        )
        what = ", ".join(m["components"]) + (" + prompt embeddings" if m["prompt_embeds"] else "")
    else:
        what = ", ".join(weights.to_diffusers(args.src, args.dst))
    print(f"wrote {args.dst} ({what}) in {time.perf_counter() - t0:.1f} s")
    return 0
