"""Image transforms of the paper's protocol (paper-facts §6), built from torchvision.transforms.v2 kernels.

All kinds work on uint8 until the last step and end in float32 CHW in [-1, 1] (``x / 127.5 - 1``, the official
``value_range(-1, 1)``):

* ``pretrain``: Inception crop (5-100% of the area, aspect 3/4-4/3) resized to the resolution, random flip.
* ``finetune``: big_vision's transfer default: shorter side to 7/6 of the resolution (448 for 384), random square
  crop at the resolution, random flip.
* ``eval``: direct resize of the whole image to the resolution, no crop (the official evaluation).
* ``vtab``: direct resize, for training and evaluation alike (BiT/ViT VTAB protocol: no task-specific
  augmentation; a flip would change the label of position and orientation tasks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

Kind = Literal["pretrain", "finetune", "eval", "vtab"]
KINDS: tuple[str, ...] = ("pretrain", "finetune", "eval", "vtab")
INCEPTION_AREA = (0.05, 1.0)
INCEPTION_RATIO = (3 / 4, 4 / 3)
FINETUNE_RESIZE = 7 / 6  # 448 / 384


@dataclass(frozen=True)
class Plan:
    """The random draws of one sample that fix its decoding: the scale it may be decoded at, and (pretrain) the
    crop box (top, left, h, w) in source pixels."""

    scale: float
    box: tuple[int, int, int, int] | None = None


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(h), int(w)


class ImageTransform:
    """One transform kind at one resolution; a module-level class so DataLoader workers can be spawned.

    Input: a decoded uint8 CHW tensor (1, 3 or 4 channels) or a PIL image. Output: float32 3HW in [-1, 1].
    Built on ``torchvision.transforms.v2.functional`` kernels (the transform classes cost more per call than the
    work itself on small images); randomness comes from torch's global generator, which the loader seeds per
    batch.
    """

    def __init__(self, kind: Kind, image_size: int | Sequence[int]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown transform kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind = kind
        self.size = _hw(image_size)

    def _finetune_side(self) -> int:
        return round(max(self.size) * FINETUNE_RESIZE)

    def _inception_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop covering 5-100% of the area at aspect 3/4-4/3 (as TF's
        ``sample_distorted_bounding_box``), falling back to the whole image."""
        area = height * width
        (low, high), (r0, r1) = INCEPTION_AREA, (math.log(INCEPTION_RATIO[0]), math.log(INCEPTION_RATIO[1]))
        for u_area, u_ratio, u_top, u_left in torch.rand(10, 4).tolist():  # one draw: cheap, and seedable
            target, ratio = area * (low + (high - low) * u_area), math.exp(r0 + (r1 - r0) * u_ratio)
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        return 0, 0, height, width

    def plan(self, width: int, height: int) -> Plan:
        """Draw this sample's random crop (pretrain) in source pixels, and the smallest scale the source may be
        decoded at without losing detail the transform keeps: the loader decodes a JPEG at 1/2, 1/4 or 1/8 in the
        DCT domain when the plan allows, which saves most of the work when the output is much smaller."""
        h, w = self.size
        if self.kind == "pretrain":
            box = self._inception_box(height, width)
            return Plan(min(1.0, max(h / box[2], w / box[3])), box)
        if self.kind == "finetune":
            return Plan(min(1.0, self._finetune_side() / min(width, height)))
        return Plan(min(1.0, max(h / height, w / width)))

    def apply(self, image: torch.Tensor, plan: Plan, width: int, height: int) -> torch.Tensor:
        """The transform of a ``width`` x ``height`` source under ``plan``; ``image`` may be that source decoded
        at a reduced size."""
        x = image
        if x.dtype != torch.uint8 or x.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor or a PIL image, got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] != 3:
            x = x[:3] if x.shape[0] == 4 else x[:1].expand(3, -1, -1)
        size = list(self.size)
        if plan.box is not None:
            sy, sx = x.shape[-2] / height, x.shape[-1] / width
            top, left, h, w = plan.box
            top, left = min(round(top * sy), x.shape[-2] - 1), min(round(left * sx), x.shape[-1] - 1)
            h, w = max(1, min(round(h * sy), x.shape[-2] - top)), max(1, min(round(w * sx), x.shape[-1] - left))
            x = F.resized_crop(x, top, left, h, w, size, antialias=True)
        elif self.kind == "finetune":
            x = F.resize(x, [self._finetune_side()], antialias=True)  # shorter side
            u_top, u_left = torch.rand(2).tolist()
            x = F.crop(x, int(u_top * (x.shape[-2] - size[0] + 1)), int(u_left * (x.shape[-1] - size[1] + 1)), *size)
        else:
            x = F.resize(x, size, antialias=True)
        if self.kind in ("pretrain", "finetune") and torch.rand(()) < 0.5:
            x = F.horizontal_flip(x)
        return x.float().mul_(1 / 127.5).sub_(1.0)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        x = F.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image
        height, width = x.shape[-2:]
        return self.apply(x, self.plan(width, height), width, height)

    def __repr__(self) -> str:
        return f"ImageTransform(kind={self.kind!r}, image_size={self.size})"


def build_transform(kind: Kind, image_size: int | Sequence[int]) -> ImageTransform:
    """The transform of one stage of the protocol: ``pretrain``, ``finetune``, ``eval`` or ``vtab``."""
    return ImageTransform(kind, image_size)
