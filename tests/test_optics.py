import jax.numpy as jnp
import numpy as np
import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics import optics


def test_srgb_roundtrip():
    x = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(optics.linear_to_srgb(optics.srgb_to_linear(x)), x, atol=1e-6)
    assert float(optics.srgb_to_linear(jnp.array(0.5))) == pytest.approx(0.5**2.2)


def test_coc_radius_batched():
    d = jnp.array([[[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]]])  # [2, 1, 3]
    r = optics.coc_radius(d, jnp.array([0.5, 0.0]), jnp.array([10.0, 4.0]))
    np.testing.assert_allclose(r, [[[5.0, 0.0, 5.0]], [[0.0, 2.0, 4.0]]])


def test_focus_at_and_box():
    d = np.zeros((20, 30), np.float32)
    d[5:15, 10:20] = 0.8
    d[0, 0] = np.inf
    assert optics.focus_at(d, 15, 10, window=5) == pytest.approx(0.8)
    assert optics.focus_at(d, 1, 1, window=3) == pytest.approx(0.0)  # inf ignored
    assert optics.focus_in_box(d, 10, 5, 20, 15) == pytest.approx(0.8)
    with pytest.raises(InputError, match="outside"):
        optics.focus_at(d, 30, 0)


@pytest.mark.parametrize("shape,size", [((12, 18), (4, 6)), ((13, 7), (5, 3)), ((4, 4), (12, 12))])
def test_area_resize_preserves_mean_and_blocks(shape, size):
    rng = np.random.default_rng(0)
    x = rng.random(shape).astype(np.float32)
    y = np.asarray(optics.area_resize(jnp.asarray(x), size))
    assert y.shape == size
    np.testing.assert_allclose(y.mean(), x.mean(), rtol=1e-5)
    if shape[0] % size[0] == 0 and shape[1] % size[1] == 0:
        fh, fw = shape[0] // size[0], shape[1] // size[1]
        expected = x.reshape(size[0], fh, size[1], fw).mean(axis=(1, 3))
        np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_bilinear_sample_centres_and_midpoints():
    img = jnp.arange(12.0).reshape(3, 4)
    assert float(optics.bilinear_sample(img, jnp.array(2.5), jnp.array(1.5))) == 6.0
    assert float(optics.bilinear_sample(img, jnp.array(1.0), jnp.array(0.5))) == 0.5
    # edge clamp: outside the image reads the border value
    assert float(optics.bilinear_sample(img, jnp.array(-5.0), jnp.array(-5.0))) == 0.0
    rgb = jnp.stack([img, 2 * img], -1)
    out = optics.bilinear_sample(rgb, jnp.array([2.5, 3.5]), jnp.array([1.5, 2.5]))
    np.testing.assert_allclose(out, [[6.0, 12.0], [11.0, 22.0]])
