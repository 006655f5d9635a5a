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
    """The official schedule (vit_jax utils.create_learning_rate_schedule) at ``step``, the number of updates made
    before this one: optax evaluates a schedule at its update count, so the first update uses step 0 (lr 0 when
    there is warmup).

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
    """``on="kernels"``: only the weights of dense and convolution layers decay, as big_vision's
    ``wd_mults=[(".*/kernel$", 1.0)]``; biases, norm scales, position embeddings and the class token do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if on == "all" or weight_decay == 0.0:
        return [{"params": params, "weight_decay": weight_decay}]
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    return [
        {"params": [p for p in params if id(p) in kernels], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in kernels], "weight_decay": 0.0},
    ]


def _fused_adamw(groups: list[dict]) -> bool | None:
    """AdamW's fused kernel (one launch for all parameters) when every parameter is on a CUDA device; otherwise
    torch's default (foreach on the CPU), so CPU runs keep their exact numbers."""
    params = [p for g in groups for p in g["params"]]
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser for a config; the learning rate is set by the trainer at every step from :func:`lr_at`."""
    if cfg.name == "adam":
        wd = cfg.weight_decay / cfg.lr if cfg.weight_decay_mode == "schedule_only" else cfg.weight_decay
        groups = _param_groups(model, wd, cfg.weight_decay_on)
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd, fused=_fused_adamw(groups)
        )
    if cfg.name == "sgd":
        groups = _param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0, nesterov=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
