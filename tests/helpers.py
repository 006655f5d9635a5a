"""Small helpers shared by several test modules."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give every parameter (heads and norms included) random values, so parity tests compare real numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_scale = ("norm" in name or ".gn" in name) and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return model


def images(n: int = 2, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
