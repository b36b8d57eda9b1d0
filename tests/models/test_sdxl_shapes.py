"""The full SDXL U-Net and VAE from abstract shapes only: the same tensors as diffusers' models."""

import diffusers
import jax
import numpy as np
import torch

from bokehdiff_jax.convert.mapping import torch_shape
from bokehdiff_jax.models.configs import UNetConfig, VAEConfig
from bokehdiff_jax.models.unet import UNet2DConditionModel
from bokehdiff_jax.models.vae import AutoencoderKL


def _as_diffusers(abstract) -> dict[str, tuple[int, ...]]:
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key, shape = torch_shape(tuple(k.key for k in path), tuple(x.shape))
        out[key] = shape
    return out


def test_sdxl_unet():
    cfg = UNetConfig.sdxl()
    m = UNet2DConditionModel(cfg)
    abstract = jax.eval_shape(m.init, jax.random.key(0), *m.init_inputs(size=(16, 16), seq=4))["params"]
    ours = _as_diffusers(abstract)
    assert sum(int(np.prod(s)) for s in ours.values()) == 2_567_463_684
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ours) == 1680


def test_sdxl_vae():
    cfg = VAEConfig.sdxl()
    m = AutoencoderKL(cfg)
    abstract = jax.eval_shape(m.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
    ours = _as_diffusers(abstract)
    assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**cfg.to_diffusers())
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ours) == 248


def test_sdxl_unet_bf16_1024px_compiles_from_abstract_shapes():
    """AOT: the full U-Net at 1024 x 1024 in bf16 lowers and compiles with no weights in memory."""
    cfg = UNetConfig.sdxl()
    m = UNet2DConditionModel(cfg, dtype=jax.numpy.bfloat16, param_dtype=jax.numpy.bfloat16)
    bf16 = jax.numpy.bfloat16
    inputs = (
        jax.ShapeDtypeStruct((1, 128, 128, 4), bf16),
        jax.ShapeDtypeStruct((1,), np.float32),
        jax.ShapeDtypeStruct((1, 77, cfg.cross_attention_dim), bf16),
        jax.ShapeDtypeStruct((1, cfg.text_embeds_dim), bf16),
        jax.ShapeDtypeStruct((1, 6), np.float32),
    )
    params = jax.eval_shape(m.init, jax.random.key(0), *inputs)["params"]
    compiled = jax.jit(lambda p, *a: m.apply({"params": p}, *a)).lower(params, *inputs).compile()
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes >= 2 * 2_567_463_684  # bf16 weights are arguments
    assert mem.output_size_in_bytes == 128 * 128 * 4 * 2
    print(f"SDXL bf16 1024px: temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB")
