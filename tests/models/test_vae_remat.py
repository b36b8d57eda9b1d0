"""VAE rematerialisation (``AutoencoderKL.remat``): same params, values and gradients, less memory; the
one-step model's ``remat`` switch sets it (and inference turns it off)."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny_configs
from parity_utils import assert_close

from bokehdiff_jax.models.bokehdiff import BokehDiff
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.vae import AutoencoderKL
from bokehdiff_jax.pipeline.onestep import inference_model

REL = 1e-5
# bytes kept for the backward pass with remat / without, at 64 px: measured 0.22 (0.31 at 32 px, where
# the params weigh more); the bound is loose on purpose
RESIDUAL_RATIO = 0.4


def _cfg() -> VAEConfig:
    return VAEConfig.from_diffusers(tiny_configs.VAES["sdxl"])  # has the mid-block attention


def _params(module: AutoencoderKL) -> dict:
    """Random params drawn with NumPy on the abstract tree (an eager ``init`` compiles every layer):
    kernels ~ N(0, 1/fan_in), norm scales near 1, nonzero biases."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    rng = np.random.default_rng(5)

    def draw(path, leaf):
        n = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return jnp.asarray(n / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.1 * n)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _loss(module: AutoencoderKL, aux: bool = False):
    """A pixel loss through encode and decode, as in training: ``(params, x, dz) -> scalar`` (and, with
    ``aux``, the encoder's ``(mean, logvar)`` and the decoded pixels)."""

    def loss(params, x_bhwc, dz):
        mean, logvar = module.apply({"params": params}, x_bhwc, method="encode")
        y = module.apply({"params": params}, mean + dz, method="decode")
        value = jnp.mean(jnp.square(y - x_bhwc))
        return (value, (mean, logvar, y)) if aux else value

    return loss


def test_remat_same_params_values_and_gradients():
    cfg = _cfg()
    off, on = AutoencoderKL(cfg), AutoencoderKL(cfg, remat=True)
    x0 = jnp.zeros((1, 16, 16, 3))
    tree_off = jax.eval_shape(off.init, jax.random.key(0), x0)
    tree_on = jax.eval_shape(on.init, jax.random.key(0), x0)
    assert jax.tree_util.tree_structure(tree_on) == jax.tree_util.tree_structure(tree_off)
    assert jax.tree.leaves(tree_on) == jax.tree.leaves(tree_off)  # shapes and dtypes
    assert "resnets_0" in tree_on["params"]["decoder"]["up_blocks_0"]  # names kept under nn.remat

    params = _params(off)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 24, 3)), jnp.float32)
    f = cfg.downsample_factor
    dz = jnp.asarray(0.1 * rng.standard_normal((2, 32 // f, 24 // f, cfg.latent_channels)), jnp.float32)

    # one compile per model: encode and decode values come out beside the gradients
    grad = lambda m: jax.jit(jax.grad(_loss(m, aux=True), argnums=(0, 2), has_aux=True))(params, x, dz)
    ((gp_on, gz_on), out_on), ((gp_off, gz_off), out_off) = grad(on), grad(off)
    for g, w in zip(out_on, out_off, strict=True):  # mean, logvar, decoded pixels
        assert_close(g, np.asarray(w), rel=REL)
    assert_close(gz_on, np.asarray(gz_off), rel=REL)
    assert float(jnp.abs(gz_off).max()) > 0
    for part in ("encoder", "decoder"):
        leaves_on, leaves_off = jax.tree.leaves(gp_on[part]), jax.tree.leaves(gp_off[part])
        # against the part's largest gradient: some leaves' exact gradient is 0 (a conv bias right before
        # a GroupNorm), where both runs hold rounding noise of order 1e-9
        scale = max(float(jnp.abs(w).max()) for w in leaves_off)
        for g, w in zip(leaves_on, leaves_off, strict=True):
            assert float(jnp.abs(g - w).max()) <= REL * scale


def test_remat_saves_fewer_residuals():
    """What the backward pass keeps from the forward pass (the residuals held by ``jax.vjp``'s
    closure) shrinks with remat. Measured here rather than XLA's ``temp_size_in_bytes``: this JAX's
    CPU backend undoes remat (CSE merges recomputed matmuls back into the forward pass, and with CSE
    off its temp size still does not move), so its temp memory is the same with and without, even for
    a chain of ``jax.checkpoint``-ed matmuls. GPU and TPU compiles are not checked here."""
    cfg, side = _cfg(), 64
    f = cfg.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    dz = jax.ShapeDtypeStruct((1, side // f, side // f, cfg.latent_channels), jnp.float32)

    def residual_bytes(module: AutoencoderKL) -> int:
        params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
        residuals = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(_loss(module), *a)[1]), params, x, dz)
        return sum(r.size * r.dtype.itemsize for r in residuals)

    off, on = residual_bytes(AutoencoderKL(cfg)), residual_bytes(AutoencoderKL(cfg, remat=True))
    assert on <= RESIDUAL_RATIO * off, f"remat keeps {on} B for the backward pass vs {off} B without"


def test_model_remat_switch_reaches_vae():
    ucfg = UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"])
    model = BokehDiff.create(ucfg, _cfg(), remat=True)
    assert model.unet.remat and model.vae.remat
    assert not BokehDiff.create(ucfg, _cfg()).vae.remat
    plain = inference_model(model)
    assert not plain.unet.remat and not plain.vae.remat
