"""The ``bokehdiff-jax`` command. Thin: it parses arguments and calls the package.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported lazily so ``--help`` and light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bokehdiff_jax.errors import InputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("bokehdiff_jax.convert.cli", "convert weights between diffusers and bokehdiff_jax"),
    "render": ("bokehdiff_jax.render.cli", "render lens blur from an image and its disparity map"),
    "synth": ("bokehdiff_jax.data.cli", "synthesize paired all-in-focus / bokeh training data"),
    "demo": ("bokehdiff_jax.demo", "the main job on the embedded default data"),
    "bench": ("bokehdiff_jax.bench", "benchmarks (unet, convert, pisa, render)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bokehdiff-jax",
        description="BokehDiff in JAX: lens blur, data synthesis, weight conversion, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
