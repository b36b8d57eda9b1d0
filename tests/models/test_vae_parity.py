"""Flax VAE vs diffusers' PyTorch AutoencoderKL on the shared tiny configs, every weight mapped."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from parity_utils import assert_close, flax_params, nchw, nhwc, perturbed

from bokehdiff_jax.models.configs import VAEConfig
from bokehdiff_jax.models.vae import AutoencoderKL


def _setup(name):
    cfg = VAEConfig.from_diffusers(tiny_configs.VAES[name])
    model = perturbed(diffusers.AutoencoderKL(**tiny_configs.VAES[name]), seed=2)
    module = AutoencoderKL(cfg)
    return cfg, model, module, flax_params(module, model, np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize("name", sorted(tiny_configs.VAES))
def test_encode_decode_parity(name):
    cfg, model, module, params = _setup(name)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 17, 22, 3)).astype(np.float32)  # odd sides: one-sided padding
    mean, logvar = module.apply({"params": params}, x, method="encode")
    with torch.no_grad():
        dist = model.encode(nchw(x)).latent_dist
    f = cfg.downsample_factor
    assert mean.shape == (2, 17 // f, 22 // f, cfg.latent_channels)  # each halving rounds down
    assert_close(mean, nhwc(dist.mean))
    assert_close(logvar, nhwc(dist.logvar))
    z = rng.standard_normal((2, 3, 5, cfg.latent_channels)).astype(np.float32)
    out = module.apply({"params": params}, z, method="decode")
    with torch.no_grad():
        want = nhwc(model.decode(nchw(z)).sample)
    assert out.shape == (2, 3 * f, 5 * f, 3)
    assert_close(out, want)


def test_force_upcast_computes_fp16_in_fp32_and_keeps_bf16():
    """diffusers' rule: ``force_upcast`` (SDXL's VAE overflows fp16) runs an fp16 VAE in fp32; bf16 has
    fp32's range and stays bf16 (half the activation memory in training)."""
    cfg, _, _, params = _setup("sdxl")
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    ref = AutoencoderKL(cfg).apply({"params": params}, x, method="encode")[0]
    upcast = AutoencoderKL(cfg, dtype=jnp.float16).apply({"params": params}, x, method="encode")[0]
    assert upcast.dtype == jnp.float32
    np.testing.assert_array_equal(upcast, ref)
    low = AutoencoderKL(cfg, dtype=jnp.bfloat16).apply({"params": params}, x, method="encode")[0]
    assert low.dtype == jnp.bfloat16
    no_upcast = VAEConfig.from_diffusers({**tiny_configs.VAES["sdxl"], "force_upcast": False})
    half = AutoencoderKL(no_upcast, dtype=jnp.float16).apply({"params": params}, x, method="encode")[0]
    assert half.dtype == jnp.float16
    assert_close(half, np.asarray(ref), rel=0.05)
    assert_close(low, np.asarray(ref), rel=0.05)
