"""Evaluation loops: top-1 with no sample dropped (the last batch is padded and masked), ReaL, features."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from vit.engine.distributed import autocast
from vit.metrics import ClassificationMeter, RealMeter


def _padded(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Pad a short last batch to the full size (fixed shapes for compiled models) and return the mask."""
    n = images.shape[0]
    mask = torch.ones(batch_size, dtype=torch.bool)
    if n < batch_size:
        mask[n:] = False
        images = torch.cat([images, images.new_zeros(batch_size - n, *images.shape[1:])])
        labels = torch.cat([labels, labels.new_zeros(batch_size - n)])
    return images, labels, mask


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    batches: Iterable,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    real_labels: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Top-1 (and ReaL when ``real_labels`` is given, indexed by ``Batch.index``) over every sample of ``batches``,
    summed exactly across DDP ranks. Returns ``top1``, ``count`` and ``real_top1`` / ``real_count``.
    """
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(num_classes)
    real = RealMeter() if real_labels is not None else None
    for batch in batches:
        images, labels, mask = _padded(batch[0], batch[1], batch_size)
        with autocast(device, precision):
            logits = model(images.to(device, non_blocking=True))
        predictions = logits.float().argmax(-1).cpu()
        meter.update(predictions, labels, mask)
        if real is not None:
            index = batch[2].tolist()
            lists = [list(real_labels[i]) for i in index] + [[]] * (batch_size - len(index))
            real.update(predictions, lists, mask)
    meter.all_reduce()
    out = {"top1": meter.top1, "count": float(meter.count)}
    if real is not None:
        real.all_reduce()
        out.update(real_top1=real.top1, real_count=float(real.count))
    model.train(was_training)
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable, device: torch.device, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logits features (``forward_pre_logits``) and labels of every sample, in iteration order."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in batches:
        with autocast(device, precision):
            f = model.forward_pre_logits(batch[0].to(device, non_blocking=True))
        feats.append(f.float().cpu().numpy())
        labels.append(np.asarray(batch[1]))
    model.train(was_training)
    return np.concatenate(feats), np.concatenate(labels)
