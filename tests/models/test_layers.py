"""Small numerics of ``models.layers`` and ``models.attention`` against their references."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bokehdiff_jax.models.attention import dot_product_attention
from bokehdiff_jax.models.layers import GroupNorm


def test_dot_product_attention_matches_jax_values_and_gradients():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 16)).astype(np.float32) for n in (30, 11, 11))
    np.testing.assert_allclose(
        dot_product_attention(q, k, v), jax.nn.dot_product_attention(q, k, v), atol=1e-6
    )
    loss = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(loss(dot_product_attention), loss(jax.nn.dot_product_attention), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    out = dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16


def test_group_norm_matches_torch_far_from_zero():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 7, 12)) * 3 + 40).astype(np.float32)  # a large mean: two-pass variance
    gn = GroupNorm(4, 1e-6)
    scale, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    got = gn.apply({"params": {"scale": scale, "bias": bias}}, x)
    ref = torch.nn.GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert gn.apply({"params": {"scale": scale, "bias": bias}}, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
