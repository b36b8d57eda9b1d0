"""``bokehdiff-jax render``: lens blur from an image and its disparity map, no model weights needed.

Example::

    bokehdiff-jax render photo.jpg --disparity photo_disp.png --focus-at 320,240 --strength 24 \\
        --out photo_bokeh.png
    bokehdiff-jax render photo.jpg --disparity photo_disp.npy --strength 24 --focal-stack 6 --out stack/

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
    parser.add_argument("image", help="input photo (PNG, JPEG, ...; sRGB)")
    parser.add_argument(
        "--disparity", required=True, metavar="FILE", help=".npy, .npz, .pfm or 8/16-bit PNG; 1 = near"
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
    parser.add_argument("--method", choices=["classical"], default="classical", help="renderer")
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


def _check_args(args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from bokehdiff_jax.io.atomic import atomic_path, recover, sweep_stale
    from bokehdiff_jax.io.images import read_disparity, read_image, write_image
    from bokehdiff_jax.physics.focus import capped_radius, needed_radius, parse_coords, resolve_focus

    _check_args(args)
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

    focus = None  # a focal stack chooses its own
    if args.focal_stack is None:
        at = None if args.focus_at is None else parse_coords(args.focus_at, 2, "--focus-at")
        box = None if args.focus_box is None else parse_coords(args.focus_box, 4, "--focus-box")
        focus = resolve_focus(disparity, value=args.focus, at=at, box=box)

    needed = needed_radius(disparity, focus, args.strength)
    if needed > args.max_radius:
        print(f"note: CoC radii up to {needed} px clipped to --max-radius {args.max_radius}", file=sys.stderr)
    from bokehdiff_jax.render.scatter import ScatterConfig

    config = ScatterConfig(
        max_radius=capped_radius(needed, args.max_radius),
        num_layers=args.layers,
        blades=float(args.aperture_blades),
        rotation=args.aperture_rotation,
        highlight_boost=args.highlight_boost,
        highlight_threshold=args.highlight_threshold,
        gamma=args.gamma,
    )

    if args.focal_stack is None:
        from bokehdiff_jax.render.scatter import render_scatter

        print(f"note: focus disparity {focus:.4f}, strength {args.strength:g} px", file=sys.stderr)
        result = np.asarray(render_scatter(image, disparity, focus, args.strength, config=config))
        write_image(out, result)
        print(out)
        return 0

    from bokehdiff_jax.render.stack import focal_stack

    focus_n, images = focal_stack(image, disparity, args.strength, args.focal_stack, config=config)
    focus_n, images = np.asarray(focus_n), np.asarray(images)
    labels = [f"d_f = {f:.3f}" for f in focus_n]
    n = len(focus_n)
    marker = {
        "format": STACK_FORMAT,
        "image": str(Path(args.image).resolve()),
        "disparity": str(Path(args.disparity).resolve()),
        "strength": args.strength,
        "focus": [float(f) for f in focus_n],
        "files": [stack_image_name(i, n, f) for i, f in enumerate(focus_n)] + ["contact_sheet.png"],
    }
    with atomic_path(out, is_dir=True) as tmp:
        for i, (f, img) in enumerate(zip(focus_n, images, strict=True)):
            write_image(tmp / stack_image_name(i, n, f), img)
        write_image(tmp / "contact_sheet.png", contact_sheet(images, labels))
        (tmp / STACK_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    print(out)
    return 0
