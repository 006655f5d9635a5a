"""The official initialisers that Flax has and ``torch.nn.init`` lacks (the official code keeps Flax's defaults),
shared by the ViT and its ResNet stem."""

from __future__ import annotations

import math

import torch
from torch import nn

_TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax ``lecun_normal``: truncated normal with variance 1/fan_in (fan_in over all but the output dim)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD_CORRECTION
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
