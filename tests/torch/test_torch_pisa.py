"""The PyTorch PISA (bokehdiff_jax.torch.pisa) against the JAX pisa_attention, and its diffusers processor:
placement by module path, the true (h, w) grid from the enclosing Transformer2DModel, strict errors."""

import math

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.pisa import INFERENCE_HARDNESS, PisaConfig, pisa_attention
from bokehdiff_jax.torch import pisa as tpisa


def _inputs(seed, batch=2, grid=(5, 7), heads=2, head_dim=8, image=(20, 29)):
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    q, k, v = (rng.normal(size=(batch, n, heads, head_dim)).astype(np.float32) for _ in range(3))
    # Planes at random disparities (occlusion happens) plus a little texture; one near plane at exactly 1.
    coarse = rng.uniform(0.0, 1.0, (batch, 4, 4))
    coarse[0, 0, 0] = 1.0
    disp = np.kron(coarse, np.ones((1, image[0] // 4 + 1, image[1] // 4 + 1)))[:, : image[0], : image[1]]
    disp = np.clip(disp + 0.03 * rng.uniform(size=disp.shape), 0.0, 1.0).astype(np.float32)
    focus = rng.uniform(0.2, 0.8, batch).astype(np.float32)
    strength = (rng.uniform(0.3, 0.6, batch) * max(image)).astype(np.float32)
    return q, k, v, disp, focus, strength


CONFIGS = {
    "full": PisaConfig(),
    "no_occlusion": PisaConfig(occlusion=False),
    "softmax_rows": PisaConfig(softmax_q=False),
    "coc_only_rows": PisaConfig(softmax_q=False, occlusion=False),
    "softmaxq_only": PisaConfig(coc=False, occlusion=False),
    "hard_edge": PisaConfig(hardness=math.inf),
    "released": PisaConfig(
        units="released", t_from_query=True, released_upsample=2.0, segments=5, supersample=4
    ),
    "vanilla": PisaConfig(softmax_q=False, coc=False, occlusion=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_jax_pisa(name):
    cfg = CONFIGS[name]
    grid, image = (5, 7), (20, 29)  # non-square grid, image sides not multiples of the grid
    q, k, v, disp, f, s = _inputs(1, grid=grid, image=image)
    kw = dict(grid=grid, config=cfg)
    got = tpisa.pisa_attention(
        *(torch.from_numpy(x) for x in (q, k, v)),
        disparity=torch.from_numpy(disp),
        focus=torch.from_numpy(f),
        strength=torch.from_numpy(s),
        sample_budget=4000,  # several query chunks: the two-pass column statistics are exercised
        **kw,
    ).numpy()
    # dense is the reference; blockwise (the default) is checked against it in tests/pisa: once here.
    for impl in ("dense", "blockwise") if name == "full" else ("dense",):
        cfg_i = PisaConfig(**{**cfg.__dict__, "impl": impl, "block_q": 16, "block_k": 16})
        want = np.asarray(
            pisa_attention(
                *(jnp.asarray(x) for x in (q, k, v)),
                disparity=disp,
                focus=f,
                strength=s,
                grid=grid,
                config=cfg_i,
            )
        )
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-5, (impl, err)


def test_deterministic_and_chunking_invariant():
    q, k, v, disp, f, s = (torch.from_numpy(x) for x in _inputs(2))
    kw = dict(grid=(5, 7), disparity=disp, focus=f, strength=s)
    a = tpisa.pisa_attention(q, k, v, **kw)
    b = tpisa.pisa_attention(q, k, v, **kw)
    c = tpisa.pisa_attention(q, k, v, sample_budget=1, **kw)  # one query per chunk
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(a).all()
    with pytest.raises(InputError, match="grid"):
        tpisa.pisa_attention(q, k, v, **{**kw, "grid": (7, 5 + 1)})


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**tiny_configs.UNETS["sdxl"]).eval()


def _run(unet, latent_hw=(8, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_configs.UNETS["sdxl"]
    x = torch.randn(2, 4, *latent_hw, generator=g)
    ctx = torch.randn(2, 5, cfg["cross_attention_dim"], generator=g)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([499.0, 499.0]), ctx, added_cond_kwargs=added).sample


def test_processor_placement_grid_and_output():
    unet = _unet()
    ctx = tpisa.install_pisa(unet)
    placed = sorted(
        n
        for n, m in unet.named_modules()
        if isinstance(getattr(m, "processor", None), tpisa.PisaAttnProcessor)
    )
    assert placed == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    with pytest.raises(InputError, match="no grid or no PISA inputs"):
        _run(unet)

    # The processor's output is PISA on the layer's own q, k, v with the true non-square grid (4 x 6).
    attn = unet.get_submodule(placed[0])
    seen = {}
    hook = lambda m, a, kw, out: seen.update(x=a[0] if a else kw["hidden_states"], out=out)  # noqa: E731
    attn.register_forward_hook(hook, with_kwargs=True)
    image = (32, 48)
    rng = np.random.default_rng(3)
    ctx.disparity = torch.from_numpy(rng.uniform(0, 1, (2, *image)).astype(np.float32))
    ctx.focus, ctx.strength = torch.tensor([0.3, 0.6]), torch.tensor([10.0, 20.0])
    _run(unet, latent_hw=(8, 12))
    proc = attn.processor
    assert proc.grid == (4, 6)
    x = seen["x"]
    b, n, _ = x.shape
    heads = attn.heads
    q, k, v = (lin(x).view(b, n, heads, -1) for lin in (attn.to_q, attn.to_k, attn.to_v))
    o = tpisa.pisa_attention(
        q, k, v, grid=(4, 6), disparity=ctx.disparity, focus=ctx.focus, strength=ctx.strength
    )
    want = attn.to_out[0](o.reshape(b, n, -1))
    torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)
    # PISA changed the U-Net's output (the layer is live).
    out_pisa = _run(unet)
    vanilla = _unet()
    assert (out_pisa - _run(vanilla)).abs().max() > 1e-4


def test_placement_errors():
    with pytest.raises(InputError, match="match no attention layer"):
        tpisa.install_pisa(_unet(), AttentionRouting(pisa_paths=("up_blocks.9.*",)))
    with pytest.raises(InputError, match="cross-attention"):
        tpisa.install_pisa(_unet(), AttentionRouting(pisa_paths=("down_blocks.1.attentions.0.*.attn2",)))


def test_inference_hardness_is_the_released_value():
    assert math.isclose(PisaConfig().hardness, math.log(1e7)) and INFERENCE_HARDNESS == PisaConfig().hardness
