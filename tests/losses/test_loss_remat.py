"""Loss-network rematerialisation (``LossConfig.remat``, ``AdversarialConfig.remat``): the LPIPS term and
the generator's adversarial term give the same values and gradients with less kept for the backward pass;
the training config's ``model.remat`` switches both."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bokehdiff_jax.losses import Discriminator, LossConfig, lpips_params, total_loss
from bokehdiff_jax.losses.adversarial import backbone_channels, init_discriminator
from bokehdiff_jax.losses.config import AdversarialConfig
from bokehdiff_jax.train.config import load_config
from bokehdiff_jax.train.objective import loss_config

REL = 1e-5
# bytes kept for the backward pass with remat / without, LPIPS + adversarial at 64 px: measured 0.028
# (at 1024 px the full SDXL step's loss part keeps 10.3 GiB without, 0.34 GiB with); loose on purpose
RESIDUAL_RATIO = 0.2
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def assert_close(got, want, rel: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() <= rel * max(np.abs(want).max(), 1e-12)


def _config(remat: bool) -> LossConfig:
    adv = AdversarialConfig(start_step=0, remat=remat)
    return LossConfig(lpips_weight=0.5, adv_weight=0.3, edge_weight=1.0, remat=remat, adversarial=adv)


def _loss(remat: bool):
    cfg = _config(remat)

    def loss(pred, target, aif, lp, head, spectral):
        d = Discriminator(head, spectral, lp)
        total, terms = total_loss(pred, target, aif, cfg, lpips_params=lp, discriminator=d, step=1)
        return total, terms

    return loss


def _inputs(side: int):
    rng = np.random.default_rng(3)
    img = lambda: jnp.asarray(rng.uniform(-1, 1, (2, side, side, 3)), jnp.float32)
    adv = _config(False).adversarial
    head, spectral = init_discriminator(jax.random.key(1), backbone_channels(adv), adv)
    return img(), img(), img(), jax.tree.map(jnp.asarray, lpips_params()), head, spectral


def test_loss_remat_same_values_and_gradients():
    args = _inputs(32)
    grad = lambda r: jax.jit(jax.grad(_loss(r), has_aux=True))(*args)
    (g_on, terms_on), (g_off, terms_off) = grad(True), grad(False)
    assert set(terms_on) == {"mse", "edge", "lpips", "adv", "total"}
    for k in terms_off:
        assert_close(terms_on[k], terms_off[k], rel=REL)
    assert float(terms_off["lpips"]) > 0 and float(terms_off["adv"]) > 0
    assert float(jnp.abs(g_off).max()) > 0
    assert_close(g_on, g_off, rel=REL)


def test_loss_remat_keeps_fewer_residuals():
    """What ``jax.vjp`` keeps for the backward pass (its closure's residuals), without the arguments
    (the images and the frozen weights are there either way)."""
    args = jax.eval_shape(lambda: _inputs(64))
    arg_ids = {(a.shape, a.dtype) for a in jax.tree.leaves(args)}

    def kept(remat: bool) -> int:
        f = lambda *a: _loss(remat)(*a)[0]
        res = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), *args)
        return sum(r.size * r.dtype.itemsize for r in res if (r.shape, r.dtype) not in arg_ids)

    on, off = kept(True), kept(False)
    assert on <= RESIDUAL_RATIO * off, f"remat keeps {on} B for the backward pass vs {off} B without"


def test_model_remat_switches_the_loss_networks():
    c = load_config(str(CONFIGS / "sdxl_gpu1.py"))
    assert c.model.remat and loss_config(c).remat and loss_config(c).adversarial.remat
    c = load_config(str(CONFIGS / "tiny_cpu.py"))
    assert not c.model.remat and not loss_config(c).remat and not loss_config(c).adversarial.remat
