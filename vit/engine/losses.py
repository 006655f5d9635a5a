"""Losses of the paper: sigmoid cross-entropy for upstream pre-training, softmax cross-entropy for the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class binary cross-entropy summed over classes, mean over the batch (paper-facts §4.1, [I#34]).

    ``labels`` are class indices (B,) or multi-hot targets (B, K).
    """
    targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype) if labels.ndim == 1 else labels.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def classification_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if kind == "sigmoid":
        return sigmoid_xent(logits.float(), labels)
    if kind == "softmax":
        return softmax_xent(logits, labels, label_smoothing)
    raise ValueError(f"unknown loss {kind!r}")


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp as BiT fine-tunes: one ``lam ~ Beta(alpha, alpha)`` per batch, every image blended with a random other
    image of the batch. Returns the mixed images, the partners' labels and ``lam`` (torch's generator, which the
    trainer checkpoints, draws both)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(images.shape[0], device=images.device)
    return images.lerp(images[order], 1.0 - lam), labels[order], lam


def mixup_loss(
    kind: str, module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, alpha: float, smoothing: float
) -> torch.Tensor:
    """The classification loss of a MixUp batch: ``lam · loss(own labels) + (1 - lam) · loss(partners' labels)``."""
    mixed, partners, lam = mixup(images, labels, alpha)
    logits = module(mixed)
    own = classification_loss(kind, logits, labels, smoothing)
    return lam * own + (1.0 - lam) * classification_loss(kind, logits, partners, smoothing)
