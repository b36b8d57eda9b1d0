"""``bokehdiff-jax convert``: diffusers folders <-> our checkpoint (format: ``convert.weights``).

bokehdiff-jax convert from-diffusers SRC DST [--dtype fp32|bf16|fp16|keep] [--variant fp16] [--no-prompt]
bokehdiff-jax convert to-diffusers SRC DST
bokehdiff-jax convert from-bokehdiff SRC DST --base BASE    (the released PyTorch checkpoint)
bokehdiff-jax convert from-lora SRC DST --base BASE [--vae FILE]    (any PEFT/diffusers SDXL LoRA)
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
    p.add_argument(
        "dst",
        help="output checkpoint folder, written atomically; an existing one is replaced only if it is an "
        "earlier checkpoint (never a folder of other files)",
    )
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
    q.add_argument(
        "dst",
        help="output folder (gets unet/ and/or vae/), written atomically; an existing one is replaced "
        "only if it is an earlier export",
    )
    for name, help_ in (
        ("from-bokehdiff", "the released BokehDiff checkpoint (pytorch_lora_weights.safetensors + vae.ckpt)"),
        ("from-lora", "a PEFT/diffusers SDXL LoRA file, or a bokehdiff-jax export folder"),
    ):
        what = help_ + " -> our trained-model folder (convert.trained); strict: every tensor must map"
        r = sub.add_parser(name, help=help_ + " -> trained-model folder", description=what)
        r.add_argument("src", help="source folder (or LoRA file)")
        r.add_argument("dst", help="output trained-model folder (written atomically)")
        r.add_argument("--base", required=True, help="the base: our checkpoint or a diffusers SDXL folder")
        r.add_argument("--no-fingerprint", action="store_true", help="skip hashing the base weights")
        if name == "from-lora":
            r.add_argument("--vae", default=None, help="trained VAE parts, diffusers names (safetensors)")


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from bokehdiff_jax.convert import weights
    from bokehdiff_jax.io.atomic import recover, sweep_stale

    t0 = time.perf_counter()
    # Leftovers of a killed run into the same place: its temporaries, a destination moved aside.
    for note in recover(args.dst) + sweep_stale(Path(args.dst).absolute().parent):
        print(f"note: {note}", file=sys.stderr)
    if args.direction == "from-diffusers":
        m = weights.from_diffusers(
            args.src,
            args.dst,
            dtype=None if args.dtype == "keep" else args.dtype,
            variant=args.variant,
            prompt_embeds=not args.no_prompt,
        )
        what = ", ".join(m["components"]) + (" + prompt embeddings" if m["prompt_embeds"] else "")
        for note in m.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    elif args.direction in ("from-bokehdiff", "from-lora"):
        from bokehdiff_jax.convert import importers, trained

        fp = not args.no_fingerprint
        if args.direction == "from-bokehdiff":
            model = importers.import_released(args.src, args.base, fingerprint=fp)
        else:
            model = importers.import_lora(args.src, args.base, vae=args.vae, fingerprint=fp)
        trained.save_trained(model, args.dst, inputs=(args.src, args.base))
        what = f"LoRA rank {model.spec.lora.rank}, alpha {model.spec.lora.alpha:g}, VAE parts, prompt"
    else:
        what = ", ".join(weights.to_diffusers(args.src, args.dst))
    print(f"wrote {args.dst} ({what}) in {time.perf_counter() - t0:.1f} s")
    return 0
