"""The ResNet stem of the hybrid models (R50+ViT-B/16, R50+ViT-L/32), as vit_jax/models_resnet.py.

BiT-style ResNet: GroupNorm(32) and weight-standardised, bias-free convolutions with TF "SAME" padding, but
post-activation bottlenecks (not BiT's pre-activation v2) whose last GroupNorm scale starts at zero
(paper-facts §3). With ``layers=(3, 4, 9)`` the stem downsamples 16x to 1024 channels; with ``(3, 4, 6, 3)``
32x to 2048 channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vit.init import lecun_normal_

if TYPE_CHECKING:
    from vit.configs import ViTConfig


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/Flax SAME padding for one dimension: (before, after), the extra pixel going after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_padding(x.shape[-2], kernel, stride)
    left, right = _same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Bias-free conv with weight standardisation ``(w - mean) / (std + 1e-5)`` per output channel, SAME padded."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1):
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, bias=False)
        lecun_normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def group_norm(channels: int, zero_scale: bool = False) -> nn.GroupNorm:
    gn = nn.GroupNorm(32, channels, eps=1e-6)
    if zero_scale:
        nn.init.zeros_(gn.weight)
    return gn


class Bottleneck(nn.Module):
    """Post-activation bottleneck: relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x))))))))."""

    def __init__(self, in_chans: int, width: int, stride: int):
        super().__init__()
        out_chans = 4 * width
        self.conv1 = StdConv2d(in_chans, width, 1)
        self.gn1 = group_norm(width)
        self.conv2 = StdConv2d(width, width, 3, stride)
        self.gn2 = group_norm(width)
        self.conv3 = StdConv2d(width, out_chans, 1)
        self.gn3 = group_norm(out_chans, zero_scale=True)
        self.conv_proj: nn.Module | None = None
        self.gn_proj: nn.Module | None = None
        if in_chans != out_chans or stride != 1:
            self.conv_proj = StdConv2d(in_chans, out_chans, 1, stride)
            self.gn_proj = group_norm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(shortcut + y)


class ResNetStem(nn.Module):
    """Root (7x7/2 conv, GN, ReLU, 3x3/2 SAME max-pool) then bottleneck stages; first stage stride 1, others 2."""

    def __init__(self, layers: Sequence[int], width_factor: int = 1, in_chans: int = 3):
        super().__init__()
        root = 64 * width_factor
        self.conv_root = StdConv2d(in_chans, root, 7, 2)
        self.gn_root = group_norm(root)
        stages = []
        chans = root
        for i, depth in enumerate(layers):
            width = 64 * 2**i * width_factor
            units = [
                Bottleneck(chans if u == 0 else 4 * width, width, (1 if i == 0 else 2) if u == 0 else 1)
                for u in range(depth)
            ]
            chans = 4 * width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.out_channels = chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)
        return self.stages(x)


def resnet_macs(cfg: ViTConfig) -> int:
    """Multiply-adds of the ResNet stem at the config's image size (convolutions only)."""
    h, w = cfg.image_size
    h, w = math.ceil(h / 2), math.ceil(w / 2)
    root = 64 * cfg.resnet_width
    macs = h * w * root * cfg.in_chans * 49
    h, w = math.ceil(h / 2), math.ceil(w / 2)
    chans = root
    for i, depth in enumerate(cfg.resnet_layers):
        width = 64 * 2**i * cfg.resnet_width
        for u in range(depth):
            stride = 2 if (u == 0 and i > 0) else 1
            macs += h * w * chans * width  # conv1 at input resolution
            if stride == 2:
                h, w = math.ceil(h / 2), math.ceil(w / 2)
            macs += h * w * width * width * 9 + h * w * width * 4 * width
            if u == 0 and (chans != 4 * width or stride != 1):
                macs += h * w * chans * 4 * width
            chans = 4 * width
    return macs
