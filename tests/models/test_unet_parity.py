"""Flax U-Net vs diffusers' PyTorch UNet2DConditionModel on the shared tiny configs, every weight mapped."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from parity_utils import assert_close, flax_params, nchw, nhwc, perturbed

from bokehdiff_jax.convert.lora import flax_lora_to_peft, peft_to_flax_lora
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models import unet_blocks
from bokehdiff_jax.models.configs import UNetConfig
from bokehdiff_jax.models.options import SPEC_LORA_TARGETS, LoRAConfig
from bokehdiff_jax.models.unet import UNet2DConditionModel

SIZE = (10, 14)  # not multiples of the downsampling factor: exercises upsampling to the skip's size


def _inputs(cfg: UNetConfig, batch: int = 2, size=SIZE, seed: int = 0):
    rng = np.random.default_rng(seed)
    args = [
        rng.standard_normal((batch, *size, cfg.in_channels)).astype(np.float32),
        np.array([499.0, 17.0][:batch], np.float32),
        rng.standard_normal((batch, 7, cfg.cross_attention_dim)).astype(np.float32),
    ]
    if cfg.addition_embed_type == "text_time":
        args.append(rng.standard_normal((batch, cfg.text_embeds_dim)).astype(np.float32))
        args.append(np.tile(np.array([[1024, 768, 0, 0, 1024, 768]], np.float32), (batch, 1)))
    return tuple(args)


def _torch_forward(model, inputs):
    x, t, ctx, *extra = inputs
    kw = {}
    if extra:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(extra[0]),
            "time_ids": torch.from_numpy(extra[1]),
        }
    with torch.no_grad():
        return nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample)


def _setup(name: str, seed: int = 0):
    cfg = UNetConfig.from_diffusers(tiny_configs.UNETS[name])
    torch.manual_seed(seed)
    model = perturbed(diffusers.UNet2DConditionModel(**tiny_configs.UNETS[name]), seed)
    module = UNet2DConditionModel(cfg)
    return cfg, model, module, flax_params(module, model, *_inputs(cfg, batch=1))


@pytest.fixture(scope="module")
def sdxl():
    return _setup("sdxl")


@pytest.mark.parametrize("name", ["sd15", "odd"])
def test_parity(name):
    cfg, model, module, params = _setup(name, seed=1)
    inputs = _inputs(cfg)
    assert_close(module.apply({"params": params}, *inputs), _torch_forward(model, inputs))


def test_parity_sdxl_shaped(sdxl):
    cfg, model, module, params = sdxl
    inputs = _inputs(cfg)
    out = module.apply({"params": params}, *inputs)
    assert out.shape == (2, *SIZE, cfg.out_channels)
    assert_close(out, _torch_forward(model, inputs))


def test_lora_matches_peft(sdxl):
    import peft

    cfg, _, _, params = sdxl
    torch.manual_seed(0)  # the fixture's model again, then LoRA on top
    model = perturbed(diffusers.UNet2DConditionModel(**tiny_configs.UNETS["sdxl"]), 0)
    model.add_adapter(
        peft.LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(SPEC_LORA_TARGETS)
        )
    )
    with torch.no_grad():  # peft's B starts at zero; make it count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    module = UNet2DConditionModel(cfg, lora=LoRAConfig(rank=4, alpha=8))
    inputs = _inputs(cfg)
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)["lora"]
    peft_sd = {k: v.numpy() for k, v in peft.utils.get_peft_model_state_dict(model).items()}
    lora = peft_to_flax_lora(peft_sd, abstract, prefix="")
    # The live model's state_dict spells the adapter name; the same tree comes out of it.
    live = {k: v.numpy() for k, v in model.state_dict().items() if ".lora_" in k}
    assert all(".default." in k for k in live)
    jax.tree.map(np.testing.assert_array_equal, peft_to_flax_lora(live, abstract), lora)
    # And back: exactly peft's tensors, key for key (what a diffusers pipeline would load).
    back = flax_lora_to_peft(lora, prefix="")
    assert back.keys() == peft_sd.keys()
    for k, v in peft_sd.items():
        np.testing.assert_array_equal(back[k], v)
    got = module.apply({"params": params, "lora": lora}, *inputs)
    assert_close(got, _torch_forward(model, inputs))
    base = module.apply({"params": params}, *inputs)  # no "lora" collection: the base model
    assert float(jnp.abs(got - base).max()) > 1e-2


def test_fresh_lora_changes_nothing(sdxl):
    cfg, _, _, params = sdxl
    module = UNet2DConditionModel(cfg, lora=LoRAConfig())
    inputs = _inputs(cfg, batch=1)
    lora = module.init(jax.random.key(1), *inputs)["lora"]
    paths = {"/".join(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]}
    assert "down_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj" in paths
    assert not any(p.startswith(("conv_in", "conv_out", "time_embedding", "add_embedding")) for p in paths)
    base = UNet2DConditionModel(cfg).apply({"params": params}, *inputs)
    np.testing.assert_array_equal(module.apply({"params": params, "lora": lora}, *inputs), base)


def test_every_attention_calls_attend_with_its_diffusers_path(sdxl, monkeypatch):
    cfg, model, module, params = sdxl
    seen = {}
    real = unet_blocks.attend

    def spy(q, k, v, *, path, grid, routing, context=None):
        seen[path] = (grid, q.shape[1], k.shape[1], context)
        return real(q, k, v, path=path, grid=grid, routing=routing, context=context)

    monkeypatch.setattr(unet_blocks, "attend", spy)
    module.apply({"params": params}, *_inputs(cfg), attention_context=None)
    assert set(seen) == {n for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    for path, (grid, nq, nk, context) in seen.items():
        assert grid[0] * grid[1] == nq and context is None
        assert nk == (nq if path.endswith("attn1") else 7)
    assert seen["down_blocks.1.attentions.0.transformer_blocks.0.attn1"][0] == (5, 7)  # 10x14 halved
    assert seen["up_blocks.0.attentions.0.transformer_blocks.0.attn1"][0] == (3, 4)


def test_bf16_compute_and_params_stay_close(sdxl):
    cfg, _, module, params = sdxl
    inputs = _inputs(cfg)
    ref = np.asarray(module.apply({"params": params}, *inputs))
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert (
        jax.eval_shape(bf16.init, jax.random.key(0), *inputs)["params"]["conv_in"]["kernel"].dtype
        == jnp.bfloat16
    )
    out = bf16.apply({"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)}, *inputs)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, rel=0.05)


def test_remat_changes_memory_not_values():
    # A shallow net: CPU compile time of the backward pass grows with depth.
    d = {**tiny_configs.UNETS["sdxl"], "layers_per_block": 1, "transformer_layers_per_block": 1}
    cfg = UNetConfig.from_diffusers(d)
    inputs = _inputs(cfg, batch=1, size=(8, 8))
    params = UNet2DConditionModel(cfg).init(jax.random.key(0), *inputs)["params"]

    def grads(remat):
        m = UNet2DConditionModel(cfg, remat=remat)
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, *inputs) ** 2)))(params)

    for a, b in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_missing_text_time_inputs_is_a_clear_error(sdxl):
    cfg, _, module, params = sdxl
    x, t, ctx, *_ = _inputs(cfg)
    with pytest.raises(InputError, match="text_embeds"):
        module.apply({"params": params}, x, t, ctx)


def test_num_attention_heads_key_means_heads():
    d = {**tiny_configs.UNETS["sdxl"], "num_attention_heads": [2, 4, 8]}
    assert UNetConfig.from_diffusers(d).num_attention_heads == (2, 4, 8)
    assert UNetConfig.from_diffusers(tiny_configs.UNETS["sdxl"]).num_attention_heads == (1, 2, 4)
