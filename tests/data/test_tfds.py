"""TFDS builder ``synbokeh``: build from a tiny synth folder, read back exactly, feed the Grain loader."""

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

import bokehdiff_jax.cli
from bokehdiff_jax.data.items import list_items, read_item
from bokehdiff_jax.data.loader import make_loader
from bokehdiff_jax.errors import InputError


def test_synbokeh_round_trip(input_dirs, tmp_path, monkeypatch):
    from bokehdiff_jax.data.tfds import SynbokehSource, build_synbokeh

    monkeypatch.setattr(bokehdiff_jax.cli, "COMMANDS", {"synth": bokehdiff_jax.cli.COMMANDS["synth"]})
    fg, bg = input_dirs
    out = tmp_path / "synth"
    argv = f"synth --fg {fg} --bg {bg} --out {out} -n 3 --size 32 --log2-times -1 -1 --no-progress"
    assert bokehdiff_jax.cli.main(argv.split()) == 0
    data_dir = tmp_path / "tfds"
    build_synbokeh(out, data_dir)

    raw = tfds.data_source("synbokeh", data_dir=str(data_dir), split="train")
    assert len(raw) == 3
    src = SynbokehSource(data_dir)
    got = {int(src[i]["index"]): src[i] for i in range(len(src))}
    for item in list_items(out):
        ref = read_item(item)
        ex = got[int(ref["index"])]
        assert set(ex) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(ex[k], ref[k])

    batches = list(
        make_loader(src, batch_size=3, seed=0, num_epochs=1, shard_options=grain.sharding.ShardOptions(0, 1))
    )
    assert len(batches) == 1 and sorted(batches[0]["index"].tolist()) == [0, 1, 2]

    with pytest.raises(InputError):
        build_synbokeh(tmp_path / "missing", data_dir)
