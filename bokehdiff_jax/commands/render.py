"""``bokehdiff-jax render``: lens blur from an image and its disparity map: the classical renderer (no
model weights needed), or the one-step diffusion model with ``--model`` (``bokehdiff_jax.pipeline``).

Example::

    bokehdiff-jax render photo.jpg --disparity photo_disp.png --focus-at 320,240 --strength 24 \\
        --out photo_bokeh.png
    bokehdiff-jax render photo.jpg --disparity photo_disp.npy --strength 24 --focal-stack 6 --out stack/
    bokehdiff-jax render photo.jpg --disparity photo_disp.npy --focus 0.4 --strength 24 --model runs/tiny
    bokehdiff-jax render photos/ --disparity-dir disps/ --out renders/ --focus-at 320,240 --strength 24 \\
        --model exported/ --base sdxl_jax/        # folder mode: progress bar, resumes when rerun

Notes and warnings (filled values, flipped-looking maps, clipped radii) go to stderr; written paths to
stdout. Bad input is one line ``error: ...`` and exit status 2, with no output written. Every flag and
the output path are checked before any work: an output never replaces an input (compared by inode),
an existing image is replaced only if we wrote it, and a focal-stack folder only if it is an earlier
stack (``STACK_MARKER``) holding nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import float_in, int_in

# A focal-stack folder: its images, and the marker proving it is ours (an earlier stack may be
# replaced, a folder without the marker or with anything else in it may not).
STACK_FILES = r"focus_\d+_d\d+\.\d+\.png|contact_sheet\.png"
STACK_MARKER, STACK_FORMAT = "focal_stack.json", "bokehdiff_jax.focal_stack"
MAX_STACK = 256  # renders per stack: each is a full-resolution image in memory


def stack_image_name(i: int, n: int, focus: float) -> str:
    """The file name of render ``i`` of ``n`` (focus disparity ``focus``): the index zero-padded to
    the stack's size (at least 2 digits), so names sort in focus order."""
    width = max(2, len(str(n - 1)))
    return f"focus_{i:0{width}d}_d{focus:.3f}.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input photo (PNG, JPEG, ...; sRGB), or a folder of them (folder mode)")
    parser.add_argument(
        "--disparity", metavar="FILE", help=".npy, .npz, .pfm or 8/16-bit PNG; 1 = near (one image)"
    )
    parser.add_argument(
        "--disparity-dir",
        metavar="DIR",
        help="folder mode: the disparity maps, one per image, named by the image's stem",
    )
    focus = parser.add_mutually_exclusive_group()
    focus.add_argument("--focus", type=float_in(0, 1), metavar="D", help="disparity in focus, in [0, 1]")
    focus.add_argument("--focus-at", metavar="X,Y", help="focus on the median disparity around pixel X,Y")
    focus.add_argument("--focus-box", metavar="X0,Y0,X1,Y1", help="focus on the median disparity in a box")
    parser.add_argument(
        "--strength",
        type=float_in(0, 10_000),
        required=True,
        metavar="K",
        help="blur strength: CoC radius K|d - d_f| px",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="output .png/.jpg (default: IMAGE_bokeh.png beside IMAGE); with --focal-stack a folder "
        "(default: IMAGE_focal_stack/ beside IMAGE)",
    )
    parser.add_argument(
        "--focal-stack",
        type=int_in(1, MAX_STACK),
        metavar="N",
        help=f"N renders (1..{MAX_STACK}) focused from the farthest to the nearest disparity",
    )
    parser.add_argument(
        "--method",
        choices=["classical", "diffusion"],
        default=None,
        help="renderer: the one-step diffusion model with --model, else the classical scatter renderer",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="trained model: a training workdir or checkpoint, a trained-model folder or an export folder",
    )
    parser.add_argument(
        "--base", metavar="PATH", help="base weights of --model (default: the ones it records)"
    )
    parser.add_argument("--step", type=int_in(0), metavar="N", help="checkpoint step of a workdir --model")
    parser.add_argument(
        "--batch", type=int_in(1, 64), default=1, metavar="N", help="focal-stack frames per model call, 1..64"
    )
    parser.add_argument("--normalize", action="store_true", help="min-max rescale a disparity outside [0, 1]")
    parser.add_argument("--flip-disparity", action="store_true", help="use 1 - d (for depth-like maps)")
    parser.add_argument(
        "--aperture-blades", type=int_in(0, 64), default=0, metavar="N", help="0 = circle, else 3..64"
    )
    parser.add_argument(
        "--aperture-rotation",
        type=float_in(-360, 360),
        default=0.0,
        metavar="DEG",
        help="polygon rotation, degrees",
    )
    parser.add_argument(
        "--highlight-boost",
        type=float_in(0, 100),
        default=0.0,
        metavar="GAIN",
        help="highlight gain, 0..100 (0 = off)",
    )
    parser.add_argument(
        "--highlight-threshold",
        type=float_in(0, 1),
        default=0.9,
        metavar="V",
        help="sRGB level where boost starts, in [0, 1)",
    )
    parser.add_argument(
        "--gamma", type=float_in(0, 10, above=True), default=2.2, help="sRGB <-> linear exponent, in (0, 10]"
    )
    parser.add_argument(
        "--max-radius",
        type=int_in(1, 1024),
        default=128,
        metavar="PX",
        help="cap on the CoC radius, 1..1024 (bounds memory)",
    )
    parser.add_argument(
        "--layers", type=int_in(3, 256), default=24, metavar="N", help="depth layers of the renderer, 3..256"
    )


