"""``bench train-step``: our step and the PyTorch reference step start from the same model and compute
the same loss at step 0 (a micro SDXL-shaped config; the benchmark itself is not a test)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bokehdiff_jax.bench import train_step as ts

# SDXL's U-Net layout (text_time, linear projections, a cross-attention level) at the smallest width.
MICRO_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [1, 2],
    "cross_attention_dim": 16,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
    "sample_size": 16,
}
MICRO_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
}


@pytest.fixture(scope="module")
def sides():
    batch = ts.make_batch(32, 2, seed=0)
    config = ts.bench_config(MICRO_UNET, MICRO_VAE, size=32, batch=2, pisa=False)
    # B off zero, so the LoRA mapping (ours -> peft) shows in the forward pass.
    ours = ts.build_jax(config, batch, lora_b_std=0.05, compile=False)
    return ours, ts.build_torch(ours), ts.torch_batch(batch)


def test_step0_losses_agree(sides):
    ours, ref, tbatch = sides
    want = ours.loss_terms()
    got = ref.step(tbatch)  # the PyTorch step reports the loss of the weights before its update
    assert set(want) == {"loss", "mse", "edge", "lpips"} == set(got)
    for k in want:
        assert abs(want[k] - got[k]) <= ts.LOSS_TOL, (k, want[k], got[k])
    assert 0.05 < got["loss"] < 50
    # The LoRA is live on both sides: zero B changes the loss by far more than the tolerance.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0 if getattr(p[-1], "key", None) == "B" else x, ours.state.params
    )
    assert abs(ours.loss_terms(zero_b)["loss"] - want["loss"]) > 20 * ts.LOSS_TOL


def test_same_trained_tensors(sides):
    ours, ref, _ = sides
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(ours.state.params))
    n_torch = sum(p.numel() for ps in ref.groups.values() for p in ps)
    n_grad = sum(p.numel() for m in (ref.unet, ref.vae) for p in m.parameters() if p.requires_grad)
    assert n_ours == n_torch == n_grad > 0
    assert {g: len(ps) for g, ps in ref.groups.items()}["vae"] > 0
