"""Random PISA inputs shared by the tests in this folder (imported by module name: no package)."""

import jax.numpy as jnp
import numpy as np


def make_inputs(seed, batch, grid, heads, head_dim, image, scale=1.0):
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    q, k, v = (
        jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)) * scale, jnp.float32) for _ in range(3)
    )
    # A blocky random scene: planes at random disparities, so occlusion really happens.
    coarse = rng.uniform(0.0, 1.0, (batch, 4, 4))
    disparity = jnp.asarray(np.kron(coarse, np.ones((1, image[0] // 4 + 1, image[1] // 4 + 1))), jnp.float32)
    disparity = disparity[:, : image[0], : image[1]]
    focus = jnp.asarray(rng.uniform(0.2, 0.8, batch), jnp.float32)
    strength = jnp.asarray(rng.uniform(0.3, 0.6, batch) * max(image), jnp.float32)
    return q, k, v, disparity, focus, strength
