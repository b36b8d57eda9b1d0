"""LPIPS-VGG (v0.1) in plain PyTorch: a reference for parity tests and the PyTorch train-step benchmark.

torchvision cannot be imported here (its operators do not register with the pinned CPU torch) and the
``lpips`` package imports torchvision, so VGG16 is written out as its 13 convolutions. Images are
NCHW in [-1, 1]; ``forward`` returns the distance per image, ``[B]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from bokehdiff_jax.losses.lpips_weights import LPIPS_TAPS, VGG16_BLOCKS, VGG16_CONVS, load_lpips_weights

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class LPIPSVGG(torch.nn.Module):
    """LPIPS-VGG with frozen weights.

    ``convs``: ``{"conv1_1.weight": [C_out, C_in, 3, 3], "conv1_1.bias": [C_out], ...}`` (torch layout);
    ``heads``: ``{"relu1_2": [C] or [1, C, 1, 1], ...}`` (the ``lpips`` package's ``lin{k}.model.1.weight``).
    """

    def __init__(self, convs: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor]):
        super().__init__()
        for name, _ in VGG16_CONVS:
            self.register_buffer(f"{name}_weight", torch.as_tensor(convs[f"{name}.weight"]).float().clone())
            self.register_buffer(f"{name}_bias", torch.as_tensor(convs[f"{name}.bias"]).float().clone())
        for tap in LPIPS_TAPS:
            self.register_buffer(
                f"head_{tap}", torch.as_tensor(heads[tap]).float().reshape(1, -1, 1, 1).clone()
            )
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))

    @classmethod
    def from_cache(
        cls, path: str | os.PathLike | None = None, heads: Mapping[str, torch.Tensor] | None = None
    ) -> LPIPSVGG:
        """From the verified weight cache (Flax layout, converted here: HWIO -> OIHW). ``heads`` replaces
        the cached linear heads (e.g. with the ``lpips`` package's own ``v0.1/vgg.pth``)."""
        flat = load_lpips_weights(path)
        convs: dict[str, torch.Tensor] = {}
        for name, _ in VGG16_CONVS:
            convs[f"{name}.weight"] = torch.from_numpy(
                np.transpose(flat[f"vgg/{name}/kernel"], (3, 2, 0, 1)).copy()
            )
            convs[f"{name}.bias"] = torch.from_numpy(flat[f"vgg/{name}/bias"].copy())
        if heads is None:
            heads = {tap: torch.from_numpy(flat[f"heads/{tap}"].copy()) for tap in LPIPS_TAPS}
        return cls(convs, heads)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five taps (ReLU outputs ending each VGG16 block) of an already scaled NCHW batch."""
        taps = []
        for b, block in enumerate(VGG16_BLOCKS):
            if b > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for i in range(len(block)):
                name = f"conv{b + 1}_{i + 1}"
                x = F.relu(
                    F.conv2d(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"), padding=1)
                )
            taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.features((x - self.shift) / self.scale)
        fy = self.features((y - self.shift) / self.scale)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for tap, a, b in zip(LPIPS_TAPS, fx, fy, strict=True):
            na = a / (torch.sqrt(torch.sum(a * a, dim=1, keepdim=True)) + EPS)
            nb = b / (torch.sqrt(torch.sum(b * b, dim=1, keepdim=True)) + EPS)
            d = torch.sum((na - nb) ** 2 * getattr(self, f"head_{tap}"), dim=1)  # [B, h, w]
            total = total + d.mean(dim=(1, 2))
        return total