# Options of the classical renderer only, with their defaults: the model renders with what it learned.
_CLASSICAL_ONLY = {
    "aperture_blades": 0,
    "aperture_rotation": 0.0,
    "highlight_boost": 0.0,
    "highlight_threshold": 0.9,
    "gamma": 2.2,
    "max_radius": 128,
    "layers": 24,
}


def _method(args: argparse.Namespace) -> str:
    return args.method or ("diffusion" if args.model else "classical")


def _check_args(args: argparse.Namespace) -> None:
    folder = Path(args.image).is_dir()
    if folder and (args.disparity_dir is None or args.out is None or args.disparity is not None):
        raise InputError(
            f"{args.image} is a folder: give --disparity-dir DIR and --out DIR (not --disparity)"
        )
    if not folder and (args.disparity is None or args.disparity_dir is not None):
        raise InputError("give --disparity FILE for one image (--disparity-dir is for a folder of images)")
    method = _method(args)
    if method == "diffusion" and not args.model:
        raise InputError("--method diffusion needs --model PATH (a training workdir, checkpoint or export)")
    if method == "classical" and (args.model or args.base or args.step is not None):
        raise InputError("--model, --base and --step are for --method diffusion")
    if method == "diffusion":
        changed = [k for k, v in _CLASSICAL_ONLY.items() if getattr(args, k) != v]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise InputError(f"{flags}: options of the classical renderer; the model does not take them")
    if args.focal_stack is None and args.focus is None and args.focus_at is None and args.focus_box is None:
        raise InputError(
            "give one of --focus D, --focus-at X,Y or --focus-box X0,Y0,X1,Y1 (or --focal-stack N)"
        )
    if args.focal_stack is not None and not (
        args.focus is None and args.focus_at is None and args.focus_box is None
    ):
        raise InputError(
            "--focal-stack focuses from the farthest to the nearest disparity itself; drop --focus*"
        )
    # The parser checked each number's range (io.flags); what is left are values inside a range.
    if args.aperture_blades in (1, 2):
        raise InputError(f"--aperture-blades must be 0 (circle) or >= 3, got {args.aperture_blades}")
    if args.highlight_threshold >= 1.0:
        raise InputError(f"--highlight-threshold must be below 1, got {args.highlight_threshold:g}")


def _target(args: argparse.Namespace) -> Path:
    """``--out``, or its default beside IMAGE: ``IMAGE_bokeh.png`` or the folder ``IMAGE_focal_stack``."""
    if args.out:
        return Path(args.out)
    image = Path(args.image)
    return image.with_name(f"{image.stem}_focal_stack" if args.focal_stack else f"{image.stem}_bokeh.png")


def _output_path(args: argparse.Namespace) -> Path:
    """The output path, proven safe to write before any work: not an input (nor, for a folder, holding
    one), not a user's file or folder, and writable."""
    from bokehdiff_jax.io.atomic import check_apart, check_replaceable, check_writable
    from bokehdiff_jax.io.images import IMAGE_WRITE_FORMATS, check_image_output

    out = _target(args)
    if args.focal_stack is not None:
        if out.suffix.lower() in IMAGE_WRITE_FORMATS or out.is_file():
            raise InputError(f"--out {out}: with --focal-stack the output is a folder, not an image file")
        check_apart(out, [args.image, args.disparity])
        # The folder is replaced whole: only an earlier stack, holding nothing a user added.
        check_replaceable(
            out, marker=STACK_MARKER, format=STACK_FORMAT, names=STACK_FILES, what="focal stack"
        )
    else:
        if out.suffix.lower() not in IMAGE_WRITE_FORMATS:
            raise InputError(f"--out {out}: expected a .png, .jpg or .jpeg file")
        check_apart(out, [args.image, args.disparity])
        check_image_output(out)
    check_writable(out)
    return out


