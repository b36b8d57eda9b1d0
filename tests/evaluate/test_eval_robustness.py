"""The robustness study's disparity perturbation (erode/dilate at depth edges) and its bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.evaluate.robustness import parse_ks, perturb_disparity, summarize


def _scene() -> np.ndarray:
    """A gentle far ramp (0.10 .. 0.30 over 40 px: no edge) with a near square (0.9) in it."""
    d = np.tile(np.linspace(0.1, 0.3, 40, dtype=np.float32), (30, 1))
    d[10:20, 15:25] = 0.9
    return d


def test_dilation_grows_the_near_object_by_k_and_leaves_the_ramp():
    d = _scene()
    out = perturb_disparity(d, 3)
    near = out > 0.85
    # The square grew by 3 px on each side (a disc: its corners are rounded off).
    assert near[10:20, 12:28].all() and near[7:23, 15:25].all()
    assert not near[10:20, 11].any() and not near[6, 15:25].any()
    assert not near[7, 12] and not near[22, 27]  # (3, 3) from the corner lies outside the radius-3 disc
    # Far from any edge nothing moves, although a plain grey dilation would raise the ramp there.
    np.testing.assert_array_equal(out[:, :5], d[:, :5])
    np.testing.assert_array_equal(out[0:3, :], d[0:3, :])


def test_erosion_shrinks_the_near_object_and_k0_is_the_identity():
    d = _scene()
    out = perturb_disparity(d, -2)
    near = out > 0.85
    assert near.sum() == (10 - 4) * (10 - 4)
    assert near[12:18, 17:23].all()
    np.testing.assert_array_equal(perturb_disparity(d, 0), d)
    np.testing.assert_array_equal(out[:, :5], d[:, :5])


def test_a_single_near_pixel_dilates_to_a_disc():
    d = np.zeros((11, 11), np.float32)
    d[5, 5] = 1.0
    out = perturb_disparity(d, 2)
    yy, xx = np.mgrid[:11, :11]
    np.testing.assert_array_equal(out == 1.0, (yy - 5) ** 2 + (xx - 5) ** 2 <= 4)


def test_parse_ks():
    assert parse_ks("-8:8:4") == (-8, -4, 0, 4, 8)
    assert parse_ks("4,-4,0") == (-4, 0, 4)
    for bad in ("", "1,1", "a", "0:8:0", "-100:0:50"):
        with pytest.raises(InputError, match="--robustness-ks"):
            parse_ks(bad)


def test_summarize_gives_quartiles_per_method_and_k():
    rows = [{"method": "m", "k": 2, "psnr": v} for v in (1.0, 2.0, 3.0, 4.0, 10.0)]
    (s,) = summarize(rows, ["psnr"])
    assert (s["count"], s["mean"], s["median"], s["q1"], s["q3"]) == (5, 4.0, 3.0, 2.0, 4.0)
