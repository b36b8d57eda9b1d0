"""``bokehdiff_jax.sharding``: meshes from configs, parameter rules, and the whole tiny U-Net with PISA
under a ``(data, fsdp)`` mesh (8 fake CPU devices, tests/conftest.py) equal to the unsharded run."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tiny_configs
from jax.sharding import PartitionSpec as P

from bokehdiff_jax import sharding
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting, PisaInputs, attend, pisa_split
from bokehdiff_jax.models.configs import UNetConfig
from bokehdiff_jax.models.unet import UNet2DConditionModel
from bokehdiff_jax.pisa import PisaConfig

SIZE = (10, 14)  # latent; PISA's layer (down_blocks.1) sees 5 x 7 tokens
PISA = PisaConfig(impl="blockwise", block_q=16, block_k=16, supersample=2, segments=3)
PISA_PATH = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


def test_make_mesh_from_configs():
    assert len(jax.devices()) == 8, "run through tests/conftest.py (8 fake CPU devices)"
    assert dict(sharding.make_mesh({"data": -1, "fsdp": 1}).shape) == {"data": 8, "fsdp": 1}
    assert dict(sharding.make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh({"fsdp": 8}).shape) == {"data": 1, "fsdp": 8}  # a missing axis is 1
    one = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1}
    bad = [
        ({"data": -1, "model": 2}, "model"),
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"data": 3, "fsdp": 2}, "expected 8"),
        ({"data": -1, "fsdp": 3}, "do not divide"),
        ({"data": 2.0}, "positive int"),
        ({"data": 0}, "positive int"),
        ([("data", 8)], "mapping"),
    ]
    for shape, match in bad:
        with pytest.raises(InputError, match=match):
            sharding.make_mesh(shape)


def test_param_rules():
    fsdp = sharding.FSDP
    assert sharding.param_spec((3, 3, 320, 640), "fsdp", 4) == P(None, None, None, fsdp)
    assert sharding.param_spec((1280, 640), "fsdp", 4) == P(fsdp)  # the largest divisible axis
    assert sharding.param_spec((1280, 1281), "fsdp", 4) == P(fsdp)  # 1281 does not divide
    assert sharding.param_spec((1281, 1283), "fsdp", 4) == P()  # nothing divides: replicated
    assert sharding.param_spec((640,), "fsdp", 4) == P()  # small: replicated
    assert sharding.param_spec((1280, 640), "fsdp", 1) == P()  # no FSDP axis to split over
    assert sharding.param_spec((1280, 640), "replicate", 4) == P()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    tree = {
        "to_q": {"kernel": jnp.zeros((256, 128)), "bias": jnp.zeros(128)},
        "lora": {"A": jnp.zeros((256, 8))},
    }
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(tree, mesh, min_size=1024))
    assert specs == {"to_q": {"kernel": P(fsdp), "bias": P()}, "lora": {"A": P()}}
    with pytest.raises(InputError, match="no sharding rule"):
        sharding.param_shardings(tree, mesh, rules=[("to_q/.*", "fsdp")])
    assert sharding.batch_sharding(mesh, 4).spec == P((sharding.DATA, fsdp), None, None, None)


def test_pisa_split_prefers_the_batch_then_the_tokens():
    axes = {"data": 2, "fsdp": 4}
    assert pisa_split(8, 35, axes) == (("data", "fsdp"), None)
    assert pisa_split(2, 36, axes) == (("data",), ("fsdp",))
    assert pisa_split(1, 40, axes) == (None, ("data", "fsdp"))
    assert pisa_split(1, 35, axes) is None  # nothing divides: unsharded PISA
    assert pisa_split(3, 35, {}) is None  # no mesh


def _context(batch, seed=1):
    rng = np.random.default_rng(seed)
    disparity = np.kron(rng.uniform(0, 1, (batch, 5, 7)), np.ones((16, 16))).astype(np.float32)
    focus = rng.uniform(0.2, 0.8, batch).astype(np.float32)
    return PisaInputs(jnp.asarray(disparity), jnp.asarray(focus), jnp.full((batch,), 20.0, jnp.float32))


def test_attend_splits_the_tokens_when_the_batch_does_not_divide():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 35, 2, 4)), jnp.float32) for _ in range(3))
    routing = AttentionRouting(pisa=PISA)
    ctx = _context(1)
    fn = jax.jit(
        lambda q, k, v, ctx: attend(q, k, v, path=PISA_PATH, grid=(5, 7), routing=routing, context=ctx)
    )
    ref = fn(q, k, v, ctx)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1}, jax.devices()[:5])  # 35 tokens over 5 devices
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, ctx))
        out = fn(q, k, v, ctx)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_unet_with_pisa_under_a_data_fsdp_mesh_equals_unsharded():
    # The tiny SDXL U-Net cut to two levels of one layer (CPU compile time grows with depth); PISA's
    # layer, down_blocks.1.attentions.0, is still there.
    d = {
        **tiny_configs.UNETS["sdxl"],
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [1, 2],
        "layers_per_block": 1,
        "transformer_layers_per_block": 1,
    }
    cfg = UNetConfig.from_diffusers(d)
    model = UNet2DConditionModel(cfg, routing=AttentionRouting(pisa=PISA))
    batch = 8
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs(batch=1, size=SIZE))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)
    inputs = (
        jnp.asarray(rng.standard_normal((batch, *SIZE, cfg.in_channels)), jnp.float32),
        jnp.full((batch,), 499.0, jnp.float32),
        jnp.asarray(rng.standard_normal((batch, 7, cfg.cross_attention_dim)), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, cfg.text_embeds_dim)), jnp.float32),
        jnp.tile(jnp.asarray([[80.0, 112.0, 0.0, 0.0, 80.0, 112.0]]), (batch, 1)),
    )
    ctx = _context(batch)
    fn = jax.jit(lambda p, inputs, ctx: model.apply({"params": p}, *inputs, attention_context=ctx))
    traced = fn.trace(params, inputs, ctx)
    assert "shard_map" not in str(traced.jaxpr)
    ref = traced.lower().compile()(params, inputs, ctx)

    mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
    p_shard = sharding.param_shardings(params, mesh, min_size=1024)
    assert any(s.spec != P() for s in jax.tree.leaves(p_shard))  # some weights really are FSDP-split
    params_s = jax.device_put(params, p_shard)
    inputs_s = jax.device_put(inputs, jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), inputs))
    ctx_s = jax.device_put(ctx, jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), ctx))
    with jax.set_mesh(mesh):
        traced = fn.trace(params_s, inputs_s, ctx_s)
        out = traced.lower().compile()(params_s, inputs_s, ctx_s)
    assert str(traced.jaxpr).count("shard_map") == 1  # the one routed layer ran the sharded PISA
    assert out.sharding.spec[0] is not None  # the output stays batch-split
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
