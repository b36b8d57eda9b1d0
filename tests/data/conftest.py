"""Shared fixtures of the data tests: tiny input folders and a tiny, fixed-shape synthesis config
(one blur strength, so the ray tracer compiles once for the whole session)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from bokehdiff_jax.data.procedural import procedural_foreground
from bokehdiff_jax.data.synthesis import SynthConfig
from bokehdiff_jax.io.images import to_uint8

TINY = SynthConfig(size=32, base_strength=4.0, log2_times=(0.0, 0.0), min_bg_side=16, min_fg_side=4)


def write_inputs(root: pathlib.Path, n_fg: int = 2, n_bg: int = 2) -> tuple[pathlib.Path, pathlib.Path]:
    """``root/fg`` (procedural RGBA PNGs) and ``root/bg`` (smooth random RGB PNGs of odd aspect)."""
    fg, bg = root / "fg", root / "bg"
    fg.mkdir(parents=True, exist_ok=True)
    bg.mkdir(parents=True, exist_ok=True)
    for i in range(n_fg):
        Image.fromarray(to_uint8(procedural_foreground(40, i)), "RGBA").save(fg / f"fg{i}.png")
    rng = np.random.default_rng(0)
    for i in range(n_bg):
        base = rng.random((6, 9, 3))
        img = np.asarray(Image.fromarray(to_uint8(base)).resize((112, 80), Image.Resampling.BICUBIC))
        Image.fromarray(img).save(bg / f"bg{i}.png")
    return fg, bg


@pytest.fixture(scope="session")
def tiny_config() -> SynthConfig:
    return TINY


@pytest.fixture(scope="session")
def input_dirs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"))