def contact_sheet(images_nhwc, labels: list[str], *, thumb: int = 256):
    """A labelled grid of thumbnails (longest side ``thumb`` px) as a uint8 ``[H, W, 3]`` array."""
    import numpy as np
    from PIL import Image, ImageDraw

    from bokehdiff_jax.io.images import to_uint8

    n = len(images_nhwc)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images_nhwc[0].shape[:2]
    scale = thumb / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    label_h, gap = 16, 4
    sheet = Image.new("RGB", (cols * (tw + gap) + gap, rows * (th + label_h + gap) + gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images_nhwc, labels, strict=True)):
        tile = Image.fromarray(to_uint8(img))
        x = gap + (i % cols) * (tw + gap)
        y = gap + (i // cols) * (th + label_h + gap)
        sheet.paste(tile.resize((tw, th), Image.Resampling.BOX), (x, y))
        draw.text((x + 2, y + th + 2), label, fill=(230, 230, 230))
    return np.asarray(sheet)


def _focus_options(args: argparse.Namespace):
    """``focus_of(disparity) -> d_f`` from ``--focus``, ``--focus-at`` or ``--focus-box`` (None: a stack)."""
    from bokehdiff_jax.physics.focus import parse_coords, resolve_focus

    if args.focal_stack is not None:
        return None
    at = None if args.focus_at is None else parse_coords(args.focus_at, 2, "--focus-at")
    box = None if args.focus_box is None else parse_coords(args.focus_box, 4, "--focus-box")
    return lambda disparity: resolve_focus(disparity, value=args.focus, at=at, box=box)


def _scatter_config(args: argparse.Namespace, max_radius: int):
    from bokehdiff_jax.render.scatter import ScatterConfig

    return ScatterConfig(
        max_radius=max_radius,
        num_layers=args.layers,
        blades=float(args.aperture_blades),
        rotation=args.aperture_rotation,
        highlight_boost=args.highlight_boost,
        highlight_threshold=args.highlight_threshold,
        gamma=args.gamma,
    )


def _load_model(args: argparse.Namespace):
    from bokehdiff_jax.pipeline import OneStep

    model = OneStep.from_checkpoint(args.model, base=args.base, step=args.step)
    print(f"note: model {model.source}", file=sys.stderr)
    return model


def write_stack(folder: Path, focus_n, images, info: dict) -> None:
    """A focal-stack folder's files: the renders, a contact sheet and the ``STACK_MARKER`` (with ``info``)."""
    from bokehdiff_jax.io.images import write_image

    n = len(focus_n)
    names = [stack_image_name(i, n, f) for i, f in enumerate(focus_n)]
    for name, img in zip(names, images, strict=True):
        write_image(folder / name, img)
    write_image(folder / "contact_sheet.png", contact_sheet(images, [f"d_f = {f:.3f}" for f in focus_n]))
    marker = {"format": STACK_FORMAT, **info, "focus": [float(f) for f in focus_n],
              "files": names + ["contact_sheet.png"]}  # fmt: skip
    (folder / STACK_MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _run_folder(args: argparse.Namespace) -> int:
    """Folder mode: every image of ``IMAGE`` with its map from ``--disparity-dir`` into ``--out``."""
    import numpy as np

    from bokehdiff_jax.physics.focus import capped_radius, needed_radius
    from bokehdiff_jax.pipeline.folder import check_out_folder, pair_files, render_folder

    method = _method(args)
    focus_of = _focus_options(args)
    settings = {
        "method": method,
        "model": str(Path(args.model).resolve()) if args.model else None,
        "base": str(Path(args.base).resolve()) if args.base else None,
        "step": args.step,
        "strength": args.strength,
        "focus": args.focus,
        "focus_at": args.focus_at,
        "focus_box": args.focus_box,
        "focal_stack": args.focal_stack,
        "normalize": args.normalize,
        "flip_disparity": args.flip_disparity,
        **({k: getattr(args, k) for k in _CLASSICAL_ONLY} if method == "classical" else {}),
    }
    # Everything checked before the (slow) model load: the pairing, the output folder.
    pairs = pair_files(args.image, args.disparity_dir)
    names = [s if args.focal_stack else f"{s}.png" for s, _, _ in pairs]
    check_out_folder(args.out, settings, [args.image, args.disparity_dir], names)
    if method == "diffusion":
        model = _load_model(args)
        render, stack = model.render, lambda i, d, k, n: model.focal_stack(i, d, k, n, batch=args.batch)
    else:
        from bokehdiff_jax.render.scatter import render_scatter
        from bokehdiff_jax.render.stack import focal_stack

        def bucket(needed: int) -> int:  # powers of two: few distinct compilations over a folder
            return capped_radius(1 << max(0, (max(needed, 1) - 1).bit_length()), args.max_radius)

        def render(image, disparity, focus, strength):
            config = _scatter_config(args, bucket(needed_radius(disparity, focus, strength)))
            return np.asarray(render_scatter(image, disparity, focus, strength, config=config))

        def stack(image, disparity, strength, n):
            config = _scatter_config(args, bucket(needed_radius(disparity, None, strength)))
            return focal_stack(image, disparity, strength, n, config=config)

    summary = render_folder(
        args.image,
        args.disparity_dir,
        args.out,
        render=render,
        focus_of=focus_of,
        strength=args.strength,
        settings=settings,
        stack=stack if args.focal_stack else None,
        stack_n=args.focal_stack,
        write_stack=lambda tmp, f, im, info: write_stack(tmp, f, im, {**info, "strength": args.strength}),
        normalize=args.normalize,
        flip=args.flip_disparity,
    )
    print(f"{args.out}: {summary['rendered']} rendered, {summary['skipped']} already there")
    return 0


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from bokehdiff_jax.io.atomic import atomic_path, recover, sweep_stale
    from bokehdiff_jax.io.images import read_disparity, read_image, write_image
    from bokehdiff_jax.physics.focus import capped_radius, needed_radius

    _check_args(args)
    if Path(args.image).is_dir():
        return _run_folder(args)
    target = _target(args)  # leftovers of a killed run into the same place: a stack moved aside, temporaries
    for note in recover(target) + sweep_stale(target.absolute().parent):
        print(f"note: {note}", file=sys.stderr)
    out = _output_path(args)  # validated before any work, so a bad --out costs nothing
    image = read_image(args.image)
    disparity, notes = read_disparity(args.disparity, normalize=args.normalize, flip=args.flip_disparity)
    if disparity.shape != image.shape[:2]:
        raise InputError(
            f"disparity {args.disparity} is {disparity.shape[1]}x{disparity.shape[0]} but image {args.image} "
            f"is {image.shape[1]}x{image.shape[0]}; they must match"
        )
    for note in notes:
        print(note if note.startswith("warning:") else f"note: {note}", file=sys.stderr)

    focus_of = _focus_options(args)
    focus = None if focus_of is None else focus_of(disparity)  # a focal stack chooses its own
    model = _load_model(args) if _method(args) == "diffusion" else None
    if model is None:
        needed = needed_radius(disparity, focus, args.strength)
        if needed > args.max_radius:
            print(
                f"note: CoC radii up to {needed} px clipped to --max-radius {args.max_radius}",
                file=sys.stderr,
            )
        config = _scatter_config(args, capped_radius(needed, args.max_radius))

    if args.focal_stack is None:
        print(f"note: focus disparity {focus:.4f}, strength {args.strength:g} px", file=sys.stderr)
        if model is None:
            from bokehdiff_jax.render.scatter import render_scatter

            result = np.asarray(render_scatter(image, disparity, focus, args.strength, config=config))
        else:
            result = model.render(image, disparity, focus, args.strength)
        write_image(out, result)
        print(out)
        return 0

    if model is None:
        from bokehdiff_jax.render.stack import focal_stack

        focus_n, images = focal_stack(image, disparity, args.strength, args.focal_stack, config=config)
    else:
        focus_n, images = model.focal_stack(
            image, disparity, args.strength, args.focal_stack, batch=args.batch
        )
    info = {
        "image": str(Path(args.image).resolve()),
        "disparity": str(Path(args.disparity).resolve()),
        "strength": args.strength,
        "method": _method(args),
        **({"model": model.source} if model is not None else {}),
    }
    with atomic_path(out, is_dir=True) as tmp:
        write_stack(tmp, np.asarray(focus_n), np.asarray(images), info)
    print(out)
    return 0
