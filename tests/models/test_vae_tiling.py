"""Tiled VAE encode/decode equals the untiled model everywhere (tiny random VAEs, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
from parity_utils import assert_close

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.configs import VAEConfig
from bokehdiff_jax.models.vae import AutoencoderKL
from bokehdiff_jax.models.vae_tiling import decode_tiled, encode_tiled

REL = 1e-5  # the brief's bar: tiled == untiled to fp32 rounding, at every pixel


def _vae(name: str, **overrides):
    """A tiny random VAE. Params are drawn with NumPy on the abstract tree (an eager ``init`` would
    compile every layer: ~10 s here): kernels ~ N(0, 1/fan_in), norm scales near 1, nonzero biases,
    so every norm's scale and bias matters."""
    cfg = VAEConfig.from_diffusers({**tiny_configs.VAES[name], **overrides})
    module = AutoencoderKL(cfg)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    rng = np.random.default_rng(3)

    def draw(path, leaf):
        n = rng.standard_normal(leaf.shape).astype(np.float32)
        last = path[-1].key
        if last == "kernel":
            return jnp.asarray(n / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if last == "scale" else 0.0) + 0.1 * n)

    return cfg, module, {"params": jax.tree_util.tree_map_with_path(draw, abstract)}


# Sides that are not multiples of the tile nor of the downsampling factor; tiles smaller than every
# level's map in both axes (encode: 8 -> 4 -> 2 px on 45 x 38 -> 22 x 19 -> 11 x 9; decode: 3 -> 6 -> 12
# on 7 x 5 -> 14 x 10 -> 28 x 20).
@pytest.mark.parametrize("name", sorted(tiny_configs.VAES))
def test_tiled_equals_untiled(name):
    cfg, module, variables = _vae(name)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 45, 38, 3)).astype(np.float32)
    mean, logvar = module.apply(variables, x, method="encode")
    t_mean, t_logvar = encode_tiled(module, variables, x, tile=8)
    assert_close(t_mean, np.asarray(mean), rel=REL)
    assert_close(t_logvar, np.asarray(logvar), rel=REL)
    z = rng.standard_normal((2, 7, 5, cfg.latent_channels)).astype(np.float32)
    want = np.asarray(module.apply(variables, z, method="decode"))
    assert_close(decode_tiled(module, variables, z, tile=3), want, rel=REL)


def test_tile_larger_than_image_and_no_attention():
    cfg, module, variables = _vae("sdxl", mid_block_add_attention=False)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, 21, 30, 3)).astype(np.float32)
    mean, logvar = module.apply(variables, x, method="encode")
    t_mean, t_logvar = encode_tiled(module, variables, x, tile=64)
    assert_close(t_mean, np.asarray(mean), rel=REL)
    assert_close(t_logvar, np.asarray(logvar), rel=REL)
    z = rng.standard_normal((1, 5, 7, cfg.latent_channels)).astype(np.float32)
    want = np.asarray(module.apply(variables, z, method="decode"))
    assert_close(decode_tiled(module, variables, z, tile=64), want, rel=REL)


def test_force_upcast_computes_fp16_in_fp32():
    _, _, variables = _vae("sd15")
    cfg = VAEConfig.from_diffusers({**tiny_configs.VAES["sd15"], "force_upcast": True})
    module = AutoencoderKL(cfg, dtype=jnp.float16)
    z = np.random.default_rng(2).standard_normal((1, 6, 5, cfg.latent_channels)).astype(np.float32)
    want = module.apply(variables, z, method="decode")
    got = decode_tiled(module, variables, z, tile=4)
    assert want.dtype == got.dtype == jnp.float32
    assert_close(got, np.asarray(want), rel=REL)


@pytest.mark.parametrize("tile", [0, -8, 6, 8.0, True])
def test_bad_tile_is_an_input_error(tile):
    cfg, module, variables = _vae("sdxl")  # downsampling factor 4: encode tiles must be multiples of 4
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(InputError, match="tile"):
        encode_tiled(module, variables, x, tile=tile)
    if tile != 6:  # any positive int is a valid decode tile
        with pytest.raises(InputError, match="tile"):
            decode_tiled(module, variables, np.zeros((1, 4, 4, cfg.latent_channels), np.float32), tile=tile)


def test_bad_input_shape_is_an_input_error():
    cfg, module, variables = _vae("sdxl")
    for x in (np.zeros((1, 3, 16, 3)), np.zeros((1, 16, 16, 4)), np.zeros((16, 16, 3))):  # 3 < factor 4
        with pytest.raises(InputError, match="shape"):
            encode_tiled(module, variables, x, tile=8)
    with pytest.raises(InputError, match="shape"):
        decode_tiled(module, variables, np.zeros((1, 4, 4, cfg.latent_channels + 1)), tile=4)
