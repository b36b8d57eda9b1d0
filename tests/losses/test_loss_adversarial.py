"""The discriminator head and losses against PyTorch's own ``torch.nn.utils.spectral_norm`` and
``BCEWithLogitsLoss``; the functional spectral state; a discriminator that learns; the step switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from bokehdiff_jax.losses import (
    AdversarialConfig,
    adversarial_active,
    backbone_features,
    discriminator_loss,
    generator_loss,
    init_discriminator,
    lpips_params,
)
from bokehdiff_jax.losses.adversarial import head_logits

CFG = AdversarialConfig()  # VGG16 relu5_3 backbone, 512 channels


@pytest.fixture(scope="module")
def vgg():
    return jax.tree.map(jnp.asarray, lpips_params())


def torch_head(params, spectral) -> torch.nn.Sequential:
    """``Linear -> LeakyReLU(0.2) -> Linear``, both under ``torch.nn.utils.spectral_norm``, holding our
    weights and power-iteration vectors."""
    layers = []
    for name in ("fc1", "fc2"):
        k = np.asarray(params[name]["kernel"])
        lin = torch.nn.utils.spectral_norm(torch.nn.Linear(*k.shape))
        with torch.no_grad():
            lin.weight_orig.copy_(torch.from_numpy(k.T.copy()))
            lin.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
            lin.weight_u.copy_(torch.from_numpy(np.array(spectral[name]["u"])))
            lin.weight_v.copy_(torch.from_numpy(np.array(spectral[name]["v"])))
        layers.append(lin)
    return torch.nn.Sequential(layers[0], torch.nn.LeakyReLU(0.2), layers[1])


def test_head_and_spectral_norm_equal_torch():
    params, spectral = init_discriminator(jax.random.key(0), 1024, CFG)
    feats = np.random.default_rng(0).normal(size=(2, 3, 3, 1024)).astype(np.float32)
    ref = torch_head(params, spectral).train()
    # Training mode: one power iteration, then W / sigma; gradients treat u, v as constants.
    x = torch.from_numpy(feats)
    want = ref(x)[..., 0]
    want.sum().backward()

    @jax.jit
    def ours(params, spectral):
        def total(p):
            logits, new = head_logits(p, spectral, feats, CFG, update=True)
            return logits.sum(), (logits, new)

        (_, (logits, new)), grads = jax.value_and_grad(total, has_aux=True)(params)
        return logits, new, grads

    logits, new, grads = ours(params, spectral)
    np.testing.assert_allclose(np.asarray(logits), want.detach().numpy(), atol=2e-5)
    for name, lin in zip(("fc1", "fc2"), (ref[0], ref[2]), strict=True):
        np.testing.assert_allclose(np.asarray(new[name]["u"]), lin.weight_u.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(new[name]["v"]), lin.weight_v.numpy(), atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(grads[name]["kernel"]).T, lin.weight_orig.grad.numpy(), atol=1e-4
        )
    # Evaluation mode: the stored vectors, no iteration; our update=False leaves the state unchanged.
    ref.eval()
    with torch.no_grad():
        want_eval = ref(x)[..., 0].numpy()
    logits_eval, same = jax.jit(lambda p, s: head_logits(p, s, feats, CFG, update=False))(params, new)
    np.testing.assert_allclose(np.asarray(logits_eval), want_eval, atol=2e-5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, new))


def test_losses_equal_torch_bce_with_label_smoothing(vgg):
    rng = np.random.default_rng(1)
    real, fake = (jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32) for _ in range(2))
    params, spectral = init_discriminator(jax.random.key(1), 512, CFG)

    @jax.jit
    def ours(params, spectral, vgg, real, fake):
        loss, (new, parts) = discriminator_loss(params, spectral, vgg, real, fake, CFG)
        g = generator_loss(params, new, vgg, fake, CFG)
        return loss, new, parts, g, backbone_features(vgg, jnp.concatenate([real, fake]), CFG)

    loss, new, parts, g, feats = ours(params, spectral, vgg, real, fake)
    feats = np.array(feats)
    assert feats.shape == (4, 1, 1, 512)  # relu5_3 of 16x16 images: stride 16
    ref = torch_head(params, spectral).train()
    bce = torch.nn.BCEWithLogitsLoss()
    with torch.no_grad():
        logits = ref(torch.from_numpy(feats))[..., 0]
        d_real = bce(logits[:2], torch.full_like(logits[:2], 0.8)).item()
        d_fake = bce(logits[2:], torch.zeros_like(logits[2:])).item()
    np.testing.assert_allclose(float(parts["d_real"]), d_real, rtol=1e-5)
    np.testing.assert_allclose(float(parts["d_fake"]), d_fake, rtol=1e-5)
    np.testing.assert_allclose(float(loss), d_real + d_fake, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["fc1"]["u"]), ref[0].weight_u.numpy(), atol=1e-5)

    g = float(g)
    ref.eval()
    with torch.no_grad():
        fake_logits = ref(torch.from_numpy(feats[2:]))[..., 0]
        want = bce(fake_logits, torch.full_like(fake_logits, 0.8)).item()
        # The released "multilevel" loss sums per-image means over the batch: ours times the batch size.
        released = sum(bce(fake_logits[i], torch.full_like(fake_logits[i], 0.8)).item() for i in range(2))
    np.testing.assert_allclose(g, want, rtol=1e-5)
    np.testing.assert_allclose(2 * g, released, rtol=1e-5)


def test_generator_gradient_reaches_the_image_only(vgg):
    cfg = AdversarialConfig(vgg_tap="relu3_3")  # a shallower tap: the same code path, a cheaper backward
    params, spectral = init_discriminator(jax.random.key(2), 256, cfg)
    noise = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3))
    fake = jnp.asarray(
        np.concatenate([np.full((1, 16, 16, 3), 0.5), noise]), jnp.float32
    )  # constant + random
    grad = jax.jit(jax.grad(lambda f, p: generator_loss(p, spectral, vgg, f, cfg), argnums=(0, 1)))
    g_img, g_par = grad(fake, params)
    assert np.all(np.isfinite(np.asarray(g_img))) and float(jnp.abs(g_img[1]).max()) > 0
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(g_par))


def test_discriminator_learns_to_tell_blurred_from_sharp(vgg):
    rng = np.random.default_rng(4)
    sharp = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    k = np.ones(5, np.float32) / 5  # a box blur of the same images: the "real" bokeh
    blurred = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, sharp)
    blurred = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 2, blurred)
    cfg = AdversarialConfig(vgg_tap="relu2_2")  # blur is a low-level cue; a shallow tap keeps this fast
    params, spectral = init_discriminator(jax.random.key(3), 128, cfg)
    opt = optax.adam(2e-3)

    @jax.jit
    def step(params, spectral, state):
        (loss, (spectral, _)), grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
            params, spectral, vgg, blurred, sharp, cfg
        )
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), spectral, state, loss

    state = opt.init(params)
    losses = []
    for _ in range(25):
        params, spectral, state, loss = step(params, spectral, state)
        losses.append(float(loss))
    # Label smoothing bounds the optimum at H(0.8) ~= 0.50 (real) + 0 (fake).
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[-1] > 0.5


def test_init_is_deterministic_and_the_switch_is_a_function_of_the_step():
    a, b, c = (init_discriminator(jax.random.key(k), 512, CFG) for k in (5, 5, 6))
    abstract = jax.eval_shape(lambda k: init_discriminator(k, 512, CFG), jax.random.key(5))  # traceable
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, a)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))
    assert not bool(jnp.all(a[0]["fc1"]["kernel"] == c[0]["fc1"]["kernel"]))
    # After init's power iterations, sigma estimates the largest singular value.
    w = np.asarray(a[0]["fc1"]["kernel"]).T
    sigma = float(a[1]["fc1"]["u"] @ w @ a[1]["fc1"]["v"])
    assert sigma == pytest.approx(np.linalg.svd(w, compute_uv=False)[0], rel=0.05)
    active = jax.jit(lambda s: adversarial_active(s, CFG))
    assert CFG.start_step == 1000 and CFG.disc_lr_factor == 2.0
    assert [bool(active(s)) for s in (0, 999, 1000, 5000)] == [False, False, True, True]
