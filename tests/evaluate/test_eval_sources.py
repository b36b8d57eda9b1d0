"""Evaluation data sources: EBB! and BLB read from tiny folders in their public layouts, the held-out
synthetic set, synth folders, resizing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import write_blb, write_ebb

from bokehdiff_jax.data.samples import BACKGROUNDS
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.datasets import SourceOptions, open_source
from bokehdiff_jax.evaluate.sources import (
    HELDOUT_BACKGROUNDS,
    BlbSource,
    EbbSource,
    Example,
    HeldoutSynthetic,
    Resized,
    exposure_align,
)
from bokehdiff_jax.io.images import read_image


def test_ebb_reads_pairs_disparity_and_parameters(tmp_path):
    table = write_ebb(tmp_path / "ebb")
    src = EbbSource(tmp_path / "ebb", params=tmp_path / "ebb" / "params.json", exposure_align=False)
    assert len(src) == 3
    ex = src[1]
    assert ex.name == "ebb_1"
    np.testing.assert_array_equal(ex.image, read_image(tmp_path / "ebb" / "original" / "1.jpg"))
    np.testing.assert_array_equal(ex.target, read_image(tmp_path / "ebb" / "bokeh" / "1.jpg"))
    np.testing.assert_allclose(ex.disparity[0, [0, -1]], [0.1, 0.9], atol=1e-4)
    assert (ex.focus, ex.strength) == pytest.approx(table["1"])


def test_ebb_exposure_alignment_matches_the_reference_mean(tmp_path):
    write_ebb(tmp_path / "ebb")
    plain = EbbSource(tmp_path / "ebb", focus=0.5, strength=4.0, exposure_align=False)[0]
    aligned = EbbSource(tmp_path / "ebb", focus=0.5, strength=4.0)[0]
    assert abs(plain.image.mean() - plain.target.mean()) > 0.05  # the fixture's pair differs in exposure
    np.testing.assert_allclose(aligned.image, exposure_align(plain.image, plain.target))
    assert aligned.image.mean() == pytest.approx(plain.target.mean(), abs=2e-3)  # only clipping moves it


def test_ebb_id_list_selects_and_orders(tmp_path):
    write_ebb(tmp_path / "ebb")
    (tmp_path / "val.txt").write_text("# Val294-style list\n2\n\n0\n")
    src = EbbSource(tmp_path / "ebb", ids=tmp_path / "val.txt", focus=0.5, strength=3.0)
    assert [src[i].name for i in range(len(src))] == ["ebb_2", "ebb_0"]
    (tmp_path / "bad.txt").write_text("0\n7\n")
    with pytest.raises(InputError, match="ids without an image: 7"):
        EbbSource(tmp_path / "ebb", ids=tmp_path / "bad.txt", focus=0.5, strength=3.0)


def test_ebb_refuses_missing_parts(tmp_path):
    write_ebb(tmp_path / "ebb", params=False)
    with pytest.raises(InputError, match="records no focus or blur strength"):
        EbbSource(tmp_path / "ebb")
    with pytest.raises(InputError, match="no disparity folder"):
        EbbSource(tmp_path / "ebb", disparity_dir=tmp_path / "nowhere", focus=0.5, strength=1.0)
    (tmp_path / "ebb" / "disparity" / "1.png").unlink()
    with pytest.raises(InputError, match=r"expected one disparity map 1\{"):
        EbbSource(tmp_path / "ebb", focus=0.5, strength=1.0)[1]
    (tmp_path / "p.json").write_text(json.dumps({"0": {"focus": 0.5, "strength": 2}}))
    with pytest.raises(InputError, match="no focus/strength for ids 1, 2"):
        EbbSource(tmp_path / "ebb", params=tmp_path / "p.json")


def test_blb_reads_exr_scenes_and_keeps_every_coc_radius(tmp_path):
    infos = write_blb(tmp_path / "blb")
    src = BlbSource(tmp_path / "blb", level=4)
    assert len(src) == 4  # 2 scenes x 2 refocused disparities
    ex = src[3]
    assert ex.name == "blb_280_04_01"
    from bokehdiff_jax.evaluate.sources import read_exr

    lin = read_exr(tmp_path / "blb" / "280" / "bokeh_04_01.exr")
    want = np.clip(np.stack([lin[c] for c in "RGB"], -1) ** (1 / 2.2), 0, 1)
    np.testing.assert_allclose(ex.target, want, atol=1e-6)
    assert ex.target.max() == 1.0  # highlights above 1 are clipped, as BokehMe's evaluation does
    # Raw disparity 1 / depth spans [0.25, 2]: mapped into [0, 1] with the CoC radius K |d - d_f| kept.
    depth = read_exr(tmp_path / "blb" / "280" / "depth.exr")["B"]
    k, f = infos["280"]["blur_parameters"][4], infos["280"]["disp_focus"][1]
    coc = ex.strength * np.abs(ex.disparity - ex.focus)
    np.testing.assert_allclose(coc, k * np.abs(1 / depth - f), rtol=1e-4)
    assert 0.0 <= ex.disparity.min() and ex.disparity.max() <= 1.0


def test_blb_names_a_missing_focus_key(tmp_path):
    write_blb(tmp_path / "blb", scenes=("1",))
    with pytest.raises(InputError, match="no list 'focus_disparities' .*keys: blur_parameters, disp_focus"):
        BlbSource(tmp_path / "blb", focus_key="focus_disparities")
    with pytest.raises(InputError, match="no BLB scene folders"):
        BlbSource(tmp_path)


def test_heldout_set_is_deterministic_and_uses_no_training_photo():
    assert not set(HELDOUT_BACKGROUNDS) & set(BACKGROUNDS)
    a, b = HeldoutSynthetic(2, 32)[1], HeldoutSynthetic(2, 32)[1]
    for k in ("image", "disparity", "target"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert (a.focus, a.strength) == (b.focus, b.strength)
    assert a.image.shape == (32, 32, 3) and not np.array_equal(a.image, a.target)


def test_resized_scales_strength_with_the_image():
    rng = np.random.default_rng(0)
    ex = Example("x", rng.random((40, 60, 3), np.float32), rng.random((40, 60), np.float32), 0.5, 12.0,
                 rng.random((40, 60, 3), np.float32))  # fmt: skip

    class One:
        description = "one"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return ex

    small = Resized(One(), 30)[0]
    assert small.image.shape == (20, 30, 3) and small.disparity.shape == (20, 30)
    assert small.strength == pytest.approx(6.0)
    assert small.image.mean() == pytest.approx(ex.image.mean(), abs=1e-5)  # area resampling keeps means


def test_open_source_parses_specs(tmp_path):
    write_ebb(tmp_path / "ebb")
    src = open_source(f"ebb:{tmp_path / 'ebb'}", SourceOptions(params=str(tmp_path / "ebb" / "params.json")))
    assert len(src) == 3
    for bad in ("heldout:3", "ebb", "nope:x"):
        with pytest.raises(InputError, match="expected one of heldout"):
            open_source(bad)
    with pytest.raises(InputError, match="--tfds-dir"):
        open_source("tfds:blb/level5")
