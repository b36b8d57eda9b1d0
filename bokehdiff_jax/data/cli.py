"""``bokehdiff-jax synth``: write synthesized training pairs to a folder, resumably.

The folder layout and item format are ``data.items``.

Resuming skips every finished ``items/NNNNNN`` (``items.item_complete``, the test ``list_items`` uses):
an interrupted run never leaves a half item, and an item that lost a file is redone. ``--out`` must be
new, empty, or an earlier synth output (its ``synth.json``); the temporaries a killed run left in it
are removed (and reported) on the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bokehdiff_jax.data.items import item_complete, item_dir, write_item
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.flags import float_in, int_in

SYNTH_FORMAT = "bokehdiff_jax.synth"  # synth.json's "format": proves a folder is a synth output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fg", required=True, help="folder of RGBA foregrounds (PNG with alpha, ...)")
    parser.add_argument("--bg", required=True, help="folder of all-in-focus backgrounds")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: new, empty, or an earlier synth run with the same settings (resumed)",
    )
    parser.add_argument("-n", "--num", type=int_in(1, 10**8), required=True, help="number of examples")
    parser.add_argument(
        "--seed", type=int_in(0), default=0, help="stream seed (>= 0); example i uses rng([seed, i])"
    )
    parser.add_argument(
        "--size",
        type=int_in(16, 4096),
        default=768,
        help="output canvas side in pixels, 16..4096 (768); the blur scales with it",
    )
    parser.add_argument(
        "--start", type=int_in(0, 10**12), default=0, help="first example index (to split work)"
    )
    parser.add_argument(
        "--fg-count",
        type=int_in(1, 16),
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="foregrounds per scene, inclusive range (1 2)",
    )
    parser.add_argument(
        "--log2-times",
        type=float_in(-8, 6),  # CoC radii up to 12 * 64 = 768 px at 768: beyond that, hours a scene
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="blur multiplier range, each in [-8, 6]: largest CoC radius 12 * 2**U(LO, HI) px at 768 px, "
        "scaled with --size; K = that / max(d_f, 1 - d_f) (-2 3)",
    )
    parser.add_argument(
        "--rays-min",
        type=int_in(1, 65536),
        default=None,
        help="fewest rays (aperture cells) per pixel, 1..65536 (default: the synthesis config's, 1)",
    )
    parser.add_argument(
        "--rays-max",
        type=int_in(1, 65536),
        default=None,
        help="most rays per pixel, 1..65536 (default: the synthesis config's, 4096); e.g. "
        "--rays-min 8192 --rays-max 8192 forces a reference render",
    )
    parser.add_argument(
        "--workers",
        type=int_in(0, 256),
        default=0,
        help="grain worker processes synthesizing in parallel, on CPU (0 = this process, any backend)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from bokehdiff_jax.data.synthesis import SynthConfig

    kw: dict[str, Any] = {"size": args.size}
    # Relations between flags, in the flags' own terms (SynthConfig's messages name its fields).
    for flag, pair in (("--fg-count", args.fg_count), ("--log2-times", args.log2_times)):
        if pair is not None and pair[0] > pair[1]:
            raise InputError(f"{flag} LO HI needs LO <= HI, got {pair[0]:g} {pair[1]:g}")
    rays_min = getattr(args, "rays_min", None) or SynthConfig.rays_min
    if args.rays_max is not None and args.rays_max < rays_min:
        raise InputError(f"--rays-max {args.rays_max} is below the fewest rays per pixel, {rays_min}")
    if args.fg_count is not None:
        kw["fg_count"] = tuple(args.fg_count)
    if args.log2_times is not None:
        kw["log2_times"] = tuple(args.log2_times)
    if args.rays_max is not None:
        kw["rays_max"] = args.rays_max
    if getattr(args, "rays_min", None) is not None:
        kw["rays_min"] = args.rays_min
        kw.setdefault("rays_max", max(args.rays_min, SynthConfig.rays_max))
    try:
        return SynthConfig(**kw)
    except ValueError as e:
        raise InputError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bokehdiff_jax.data.synthesis import scan_inputs, synthesize_with_meta
    from bokehdiff_jax.io.atomic import atomic_path, check_apart, sweep_stale

    config = config_from_args(args)  # every flag checked before anything is read or written
    out = Path(args.out)
    check_apart(out, [args.fg, args.bg], flag="--out")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    manifest = out / "synth.json"
    old = _read_run(manifest) if manifest.exists() else None
    if old is None and out.is_dir() and any(out.iterdir()):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise InputError(
            f"--out {out} holds other files ({shown}) and no synth.json: it is not a synth output, and "
            "synth writes report.txt, synth.json and items/ there; choose a new or empty folder"
        )
    inputs = scan_inputs(args.fg, args.bg, config)
    run_desc = {
        "config": dataclasses.asdict(config),
        "seed": args.seed,
        "fg": [p.name for p in inputs.fg],
        "bg": [p.name for p in inputs.bg],
    }
    if old is not None:
        old_desc = {k: old.get(k) for k in run_desc}
        if json.loads(json.dumps(run_desc)) != old_desc:
            diff = [k for k in run_desc if json.loads(json.dumps(run_desc[k])) != old_desc[k]]
            raise InputError(
                f"{out} holds a different synth run (differs in: {', '.join(diff)}); "
                "use a new --out folder or the same settings to resume"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --out {out}: {e.strerror or e}") from None
    for note in sweep_stale(out) + sweep_stale(out / "items"):  # leftovers of a killed run
        print(f"note: {note}", file=sys.stderr)
    n = max(args.start + args.num, int(old["n"]) if old else 0)
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(dict(run_desc, format=SYNTH_FORMAT, n=n), indent=1))
    with atomic_path(out / "report.txt") as tmp:
        tmp.write_text(inputs.summary() + "\n")

    todo = [i for i in range(args.start, args.start + args.num) if not item_complete(item_dir(out, i))]
    done = args.num - len(todo)
    if done:
        print(f"resuming: {done} of {args.num} examples already in {out}")
    skipped_mid_run: list[tuple[str, str]] = []
    if args.workers > 0 and todo:
        stream = _parallel(config, inputs, args.seed, todo, args.workers)
    else:
        stream = (synthesize_with_meta(config, inputs.fg, inputs.bg, args.seed, i) for i in todo)
    for i, (sample, meta) in tqdm(
        zip(todo, stream, strict=True), total=len(todo), desc="synth", unit="pair", disable=args.no_progress
    ):
        assert meta["index"] == i
        skipped_mid_run += meta["skipped_inputs"]
        write_item(item_dir(out, i), sample, meta)

    print(inputs.summary())
    for p, r in dict(skipped_mid_run).items():
        print(f"  skipped during the run {p}: {r}")
    print(f"wrote {len(todo)} examples, {done} already present, to {out}")
    return 0


def _parallel(config, inputs, seed: int, todo: list[int], workers: int):
    """Examples ``todo`` (in order) as ``(sample, meta)``, synthesized by grain worker processes
    (pinned to CPU by ``SynthSource``, so they never compete for an accelerator)."""
    import grain

    from bokehdiff_jax.data.loader import SynthSource

    class TodoSource(SynthSource):
        """Example ``todo[k]`` with its metadata at position ``k``."""

        def __len__(self) -> int:
            return len(todo)

        def __getitem__(self, k: int):
            from bokehdiff_jax.data.synthesis import synthesize_with_meta

            return synthesize_with_meta(self.config, self.fg, self.bg, self.seed, todo[int(k)])

    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags
        flags.FLAGS.mark_as_parsed()
    source = TodoSource(config, inputs.fg, inputs.bg, seed=seed, length=max(todo) + 1)
    sampler = grain.samplers.IndexSampler(
        num_records=len(todo), shard_options=grain.sharding.NoSharding(), shuffle=False, num_epochs=1
    )
    yield from grain.DataLoader(data_source=source, sampler=sampler, worker_count=workers)


def _read_run(manifest: Path) -> dict[str, Any]:
    """An earlier run's ``synth.json``, checked: a JSON object with this command's keys and types."""
    try:
        old = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{manifest}: not valid JSON ({e}); choose a new --out folder") from None
    types = {"config": dict, "seed": int, "fg": list, "bg": list, "n": int}
    wrong = (
        ["a JSON object"]
        if not isinstance(old, dict)
        else [f"{k} ({t.__name__})" for k, t in types.items() if not isinstance(old.get(k), t)]
    )
    if wrong or old.get("format", SYNTH_FORMAT) != SYNTH_FORMAT:
        raise InputError(
            f"{manifest}: not a synth run description (need {', '.join(wrong) or 'format ' + SYNTH_FORMAT}); "
            "the folder was not written by synth or the file is damaged: choose a new --out folder"
        )
    return old
