"""Image transforms of the official protocol (vit_jax input_pipeline.py, big_vision configs/common_fewshot.py),
built from torchvision.transforms.v2 kernels.

Every kind ends in float32 CHW in [-1, 1] (``x / 127.5 - 1``, the official ``value_range(-1, 1)``):

* ``pretrain`` and ``finetune``: vit_jax's training crop, TF's ``sample_distorted_bounding_box`` (5-100% of the
  area, aspect 3/4-4/3, 100 attempts, else the whole image) resized to the resolution, random flip. vit_jax
  fine-tunes with it, and its maintainers pre-trained with "the same cropping code".
* ``eval``: direct resize of the whole image to the resolution, no crop (vit_jax's evaluation).
* ``vtab``: direct resize, for training and evaluation alike (BiT/ViT VTAB protocol: no task-specific
  augmentation; a flip would change the label of position and orientation tasks).
* ``fewshot``: big_vision's few-shot ``resize(256)|central_crop(224)``, scaled to the resolution.

Resize numerics (``resize``): ``"tf"`` (the default) is ``tf.image.resize``'s bilinear as the official
pipelines call it: in float, half-pixel centres, no antialiasing, on the image decoded at full size. ``"antialias"``
resizes uint8 with antialiasing and lets the loader decode JPEGs at 1/2-1/8 size in the DCT domain (cheaper,
smoother when shrinking a lot; not what the official code computes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

Kind = Literal["pretrain", "finetune", "eval", "vtab", "fewshot"]
Resize = Literal["tf", "antialias"]
KINDS: tuple[str, ...] = ("pretrain", "finetune", "eval", "vtab", "fewshot")
RESIZES: tuple[str, ...] = ("tf", "antialias")
CROP_KINDS = ("pretrain", "finetune")
INCEPTION_AREA = (0.05, 1.0)
INCEPTION_RATIO = (3 / 4, 4 / 3)
INCEPTION_ATTEMPTS = 100  # the op's default max_attempts
FEWSHOT_RESIZE = 256 / 224  # big_vision common_fewshot: resize(256) then central_crop(224)

Box = tuple[int, int, int, int]  # (top, left, height, width) in source pixels


@dataclass(frozen=True)
class Plan:
    """The random draws of one sample that fix its decoding: the scale it may be decoded at, and (crop kinds) the
    crop box (top, left, h, w) in source pixels."""

    scale: float
    box: Box | None = None


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return int(h), int(w)


def _random_crop(height: int, width: int, ratio: float, draws: tuple[float, float, float]) -> Box | None:
    """One attempt of TF's ``GenerateRandomCrop``: the crop height uniform between the heights that give the
    smallest and the largest allowed area at this aspect (width = round(ratio * height)), capped to fit, then a
    uniform offset; None when rounding leaves the area or the image bounds unsatisfiable."""
    low, high = (a * width * height for a in INCEPTION_AREA)
    h, max_h = round((low / ratio) ** 0.5), round((high / ratio) ** 0.5)
    if round(max_h * ratio) > width:
        max_h = int((width + 0.5 - 1e-7) / ratio)
        max_h -= round(max_h * ratio) > width
    max_h = min(max_h, height)
    h = min(h, max_h)
    h += int(draws[0] * (max_h - h + 1))
    w = round(h * ratio)
    if w * h < low:
        h += 1
        w = round(h * ratio)
    if w * h > high:
        h -= 1
        w = round(h * ratio)
    if not (low <= w * h <= high and 0 < w <= width and 0 < h <= height):
        return None
    return int(draws[1] * (height - h)), int(draws[2] * (width - w)), h, w


def inception_box(height: int, width: int, draws: Sequence[Sequence[float]]) -> Box:
    """TF's ``sample_distorted_bounding_box`` with vit_jax's arguments (no boxes, ``min_object_covered=0``,
    ``use_image_if_no_bounding_boxes``): per attempt an aspect ratio uniform in the range and a crop from
    :func:`_random_crop`, the first valid one wins, the whole image after all attempts fail. ``draws`` holds four
    uniforms in [0, 1) per attempt (aspect, height, top, left)."""
    r0, r1 = INCEPTION_RATIO
    for u_ratio, *rest in draws:
        box = _random_crop(height, width, r0 + (r1 - r0) * u_ratio, tuple(rest))
        if box is not None:
            return box
    return 0, 0, height, width


class ImageTransform:
    """One transform kind at one resolution; a module-level class so DataLoader workers can be spawned.

    Input: a decoded uint8 CHW tensor (1, 3 or 4 channels) or a PIL image. Output: float32 3HW in [-1, 1].
    Built on ``torchvision.transforms.v2.functional`` kernels (the transform classes cost more per call than the
    work itself on small images); randomness comes from torch's global generator, which the loader seeds per
    batch.
    """

    def __init__(self, kind: Kind, image_size: int | Sequence[int], resize: Resize = "tf") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown transform kind {kind!r}; use one of {', '.join(KINDS)}")
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; use one of {', '.join(RESIZES)}")
        self.kind = kind
        self.size = _hw(image_size)
        self.resize = resize

    def _resize_to(self) -> tuple[int, int]:
        """The size the whole image is resized to (crop kinds resize their crop to ``self.size`` instead)."""
        h, w = self.size
        return (round(h * FEWSHOT_RESIZE), round(w * FEWSHOT_RESIZE)) if self.kind == "fewshot" else (h, w)

    def plan(self, width: int, height: int) -> Plan:
        """Draw this sample's random crop (crop kinds) in source pixels, and the smallest scale the source may be
        decoded at: with ``resize="antialias"`` the loader decodes a JPEG at 1/2, 1/4 or 1/8 in the DCT domain
        when no detail the transform keeps is lost; ``"tf"`` always decodes at full size, as the official code."""
        h, w = self._resize_to()
        box = None
        if self.kind in CROP_KINDS:
            box = inception_box(height, width, torch.rand(INCEPTION_ATTEMPTS, 4).tolist())  # one draw: seedable
            height, width = box[2:]
        return Plan(1.0 if self.resize == "tf" else min(1.0, max(h / height, w / width)), box)

    def _resize(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        if self.resize == "tf":
            return F.resize(x.float(), size, antialias=False)
        return F.resize(x, size, antialias=True).float()

    def apply(self, image: torch.Tensor, plan: Plan, width: int, height: int) -> torch.Tensor:
        """The transform of a ``width`` x ``height`` source under ``plan``; ``image`` may be that source decoded
        at a reduced size."""
        x = image
        if x.dtype != torch.uint8 or x.ndim != 3:
            raise TypeError(f"expected a uint8 CHW image tensor or a PIL image, got {x.dtype} {tuple(x.shape)}")
        if x.shape[0] != 3:
            x = x[:3] if x.shape[0] == 4 else x[:1].expand(3, -1, -1)
        if plan.box is not None:
            sy, sx = x.shape[-2] / height, x.shape[-1] / width
            top, left, h, w = plan.box
            top, left = min(round(top * sy), x.shape[-2] - 1), min(round(left * sx), x.shape[-1] - 1)
            h, w = max(1, min(round(h * sy), x.shape[-2] - top)), max(1, min(round(w * sx), x.shape[-1] - left))
            x = F.crop(x, top, left, h, w)
        x = self._resize(x, list(self.size if plan.box is not None else self._resize_to()))
        if self.kind == "fewshot":
            x = F.crop(x, (x.shape[-2] - self.size[0]) // 2, (x.shape[-1] - self.size[1]) // 2, *self.size)
        if self.kind in CROP_KINDS and torch.rand(()) < 0.5:
            x = F.horizontal_flip(x)
        return x.mul_(1 / 127.5).sub_(1.0)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        x = F.pil_to_tensor(image.convert("RGB")) if isinstance(image, Image.Image) else image
        height, width = x.shape[-2:]
        return self.apply(x, self.plan(width, height), width, height)

    def __repr__(self) -> str:
        return f"ImageTransform(kind={self.kind!r}, image_size={self.size}, resize={self.resize!r})"


def build_transform(kind: Kind, image_size: int | Sequence[int], resize: Resize = "tf") -> ImageTransform:
    """The transform of one stage of the protocol: ``pretrain``, ``finetune``, ``eval``, ``vtab`` or ``fewshot``."""
    return ImageTransform(kind, image_size, resize)
