"""BiT: the paper's ResNet baselines (Kolesnikov et al., "Big Transfer", ECCV 2020; google-research/big_transfer).

A pre-activation ResNet-v2 with GroupNorm(32) and weight-standardised, bias-free convolutions. Root: 7x7/2 conv,
zero pad 1, 3x3/2 max-pool (big_transfer's fixed padding). Each bottleneck is ``x + conv3(act(conv2(act(conv1(a)))))``
with ``a = relu(gn1(x))`` and ``act = relu ∘ gn``; the first unit of a stage projects ``a`` with a strided 1x1 conv
(stride on the 3x3 conv; stage 1 stride 1, others 2). The head: GroupNorm, ReLU, global average pool, a linear layer
(zero-initialised, as BiT's ``zero_head``). Module names are timm's ``ResNetV2`` names, except the head, a
``nn.Linear`` called ``head`` (timm: a 1x1 conv ``head.fc``), so the model offers the ViT contract:
``forward_pre_logits`` (B, D) pooled pre-head features, ``forward_head``, ``reset_classifier``,
``set_image_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit.configs import BiTConfig, as_hw, model_config
from vit.model import VisionTransformer

WS_EPS = 1e-8  # timm's BiT weight-standardisation epsilon (big_transfer: 1e-10); both are exact in float32


class StdConv2d(nn.Conv2d):
    """Bias-free conv whose kernel is standardised per output channel: ``(w - mean) / sqrt(var + eps)``.

    The standardisation is one ``F.batch_norm`` over the kernel viewed as (1, out, in·kh·kw): a single fused
    kernel, about twice as fast on CPU as ``var_mean`` and the arithmetic around it.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1):
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=WS_EPS).reshape_as(self.weight)
        return F.conv2d(x, w, None, self.stride, self.padding)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class Stem(nn.Module):
    def __init__(self, in_chans: int, width: int):
        super().__init__()
        self.conv = StdConv2d(in_chans, width, 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1)), kernel_size=3, stride=2)


class Downsample(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PreActBottleneck(nn.Module):
    def __init__(self, in_chans: int, width: int, stride: int):
        super().__init__()
        out_chans = 4 * width
        project = in_chans != out_chans or stride != 1
        self.downsample = Downsample(in_chans, out_chans, stride) if project else None
        self.norm1, self.conv1 = _gn(in_chans), StdConv2d(in_chans, width, 1)
        self.norm2, self.conv2 = _gn(width), StdConv2d(width, width, 3, stride)
        self.norm3, self.conv3 = _gn(width), StdConv2d(width, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(a)
        y = self.conv1(a)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return shortcut + y


class Stage(nn.Module):
    def __init__(self, in_chans: int, width: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *(PreActBottleneck(in_chans if i == 0 else 4 * width, width, stride if i == 0 else 1) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    def __init__(self, cfg: BiTConfig):
        super().__init__()
        self.cfg = cfg
        root = cfg.base_width * cfg.width_factor
        self.stem = Stem(cfg.in_chans, root)
        stages, chans = [], root
        for i, depth in enumerate(cfg.layers):
            width = root * 2**i
            stages.append(Stage(chans, width, depth, 1 if i == 0 else 2))
            chans = 4 * width
        self.stages = nn.Sequential(*stages)
        self.norm = _gn(chans)
        self.head = VisionTransformer._new_head(cfg.num_classes, chans, cfg.head_bias_init)
        for m in self.modules():
            if isinstance(m, StdConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int, head_bias_init: float = 0.0) -> None:
        """A new zero-initialised head (BiT's ``zero_head`` for transfer)."""
        device = self.norm.weight.device
        self.head = VisionTransformer._new_head(num_classes, self.cfg.num_features, head_bias_init).to(
            device, self.norm.weight.dtype
        )
        self.cfg = replace(self.cfg, num_classes=num_classes, head_bias_init=head_bias_init)

    def set_image_size(self, image_size: int | Sequence[int]) -> None:
        """Only records the size: a fully convolutional net with global pooling takes any resolution."""
        self.cfg = replace(self.cfg, image_size=as_hw(image_size))

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled pre-head features (B, num_features): what few-shot evaluation uses."""
        x = self.stages(self.stem(x))
        return F.relu(self.norm(x)).mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_pre_logits(x))


# Options of vit.create_model that only a ViT has, and the values at which a ResNet can ignore them.
_VIT_ONLY = {"gelu_approximate": None, "pooling": None, "representation_size": (None,), "dropout": (None, 0.0)}


def bit_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without the ViT-only ones a ResNet can ignore (GELU flavour, token pooling, dropout 0);
    a pre-logits layer or dropout, which BiT has not, is refused rather than silently dropped."""
    kept = {}
    for key, value in options.items():
        if key not in _VIT_ONLY:
            kept[key] = value
        elif _VIT_ONLY[key] is not None and value not in _VIT_ONLY[key]:
            raise ValueError(f"BiT models have no {key} (got {value!r})")
    return kept


def create_bit(name: str, num_classes: int = 1000, image_size: int | Sequence[int] = 224, **options: Any) -> ResNetV2:
    """A registered BiT variant (``vit.create_model`` dispatches here)."""
    cfg = model_config(name, num_classes=num_classes, image_size=image_size, **bit_options(options))
    return ResNetV2(cfg)


def bit_flops_per_image(cfg: BiTConfig, training: bool = True) -> float:
    """Model FLOPs per image (2 per multiply-add) of the convolutions and head; training counts 3x forward."""
    h, w = ((s + 1) // 2 for s in cfg.image_size)
    root = cfg.base_width * cfg.width_factor
    macs = h * w * cfg.in_chans * root * 49
    h, w = (h + 1) // 2, (w + 1) // 2
    chans = root
    for i, depth in enumerate(cfg.layers):
        width = root * 2**i
        for u in range(depth):
            stride = 2 if u == 0 and i > 0 else 1
            macs += h * w * chans * width
            if u == 0:
                h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
                macs += h * w * chans * 4 * width
            macs += h * w * width * (9 * width + 4 * width)
            chans = 4 * width
    macs += chans * max(cfg.num_classes, 0)
    fwd = 2.0 * macs
    return 3.0 * fwd if training else fwd
