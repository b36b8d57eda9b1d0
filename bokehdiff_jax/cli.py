"""The ``bokehdiff-jax`` command. Thin: it parses arguments and calls the package.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported lazily so ``--help`` and light commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from bokehdiff_jax.errors import InputError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("bokehdiff_jax.convert.cli", "convert weights between diffusers and bokehdiff_jax"),
    "render": ("bokehdiff_jax.commands.render", "render lens blur from an image and its disparity map"),
    "synth": ("bokehdiff_jax.data.cli", "synthesize paired all-in-focus / bokeh training data"),
    "demo": ("bokehdiff_jax.demo", "the main job on the embedded default data"),
    "train": ("bokehdiff_jax.train.cli", "train BokehDiff (configs/*.py, checkpoints, resume, dry run)"),
    "export": ("bokehdiff_jax.export.cli", "export a trained model to diffusers/peft files for PyTorch"),
    "evaluate": ("bokehdiff_jax.evaluate.cli", "score renders against references (PSNR, SSIM, LPIPS, DISTS)"),
    "bench": ("bokehdiff_jax.bench", "benchmarks (unet, convert, pisa, render)"),
}


class UsageError(Exception):
    """A command line argparse cannot parse; ``main`` prints it as one line (argparse would print a
    usage block and exit)."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # Identity, not ==: a default of 0 or 0.0 is shown (0 == False).
        unset = default is None or default is False or default == argparse.SUPPRESS
        if not action.option_strings or unset or "%(default)" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        if f"({shown})" in text or "default" in text.lower():
            return text
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with the README's error contract: a usage error is one ``error: ...`` line, exit 2.

    Subcommand parsers inherit the class (``add_subparsers`` uses ``type(self)``), so this holds for
    every command and benchmark.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # argparse takes any "-..." that is not a plain negative number for an option, so "--focus-at
        # -1,10" or "--log2-times -1e1 2" failed. No option of ours starts with "-<digit>" or "-.":
        # such strings are values. (A private attribute: tests/test_dispatcher.py guards it.)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "_accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra  # e.g. train's --config.KEY=VALUE overrides
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a folder that became unwritable
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
