import jax.numpy as jnp
import numpy as np
import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.physics import focus, optics


def test_srgb_roundtrip():
    x = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(optics.linear_to_srgb(optics.srgb_to_linear(x)), x, atol=1e-6)
    assert float(optics.srgb_to_linear(jnp.array(0.5))) == pytest.approx(0.5**2.2)


def test_coc_radius_batched():
    d = jnp.array([[[0.0, 0.5, 1.0]], [[0.0, 0.5, 1.0]]])  # [2, 1, 3]
    r = optics.coc_radius(d, jnp.array([0.5, 0.0]), jnp.array([10.0, 4.0]))
    np.testing.assert_allclose(r, [[[5.0, 0.0, 5.0]], [[0.0, 2.0, 4.0]]])
    # NumPy in -> NumPy out (host-side data code), same values.
    r_np = optics.coc_radius(np.asarray(d), np.array([0.5, 0.0], np.float32), np.float32(10.0))
    assert type(r_np) is np.ndarray and r_np.dtype == np.float32
    np.testing.assert_allclose(r_np, [[[5.0, 0.0, 5.0]], [[0.0, 5.0, 10.0]]])
    # One spatial axis: per-layer values [L] or token lists [B, N].
    np.testing.assert_allclose(
        optics.coc_radius(jnp.array([0.0, 0.5]), 0.25, 4.0, spatial_dims=1), [1.0, 1.0]
    )
    tok = optics.coc_radius(jnp.array([[0.0, 1.0], [0.5, 0.5]]), jnp.array([1.0, 0.0]), 2.0, spatial_dims=1)
    np.testing.assert_allclose(tok, [[2.0, 0.0], [1.0, 1.0]])


def test_focus_at_and_box():
    d = np.zeros((20, 30), np.float32)
    d[5:15, 10:20] = 0.8
    d[0, 0] = np.inf
    assert focus.focus_at(d, 15, 10, window=5) == pytest.approx(0.8)
    assert focus.focus_at(d, 1, 1, window=3) == pytest.approx(0.0)  # inf ignored
    assert focus.focus_in_box(d, 10, 5, 20, 15) == pytest.approx(0.8)
    with pytest.raises(InputError, match="outside"):
        focus.focus_at(d, 30, 0)


def test_resolve_focus_and_radius():
    d = np.zeros((20, 30), np.float32)
    d[5:15, 10:20] = 0.8
    assert focus.resolve_focus(d, value=0.25) == 0.25
    assert focus.resolve_focus(d, at=focus.parse_coords("15,10", 2, "--at")) == pytest.approx(0.8)
    assert focus.resolve_focus(d, box=(0, 0, 5, 5)) == pytest.approx(0.0)
    for bad in ({}, {"value": 0.5, "at": (1, 1)}, {"value": 1.5}, {"value": float("nan")}):
        with pytest.raises(InputError):
            focus.resolve_focus(d, **bad)
    for text in ("1", "1,2,3", "a,b", "nan,1"):
        with pytest.raises(InputError, match="--at expects 2"):
            focus.parse_coords(text, 2, "--at")
    # ceil(K max |d - d_f|) on exactly representable values: focus 0.25 -> worst 0.5; a stack spans 0.75.
    d[5:15, 10:20] = 0.75
    assert focus.needed_radius(d, 0.25, 10.0) == 5
    assert focus.needed_radius(d, 0.5, 10.0) == 5
    assert focus.needed_radius(d, None, 8.0) == 6
    assert focus.needed_radius(d, 0.25, 10.5) == 6
    assert focus.capped_radius(0, 128) == 1 and focus.capped_radius(300, 128) == 128


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
