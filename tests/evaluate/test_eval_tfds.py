"""TFDS builders ``ebb_val294`` and ``blb/levelN``: built from tiny folders in the public layouts, read back
through ``--data tfds:NAME`` equal to the folder readers."""

from __future__ import annotations

import numpy as np
import pytest
from eval_fixtures import write_blb, write_ebb

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.datasets import SourceOptions, open_source
from bokehdiff_jax.evaluate.sources import BlbSource, EbbSource
from bokehdiff_jax.evaluate.tfds_builders import build


def _same(a, b):
    assert a.name == b.name
    for k in ("image", "target", "disparity"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert (a.focus, a.strength) == pytest.approx((b.focus, b.strength))


def test_ebb_val294_round_trip(tmp_path):
    write_ebb(tmp_path / "ebb", ids=("3", "10"))
    (tmp_path / "ebb" / "ids.txt").write_text("10\n")
    build("ebb_val294", tmp_path / "ebb", tmp_path / "tfds")
    got = open_source("tfds:ebb_val294", SourceOptions(tfds_dir=str(tmp_path / "tfds")))
    ref = EbbSource(
        tmp_path / "ebb", ids=tmp_path / "ebb" / "ids.txt", params=tmp_path / "ebb" / "params.json"
    )
    assert len(got) == len(ref) == 1
    _same(got[0], ref[0])  # exposure alignment applied on reading, as the folder reader does


def test_ebb_val294_without_parameters_takes_them_when_read(tmp_path):
    write_ebb(tmp_path / "ebb", ids=("1",), params=False)
    build("ebb_val294", tmp_path / "ebb", tmp_path / "tfds")
    with pytest.raises(InputError, match="stores no focus/strength"):
        open_source("tfds:ebb_val294", SourceOptions(tfds_dir=str(tmp_path / "tfds")))[0]
    got = open_source(
        "tfds:ebb_val294", SourceOptions(tfds_dir=str(tmp_path / "tfds"), focus=0.4, strength=6.0)
    )
    _same(got[0], EbbSource(tmp_path / "ebb", focus=0.4, strength=6.0)[0])


def test_blb_level_round_trip(tmp_path):
    write_blb(tmp_path / "blb", scenes=("5",))
    build("blb/level2", tmp_path / "blb", tmp_path / "tfds")
    got = open_source("tfds:blb/level2", SourceOptions(tfds_dir=str(tmp_path / "tfds")))
    ref = BlbSource(tmp_path / "blb", level=1)
    assert len(got) == len(ref) == 2
    by_name = {got[i].name: got[i] for i in range(len(got))}
    for i in range(len(ref)):
        _same(by_name[ref[i].name], ref[i])
    with pytest.raises(InputError, match="unknown benchmark"):
        build("blb/level9", tmp_path / "blb", tmp_path / "tfds")
