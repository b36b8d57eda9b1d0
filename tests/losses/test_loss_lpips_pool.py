"""LPIPS's VGG16 pooling (``losses.lpips.max_pool_2x2``): the values of ``nn.max_pool`` (floor on odd
sides), and the same gradient where a window has one maximum."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.losses.lpips import max_pool_2x2


def test_max_pool_2x2_equals_max_pool():
    x = jax.random.normal(jax.random.key(0), (2, 9, 6, 3))  # odd height: the last row is dropped
    want = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    got = max_pool_2x2(x)
    assert got.shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(got, want)
    r = jax.random.normal(jax.random.key(1), want.shape)
    g_got = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * r))(x)
    g_want = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID") * r))(x)
    np.testing.assert_array_equal(g_got, g_want)  # random normals: no ties
    assert float(jnp.abs(g_got[:, 8]).max()) == 0.0
