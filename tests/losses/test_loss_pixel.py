"""MSE and the multi-scale edge loss against PyTorch (``F.interpolate(mode="area")`` scales, the way the
released training script computes them), and their defining properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bokehdiff_jax.losses import edge_loss, mse
from bokehdiff_jax.losses.pixel import downsample_area
from bokehdiff_jax.torch import losses as torch_losses

EDGE = jax.jit(edge_loss, static_argnames=("variant", "scales"))


def _images(shape, seed):
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(0, 0.5, shape), -1, 1).astype(np.float32) for _ in range(3)]


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("size", [(8, 2), (7, 3), (37, 3), (50, 3), (64, 2), (85, 3), (255, 3), (256, 3)])
def test_downsampling_equals_torch_area_interpolation(size):
    n, factor = size
    x = np.random.default_rng(n).normal(size=(1, n, n + 5, 2)).astype(np.float32)
    ours = np.asarray(downsample_area(jnp.asarray(x), factor))
    want = F.interpolate(_nchw(x), scale_factor=1 / factor, mode="area").permute(0, 2, 3, 1).numpy()
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_mse():
    p, t, _ = _images((2, 9, 11, 3), 0)
    np.testing.assert_allclose(float(mse(p, t)), np.mean((p - t) ** 2), rtol=1e-6)
    np.testing.assert_allclose(float(mse(p, t)), float(torch_losses.mse(_nchw(p), _nchw(t))), rtol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 37, 50, 3)])
def test_edge_loss_equals_torch(variant, shape):
    p, t, f = _images(shape, 1)
    ours = float(EDGE(p, t, f, variant=variant))
    want = float(torch_losses.edge_loss(_nchw(p), _nchw(t), _nchw(f), variant=variant))
    np.testing.assert_allclose(ours, want, rtol=1e-5)


def test_edge_loss_single_scale_by_hand():
    # One row, scale 1 only: differences along x are (p0 - p1, p1 - p2); none along y beyond the single row
    # pair. Computed directly from Eq. 10's definition.
    p = np.array([0.0, 0.5, 0.5], np.float32)
    t = np.array([0.0, 0.2, 0.8], np.float32)
    f = np.array([1.0, -1.0, -1.0], np.float32)
    img = lambda v: jnp.asarray(np.stack([v, v])[None, :, :, None])  # [1, 2, 3, 1], rows equal
    dp, dt, df = -np.diff(p), -np.diff(t), -np.diff(f)
    w = np.maximum(np.abs(dt), np.abs(df))
    x_term = np.mean(np.abs(dp - dt) * w)  # the y differences are all zero
    assert float(edge_loss(img(p), img(t), img(f), scales=1)) == pytest.approx(x_term, rel=1e-6)
    released = np.mean(np.abs(dp - dt) * (1 + w))
    assert float(edge_loss(img(p), img(t), img(f), variant="released", scales=1)) == pytest.approx(
        released, rel=1e-6
    )


def test_edge_loss_weights_edges_only():
    p, t, f = _images((1, 32, 32, 3), 2)
    assert float(EDGE(t, t, f)) == 0.0  # prediction = target
    flat = np.zeros_like(t)  # target and input both flat: Eq. 10's weight is zero everywhere
    assert float(EDGE(p, flat, flat)) == 0.0
    assert float(EDGE(p, flat, flat, variant="released")) > 0.0  # its "+ 1" keeps flat regions
    assert float(EDGE(p, t, f)) > 0.0


def test_edge_loss_is_batch_averaged_and_differentiable():
    p, t, f = _images((1, 24, 24, 3), 3)
    one = float(EDGE(p, t, f))
    two = float(EDGE(*(np.concatenate([a, a]) for a in (p, t, f))))
    assert two == pytest.approx(one, rel=1e-6)
    const = jnp.full((1, 24, 24, 3), 0.25)
    for variant in ("paper", "released"):
        loss = jax.jit(jax.grad(lambda x, a, b, v=variant: edge_loss(x, a, b, variant=v)))
        g = loss(const, const, const)  # |0| at every pixel
        assert np.all(np.isfinite(np.asarray(g)))
        g = loss(jnp.asarray(p), t, f)
        assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(ValueError, match="too small for scale 3"):
        edge_loss(p[:, :5, :5], t[:, :5, :5], f[:, :5, :5])
