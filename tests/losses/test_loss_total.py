"""``total_loss``: Eq. 12's weighted sum of the terms, the config, the step switch, batch averaging, and
finite values and gradients (constant images included) under ``jit``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.losses import (
    AdversarialConfig,
    Discriminator,
    LossConfig,
    edge_loss,
    generator_loss,
    init_discriminator,
    lpips_loss,
    lpips_params,
    mse,
    total_loss,
)

ADV = AdversarialConfig(start_step=10, vgg_tap="relu3_3")  # a shallower tap keeps the compiled backward small


@pytest.fixture(scope="module")
def frozen():
    lp = jax.tree.map(jnp.asarray, lpips_params())
    head, spectral = init_discriminator(jax.random.key(0), 256, ADV)
    return lp, Discriminator(head, spectral, lp)


def _batch(seed: int, b: int = 2, size: int = 32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(-1, 1, (b, size, size, 3)), jnp.float32) for _ in range(3)]


@pytest.fixture(scope="module")
def loss_and_grad(frozen):
    lp, disc = frozen
    config = LossConfig(adversarial=ADV)

    @jax.jit
    def f(pred, target, aif, step):
        return jax.value_and_grad(
            lambda p: total_loss(p, target, aif, config, lpips_params=lp, discriminator=disc, step=step),
            has_aux=True,
        )(pred)

    return f


def test_defaults_are_the_papers_and_the_released_script_is_one_call_away():
    c = LossConfig()
    assert (c.mse_weight, c.lpips_weight, c.edge_weight, c.adv_weight) == (1.0, 5.0, 1.0, 0.5)
    assert (
        c.edge_variant == "paper"
        and c.adversarial.backbone == "vgg16"
        and c.adversarial.disc_lr_factor == 2.0
    )
    r = LossConfig.released_script()
    assert (r.lpips_weight, r.adv_weight, r.edge_variant) == (0.1, 0.1, "released")
    assert r.adversarial.backbone == "convnext" and r.adversarial.convnext_input == "released"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mse_weight = 2.0  # type: ignore[misc]
    for bad in ({"lpips_weight": -1.0}, {"edge_weight": float("nan")}, {"edge_variant": "sobel"}):
        with pytest.raises(InputError):
            LossConfig(**bad)
    with pytest.raises(InputError, match="backbone"):
        AdversarialConfig(backbone="resnet")


def test_total_is_the_weighted_sum_of_independently_computed_terms(frozen, loss_and_grad):
    lp, disc = frozen
    pred, target, aif = _batch(0)
    pred = pred * 1.2  # partly outside [-1, 1]: MSE sees it raw, the other terms clipped (released code)
    (total, terms), _ = loss_and_grad(pred, target, aif, 10)

    @jax.jit
    def terms_one_by_one(pred, target, aif):
        clipped = jnp.clip(pred, -1, 1)
        return {
            "mse": mse(pred, target),
            "edge": edge_loss(clipped, target, aif),
            "lpips": lpips_loss(lp, clipped, target),
            "adv": generator_loss(disc.params, disc.spectral, lp, clipped, ADV),
        }

    want = terms_one_by_one(pred, target, aif)
    for k, v in want.items():
        np.testing.assert_allclose(float(terms[k]), float(v), rtol=1e-5, err_msg=k)
    weighted = 1.0 * want["mse"] + 5.0 * want["lpips"] + 1.0 * want["edge"] + 0.5 * want["adv"]
    np.testing.assert_allclose(float(total), float(weighted), rtol=1e-5)
    assert float(terms["total"]) == float(total)


def test_adversarial_term_switches_on_at_the_start_step(loss_and_grad):
    pred, target, aif = _batch(1)
    (before, t_before), _ = loss_and_grad(pred, target, aif, 9)
    (after, t_after), _ = loss_and_grad(pred, target, aif, 10)
    assert float(t_before["adv"]) == 0.0 and float(t_after["adv"]) > 0.0
    np.testing.assert_allclose(float(after - before), 0.5 * float(t_after["adv"]), rtol=1e-5)


def test_batch_averaged(frozen, loss_and_grad):
    lp, disc = frozen
    a = _batch(2, b=1)
    (two_copies, _), _ = loss_and_grad(*(jnp.concatenate([x, x]) for x in a), 10)
    one = jax.jit(
        lambda p, t, f: total_loss(
            p, t, f, LossConfig(adversarial=ADV), lpips_params=lp, discriminator=disc, step=10
        )
    )
    single, _ = one(*a)
    np.testing.assert_allclose(float(two_copies), float(single), rtol=1e-5)


def test_constant_images_give_finite_values_and_gradients(loss_and_grad):
    for p, t, f in ((0.2, 0.2, 0.2), (0.0, -0.5, 0.5), (1.0, -1.0, 1.0), (-1.0, -1.0, -1.0)):
        pred, target, aif = (jnp.full((2, 32, 32, 3), v, jnp.float32) for v in (p, t, f))
        (total, terms), grad = loss_and_grad(pred, target, aif, 10)
        assert all(np.isfinite(float(v)) for v in terms.values()), (p, t, f, terms)
        assert np.all(np.isfinite(np.asarray(grad))), (p, t, f)
        if p == t:
            assert float(terms["mse"]) == 0.0 and float(terms["lpips"]) < 1e-7


def test_zero_weights_skip_terms_and_missing_inputs_are_errors():
    pred, target, aif = _batch(4)
    total, terms = total_loss(pred, target, aif, LossConfig(lpips_weight=0.0, adv_weight=0.0))
    assert sorted(terms) == ["edge", "mse", "total"]
    with pytest.raises(InputError, match="lpips_params"):
        total_loss(pred, target, aif, LossConfig(adv_weight=0.0))
    with pytest.raises(InputError, match="discriminator"):
        total_loss(pred, target, aif, LossConfig(lpips_weight=0.0))
    with pytest.raises(InputError, match="one shape"):
        total_loss(pred, target[:, :16], aif, LossConfig(lpips_weight=0.0, adv_weight=0.0))


def test_losses_never_import_torch():
    code = (
        "import sys, bokehdiff_jax.losses, bokehdiff_jax.losses.fetch_weights\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lpips', 'torchvision'))\n"
        "sys.exit(print(bad) or (1 if bad else 0))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
