"""``bokehdiff-jax synth``: write synthesized training pairs to a folder, resumably.

The folder layout and item format are ``data.items``.

Resuming skips every ``items/NNNNNN`` that exists: an interrupted run never leaves a half item.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from bokehdiff_jax.data.items import item_dir, write_item
from bokehdiff_jax.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fg", required=True, help="folder of RGBA foregrounds (PNG with alpha, ...)")
    parser.add_argument("--bg", required=True, help="folder of all-in-focus backgrounds")
    parser.add_argument("--out", required=True, help="output folder (resumes if it holds the same run)")
    parser.add_argument("-n", "--num", type=int, required=True, help="number of examples")
    parser.add_argument("--seed", type=int, default=0, help="stream seed; example i uses rng([seed, i])")
    parser.add_argument("--size", type=int, default=768, help="output canvas side in pixels (768)")
    parser.add_argument("--start", type=int, default=0, help="first example index (to split work)")
    parser.add_argument(
        "--fg-count",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="foregrounds per scene, inclusive range (1 2)",
    )
    parser.add_argument(
        "--log2-times",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="blur multiplier range: K = 12 * 2**U(LO, HI) px (-2 3)",
    )
    parser.add_argument("--rays-max", type=int, default=None, help="cap on rays per pixel (256)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="grain worker processes synthesizing in parallel, on CPU (0 = this process, any backend)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from bokehdiff_jax.data.synthesis import SynthConfig

    kw: dict[str, Any] = {"size": args.size}
    if args.fg_count is not None:
        kw["fg_count"] = tuple(args.fg_count)
    if args.log2_times is not None:
        kw["log2_times"] = tuple(args.log2_times)
    if args.rays_max is not None:
        kw["rays_max"] = args.rays_max
    try:
        return SynthConfig(**kw)
    except ValueError as e:
        raise InputError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bokehdiff_jax.data.synthesis import scan_inputs, synthesize_with_meta
    from bokehdiff_jax.io.atomic import atomic_path

    if args.num < 1:
        raise InputError(f"-n must be >= 1, got {args.num}")
    if args.start < 0 or args.workers < 0:
        raise InputError(f"--start and --workers must be >= 0, got {args.start} and {args.workers}")
    config = config_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    inputs = scan_inputs(args.fg, args.bg, config)
    run_desc = {
        "config": dataclasses.asdict(config),
        "seed": args.seed,
        "fg": [p.name for p in inputs.fg],
        "bg": [p.name for p in inputs.bg],
    }
    manifest = out / "synth.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
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
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(dict(run_desc, n=max(args.start + args.num, _old_n(manifest))), indent=1))
    with atomic_path(out / "report.txt") as tmp:
        tmp.write_text(inputs.summary() + "\n")

    todo = [i for i in range(args.start, args.start + args.num) if not item_dir(out, i).exists()]
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


def _old_n(manifest: Path) -> int:
    if not manifest.exists():
        return 0
    return int(json.loads(manifest.read_text()).get("n", 0))
