"""PISA inside the tiny U-Net: routed by path, vanilla elsewhere, deterministic per-layer keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

import bokehdiff_jax.pisa as pisa_pkg
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting, PisaInputs, layer_key
from bokehdiff_jax.models.configs import UNetConfig
from bokehdiff_jax.models.unet import UNet2DConditionModel
from bokehdiff_jax.pisa import PisaConfig

SIZE = (10, 14)  # latent; the image is 8x larger
PISA = PisaConfig(impl="blockwise", block_q=16, block_k=16, supersample=2, segments=3, dropout=0.1)


@pytest.fixture(scope="module")
def unet():
    cfg = UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"])
    model = UNet2DConditionModel(cfg, routing=AttentionRouting(pisa=PISA))
    # Random weights straight from the abstract tree (initialising the net costs a long CPU compile).
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(batch=2, size=SIZE))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
    x = jnp.asarray(rng.standard_normal((2, *SIZE, cfg.in_channels)), jnp.float32)
    t = jnp.asarray([499.0, 499.0])
    ctx = jnp.asarray(rng.standard_normal((2, 7, cfg.cross_attention_dim)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, cfg.text_embeds_dim)), jnp.float32)
    ids = jnp.tile(jnp.asarray([[80.0, 112.0, 0.0, 0.0, 80.0, 112.0]]), (2, 1))
    return cfg, params, (x, t, ctx, text, ids)


def _context(seed, train=False, key=None):
    rng = np.random.default_rng(seed)
    disparity = np.kron(rng.uniform(0, 1, (2, 5, 7)), np.ones((16, 16))).astype(np.float32)  # [2, 80, 112]
    return PisaInputs(
        jnp.asarray(disparity),
        jnp.asarray([0.3, 0.7]),
        jnp.asarray([20.0, 30.0]),
        step=jnp.asarray(5) if train else None,
        key=key,
        train=train,
    )


def _apply(cfg, routing):
    model = UNet2DConditionModel(cfg, routing=routing)
    return jax.jit(
        lambda params, inputs, context: model.apply({"params": params}, *inputs, attention_context=context)
    )


def test_context_routes_pisa_only_to_the_selected_layers(unet, monkeypatch):
    cfg, params, inputs = unet
    grids = []
    real = pisa_pkg.pisa_attention

    def spy(q, k, v, **kw):
        grids.append(kw["grid"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(pisa_pkg, "pisa_attention", spy)
    routed = _apply(cfg, AttentionRouting(pisa=PISA))
    unrouted = _apply(cfg, AttentionRouting(pisa_paths=(), pisa=PISA))
    vanilla = routed(params, inputs, None)
    assert grids == []  # no context: no PISA anywhere
    with_a = routed(params, inputs, _context(1))
    # SPEC placement: only down_blocks.1.attentions.0's self-attention (one block in the tiny net, 5 x 7).
    assert grids == [(5, 7)]
    with_b = routed(params, inputs, _context(2))
    assert np.abs(np.asarray(with_a) - np.asarray(vanilla)).max() > 1e-4
    assert np.abs(np.asarray(with_a) - np.asarray(with_b)).max() > 1e-5  # depends on the disparity
    # Nothing routed: a context changes nothing.
    np.testing.assert_allclose(unrouted(params, inputs, _context(1)), vanilla, rtol=1e-6, atol=1e-6)


def test_training_keys_are_deterministic_per_layer(unet):
    cfg, params, inputs = unet
    routing = AttentionRouting(
        pisa_paths=("down_blocks.1.attentions.0.*.attn1", "up_blocks.0.*.attn1"), pisa=PISA
    )
    fn = _apply(cfg, routing)
    a = fn(params, inputs, _context(1, True, jax.random.key(7)))
    b = fn(params, inputs, _context(1, True, jax.random.key(7)))
    c = fn(params, inputs, _context(1, True, jax.random.key(8)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6
    key = jax.random.key(7)
    k1 = layer_key(key, "down_blocks.1.attentions.0.transformer_blocks.0.attn1")
    k2 = layer_key(key, "up_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    np.testing.assert_array_equal(
        jax.random.key_data(k1),
        jax.random.key_data(layer_key(key, "down_blocks.1.attentions.0.transformer_blocks.0.attn1")),
    )
    assert layer_key(None, "x") is None


def test_attend_routes_by_path_and_rejects_foreign_contexts():
    from bokehdiff_jax.models.attention import attend, vanilla_attention

    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 35, 2, 4)), jnp.float32) for _ in range(3))
    routing = AttentionRouting(pisa=PisaConfig(impl="dense", supersample=1))
    routed = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    vanilla = vanilla_attention(q, k, v)
    # The CPU kernel normalises after the value product: the same softmax attention up to rounding.
    np.testing.assert_allclose(vanilla, jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    other = attend(
        q,
        k,
        v,
        path="mid_block.attentions.0.transformer_blocks.0.attn1",
        grid=(5, 7),
        routing=routing,
        context=_context(1),
    )
    np.testing.assert_array_equal(other, vanilla)
    pisa = attend(q, k, v, path=routed, grid=(5, 7), routing=routing, context=_context(1))
    assert np.abs(np.asarray(pisa) - np.asarray(vanilla)).max() > 1e-3
    with pytest.raises(InputError, match="PisaInputs"):
        attend(q, k, v, path=routed, grid=(5, 7), routing=routing, context="ctx")


def test_routing_survives_remat(unet, monkeypatch):
    cfg, params, inputs = unet
    grids = []
    real = pisa_pkg.pisa_attention

    def spy(q, k, v, **kw):
        grids.append(kw["grid"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(pisa_pkg, "pisa_attention", spy)
    model = UNet2DConditionModel(cfg, routing=AttentionRouting(pisa=PISA), remat=True)
    jax.eval_shape(lambda p: model.apply({"params": p}, *inputs, attention_context=_context(1)), params)
    assert grids == [(5, 7)]
