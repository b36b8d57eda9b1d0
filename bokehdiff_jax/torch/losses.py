"""Pixel losses in PyTorch (NCHW, images in [-1, 1]): the reference for ``losses.pixel`` and the PyTorch
half of the train-step benchmark. Written the way the released training script computes them:
``F.interpolate(..., scale_factor=1/l, mode="area")`` for the scales, one-pixel differences."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((pred - target) ** 2)


def edge_loss(
    pred: torch.Tensor, target: torch.Tensor, aif: torch.Tensor, *, variant: str = "paper", scales: int = 3
) -> torch.Tensor:
    """Eq. 10 at scales ``l = 1 .. scales``; ``"paper"``: weight ``max(|grad I_b|, |grad I_f|) / l^2``;
    ``"released"``: ``(1 + max(...)) / l``. See ``bokehdiff_jax.losses.pixel.edge_loss``."""
    if variant not in ("paper", "released"):
        raise ValueError(f"edge loss variant {variant!r}: expected 'paper' or 'released'")
    total = pred.new_zeros(())
    for level in range(1, scales + 1):
        if level == 1:
            p, t, f = pred, target, aif
        else:
            p, t, f = (F.interpolate(a, scale_factor=1 / level, mode="area") for a in (pred, target, aif))
        for dim in (3, 2):  # along width, then height
            n = p.shape[dim]
            dp = p.narrow(dim, 0, n - 1) - p.narrow(dim, 1, n - 1)
            dt = t.narrow(dim, 0, n - 1) - t.narrow(dim, 1, n - 1)
            df = f.narrow(dim, 0, n - 1) - f.narrow(dim, 1, n - 1)
            w = torch.maximum(dt.abs(), df.abs())
            if variant == "paper":
                total = total + torch.mean((dp - dt).abs() * w) / level**2
            else:
                total = total + torch.mean((dp - dt).abs() * (1 / level * (1 + w)))
    return total
