"""``bokehdiff-jax evaluate``: score predictions against references, or render a data set and score it.

Examples::

    bokehdiff-jax evaluate --pred renders/ --target references/ --out eval/
    bokehdiff-jax evaluate --data heldout --method identity --method classical --out eval/
    bokehdiff-jax evaluate --data heldout --method classical --method trained=model:runs/tiny \\
        --robustness --out eval/
    bokehdiff-jax evaluate --data ebb:ebb/val294 --disparity-dir ebb/val294_disp --params ebb/params.json \\
        --method classical --out eval_ebb/

The output folder (``evaluate.run``: summary.json, per_image.csv, index.html, pred/, report/,
robustness.*) is written whole or not at all; only an earlier output of this command may be replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import float_in, int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("what to score")
    io.add_argument("--pred", metavar="DIR", help="predicted images, scored against --target (same names)")
    io.add_argument("--target", metavar="DIR", help="reference images for --pred")
    io.add_argument(
        "--data", metavar="SPEC", help="render and score: heldout | synth:DIR | ebb:DIR | blb:DIR | tfds:NAME"
    )
    io.add_argument(
        "--method",
        action="append",
        metavar="[LABEL=]SPEC",
        help="identity | classical | model:PATH[@STEP] (@0: untrained; repeatable; LABEL names it)",
    )
    io.add_argument("--out", required=True, metavar="DIR", help="output folder")
    io.add_argument(
        "--metrics", default="psnr,ssim,lpips,dists", help="comma-separated subset of psnr,ssim,lpips,dists"
    )
    io.add_argument(
        "--ssim-window",
        choices=["gaussian", "uniform"],
        default="gaussian",
        help="gaussian: Wang et al. 11x11, sigma 1.5; uniform: scikit-image's default 7x7",
    )
    io.add_argument("--worst", type=int_in(0, 1000), default=8, help="worst cases shown in index.html (8)")
    io.add_argument("--robustness", action="store_true", help="also render with eroded/dilated disparity")
    io.add_argument(
        "--robustness-ks",
        default="-8:8:2",
        metavar="KS",
        help="k values, px: START:STOP:STEP or a list (-8:8:2)",
    )
    io.add_argument(
        "--max-side", type=int_in(16, 16384), metavar="PX", help="downscale examples to this longer side"
    )
    io.add_argument(
        "--max-radius", type=int_in(1, 512), default=64, metavar="PX", help="classical: CoC radius cap (64)"
    )
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    h = parser.add_argument_group("--data heldout (synthetic, fixed seed, no download)")
    h.add_argument("--count", type=int_in(1, 100_000), default=8, help="scenes (8)")
    h.add_argument("--size", type=int_in(16, 4096), default=128, help="canvas side, px (128)")
    h.add_argument("--seed", type=int_in(0, 2**31 - 1), default=None, help="stream seed (the held-out seed)")
    h.add_argument(
        "--base-strength",
        type=float_in(0, 4096),
        default=None,
        metavar="K",
        help="K at times = 1, px (12 * size / 768)",
    )

    e = parser.add_argument_group("--data ebb:DIR / tfds:ebb_val294")
    e.add_argument(
        "--disparity-dir", metavar="DIR", help="<id>.png/.npy disparity maps (default DIR/disparity)"
    )
    e.add_argument("--ids", metavar="FILE", help="ids to use (e.g. the Val294 list), one per line")
    e.add_argument("--params", metavar="FILE", help='JSON {"<id>": {"focus": d, "strength": K}}')
    e.add_argument("--focus", type=float_in(0, 1), metavar="D", help="focus disparity for every image")
    e.add_argument(
        "--strength", type=float_in(0, 4096), metavar="K", help="blur strength for every image, px"
    )
    e.add_argument(
        "--no-exposure-align", action="store_true", help="do not match the input's mean to the reference"
    )
    e.add_argument("--normalize", action="store_true", help="min-max rescale disparity maps outside [0, 1]")
    e.add_argument("--flip-disparity", action="store_true", help="use 1 - d (depth-like maps)")

    b = parser.add_argument_group("--data blb:DIR")
    b.add_argument(
        "--blb-level", type=int_in(1, 5), default=5, metavar="N", help="blur amount 1..5; 5: BLB Level 5 (5)"
    )
    b.add_argument(
        "--blb-focus-key", default="disp_focus", metavar="KEY", help="info.json key of the focus list"
    )
    t = parser.add_argument_group("--data tfds:NAME (ebb_val294, blb/level1 .. blb/level5)")
    t.add_argument("--tfds-dir", metavar="DIR", help="where the dataset was built (evaluate.tfds_builders)")


def run(args: argparse.Namespace) -> int:
    from bokehdiff_jax.evaluate.metrics import Scorer, SSIMConfig
    from bokehdiff_jax.evaluate.report import FORMAT
    from bokehdiff_jax.evaluate.run import OUT_NAMES, evaluate_folders, evaluate_source
    from bokehdiff_jax.io.atomic import atomic_path, check_apart, check_replaceable

    folders = args.pred is not None or args.target is not None
    if folders == (args.data is not None):
        raise InputError("give either --pred DIR --target DIR, or --data SPEC with --method")
    if folders and (args.pred is None or args.target is None or args.method):
        raise InputError("--pred and --target go together, without --method")
    if not folders and not args.method:
        raise InputError("--data needs at least one --method (identity, classical or model:PATH)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    scorer = Scorer(metrics, ssim_config=SSIMConfig(gaussian=args.ssim_window == "gaussian"))
    out = Path(args.out)
    inputs = (
        [args.pred, args.target]
        if folders
        else [p for p in (args.data.partition(":")[2], args.disparity_dir) if p]
    )
    check_apart(out, inputs)
    check_replaceable(out, marker="summary.json", format=FORMAT, names=OUT_NAMES, what="evaluation")
    progress = not args.no_progress

    if folders:
        scorer.load()
        with atomic_path(out, is_dir=True) as tmp:
            s = evaluate_folders(
                Path(args.pred), Path(args.target), scorer, tmp, worst=args.worst, progress=progress
            )
        print(_line("pred", s))
        print(out / "index.html")
        return 0

    from bokehdiff_jax.evaluate.datasets import SourceOptions, open_source
    from bokehdiff_jax.evaluate.methods import make_renderer, parse_method
    from bokehdiff_jax.evaluate.robustness import parse_ks
    from bokehdiff_jax.evaluate.sources import HELDOUT_SEED

    methods = [parse_method(t) for t in args.method]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise InputError(f"method labels must be distinct, got {labels} (name them LABEL=SPEC)")
    ks = parse_ks(args.robustness_ks) if args.robustness else None
    options = SourceOptions(
        count=args.count,
        size=args.size,
        seed=HELDOUT_SEED if args.seed is None else args.seed,
        base_strength=args.base_strength,
        disparity_dir=args.disparity_dir,
        ids=args.ids,
        params=args.params,
        focus=args.focus,
        strength=args.strength,
        exposure_align=not args.no_exposure_align,
        normalize=args.normalize,
        flip=args.flip_disparity,
        blb_level=args.blb_level - 1,
        blb_focus_key=args.blb_focus_key,
        tfds_dir=args.tfds_dir,
        max_side=args.max_side,
    )
    source = open_source(args.data, options)
    renderers = {m.label: make_renderer(m, max_radius=args.max_radius) for m in methods}
    scorer.load()  # a missing weight cache fails before any rendering
    with atomic_path(out, is_dir=True) as tmp:
        s = evaluate_source(
            source,
            methods,
            renderers,
            scorer,
            tmp,
            worst=args.worst,
            ks=ks,
            progress=progress,
            data_spec=args.data,
        )
    for label, ms in s["methods"].items():
        print(_line(label, ms))
    print(out / "index.html")
    return 0


def _line(label: str, summary: dict) -> str:
    vals = "  ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    return f"{label}: {vals}  (n={summary['count']})"
