"""Shared by the model tests: random diffusers reference models and layout helpers."""

from __future__ import annotations

import jax
import numpy as np
import torch

from bokehdiff_jax.convert.mapping import diffusers_to_flax


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every weight off its init, so norms' scale/bias and zero-initialised layers all count."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def flax_params(module, model: torch.nn.Module, *init_args):
    """The diffusers model's weights as ``module``'s params, through the converter's strict table."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *init_args)["params"]
    return diffusers_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, abstract)


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def assert_close(got, want: np.ndarray, rel: float = 1e-4) -> None:
    """max |got - want| <= rel * max |want| (the issue's parity criterion)."""
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"
