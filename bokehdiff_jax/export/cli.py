"""``bokehdiff-jax export CKPT --to DIR [--merge]``: a trained model -> files for PyTorch/diffusers users
(layout: ``export.bundle``).

CKPT is a trained-model folder (``convert from-bokehdiff``/``from-lora`` output), a training workdir (its
latest checkpoint) or one of its ``checkpoints/<step>`` folders.
"""

from __future__ import annotations

import argparse

from bokehdiff_jax.io.flags import int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="trained-model folder, training workdir, or a checkpoints/<step> folder")
    parser.add_argument("--to", required=True, dest="dst", help="output folder (written atomically)")
    parser.add_argument(
        "--merge", action="store_true", help="also write unet/: the base U-Net with the LoRA merged"
    )
    parser.add_argument("--base", default=None, help="base for --merge (default: the one the model records)")
    parser.add_argument(
        "--step", type=int_in(0), default=None, help="checkpoint step of a workdir (default: latest)"
    )
    parser.add_argument(
        "--no-fingerprint",
        action="store_true",
        help="skip hashing the base weights (the export records none)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from bokehdiff_jax.convert.trained import is_trained, load_trained
    from bokehdiff_jax.errors import InputError
    from bokehdiff_jax.export.bundle import export_model
    from bokehdiff_jax.export.workdir import is_workdir, trained_from_workdir

    t0 = time.perf_counter()
    if is_trained(args.ckpt):
        if args.step is not None:
            raise InputError("--step applies to a training workdir, not to a trained-model folder")
        trained = load_trained(args.ckpt)
    elif is_workdir(args.ckpt):
        trained = trained_from_workdir(args.ckpt, args.step, fingerprint=not args.no_fingerprint)
    else:
        raise InputError(f"{args.ckpt}: not a trained-model folder nor a training workdir/checkpoint")
    m = export_model(trained, args.dst, merge=args.merge, base=args.base, inputs=(args.ckpt,))
    print(f"wrote {args.dst} ({', '.join(m['files'])}) in {time.perf_counter() - t0:.1f} s")
    return 0
