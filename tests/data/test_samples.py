"""The embedded sample data in the project's conventions (one loader for demo, bench, notebooks, tests)."""

import numpy as np
import pytest

from bokehdiff_jax.data import samples
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.io.images import looks_flipped


def test_motorcycle_full_and_resized():
    with np.load(samples.sample_path("motorcycle_disp.npz")) as z:
        raw = z["arr_0"]
    full = samples.motorcycle()
    assert full.image.shape == raw.shape + (3,) and full.disparity.shape == raw.shape
    assert samples.motorcycle_shape() == raw.shape
    assert full.n_filled == int((~np.isfinite(raw)).sum()) > 0 and full.n_pixels == raw.size
    d = full.disparity
    assert np.isfinite(d).all() and d.min() == 0.0 and d.max() == 1.0
    # Known pixels keep their order after normalisation (near = larger stereo disparity = 1).
    known = np.isfinite(raw)
    i, j = np.argmax(np.where(known, raw, -np.inf)), np.argmin(np.where(known, raw, np.inf))
    assert d.flat[i] == 1.0 and d.flat[j] == 0.0
    assert not looks_flipped(d)
    # Filled holes take values from their valid surroundings: inside the known range, not 0 or inf.
    assert 0.0 < d[~known].mean() < 1.0

    small = samples.motorcycle((50, 74))
    assert small.image.shape == (50, 74, 3) and small.disparity.shape == (50, 74)
    assert small.image.dtype == small.disparity.dtype == np.float32
    # Area resampling preserves the mean.
    np.testing.assert_allclose(small.disparity.mean(), d.mean(), rtol=1e-4)
    np.testing.assert_allclose(small.image.mean(), full.image.mean(), rtol=1e-4)
    assert samples.fit_longer_side(raw.shape, 74) == (50, 74)
    assert samples.fit_longer_side(raw.shape, 5000) == raw.shape  # never upscaled
    with pytest.raises(InputError):
        samples.motorcycle((0, 5))


def test_foregrounds_and_photos():
    horse, logo = samples.horse_rgba(), samples.logo_rgba()
    for rgba in (horse, logo):
        assert rgba.ndim == 3 and rgba.shape[-1] == 4 and rgba.dtype == np.float32
        assert 0.0 <= rgba.min() and rgba.max() <= 1.0
        alpha = rgba[..., 3]
        assert 0.02 < alpha.mean() < 0.9  # a matte, neither empty nor opaque
        assert alpha[0, 0] == 0.0  # the corners are the white surroundings
    assert set(np.unique(horse[..., 3])) == {0.0, 1.0}
    paths = samples.photo_paths()
    assert [p.name for p in paths] == list(samples.BACKGROUNDS) and all(p.is_file() for p in paths)
    with pytest.raises(InputError, match="not found"):
        samples.sample_path("no_such_file.png")
