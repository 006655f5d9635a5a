"""Optimisers and learning-rate schedules exactly as the paper's code (paper-facts §4.1, §5.2).

Pre-training: Adam (β = 0.9, 0.999) with decoupled weight decay. The default ``lr_relative`` convention decays
``p -= lr · wd · p`` as ``flax.optim.Adam(weight_decay=...)`` did ("AdamW style weight decay rate (relative to
learning rate)") — which is also torch's AdamW. ``schedule_only`` is big_vision's later convention,
``p -= wd · schedule(t) · p``, obtained from AdamW by dividing wd by the base lr. Whether the paper's 0.1/0.03/0.3
meant the former is UNCONFIRMED (paper-facts §13.1), hence the switch.

Fine-tuning: SGD with heavy-ball momentum 0.9 (``m = 0.9 m + g; p -= lr m``, no dampening, no Nesterov) and no
weight decay. Both clip the global gradient norm at 1 (done by the trainer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vit.engine.config import OptimConfig


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    decay: str,
    linear_end: float,
    step_decay_at: Sequence[float] = (0.3, 0.6, 0.9),
) -> float:
    """The official schedule (vit_jax utils.create_learning_rate_schedule), steps counted from 1.

    ``progress = clip((step - warmup) / (total - warmup), 0, 1)``; cosine: ``base · ½(1 + cos(π·progress))``;
    linear: ``end + (base - end)(1 - progress)``; step (BiT-HyperRule): ``base / 10`` per fraction of
    ``step_decay_at`` that ``step / total`` is past; then multiplied by ``min(1, step / warmup)``.
    """
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if decay == "step":
        lr = base_lr * 0.1 ** sum(step > f * total_steps for f in step_decay_at)
    elif decay == "cosine":
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        lr = linear_end + (base_lr - linear_end) * (1.0 - progress)
    else:
        raise ValueError(f"unknown decay {decay!r}")
    if warmup_steps:
        lr *= min(1.0, step / warmup_steps)
    return lr


def _param_groups(model: nn.Module, weight_decay: float, on: str) -> list[dict]:
    if on == "all" or weight_decay == 0.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    kernels = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": kernels, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser for a config; the learning rate is set by the trainer at every step from :func:`lr_at`."""
    if cfg.name == "adam":
        wd = cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "schedule_only" else cfg.weight_decay
        groups = _param_groups(model, wd, cfg.weight_decay_on)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)
    if cfg.name == "sgd":
        groups = _param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, nesterov=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
