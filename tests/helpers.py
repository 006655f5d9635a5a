"""Small helpers shared by several test modules."""

from __future__ import annotations

import json

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


# The demo preset on its synthetic upstream set, one fine-tuning seed at lr 0.03: what the end-to-end tests
# override it with, so they keep their small, fast shape whatever data the demo itself reads (Fashion-MNIST).
SYNTHETIC_DEMO: dict[str, object] = {
    "pretrain.dataset.name": "synthetic-upstream",
    "pretrain.dataset.source": "synthetic-upstream:",
    "pretrain.dataset.options": {},  # the generator's defaults, then each test's own sizes
    "transfer.finetune.seeds": [0],
    "transfer.finetune.lrs": [0.03],
}
SYNTHETIC_DEMO_SETS = [f"{key}={json.dumps(value)}" for key, value in SYNTHETIC_DEMO.items()]  # as --set values


def synthetic_benchmarks(names: tuple[str, ...], **options: int) -> list:
    """The synthetic VTAB-like benchmarks ``names`` (e.g. synth/natural_objects) with their dataset ``options``."""
    from flows.presets import synthetic_suite

    return [
        b.model_copy(update={"dataset": b.dataset.model_copy(update={"options": options})})
        for b in synthetic_suite()
        if b.name in names
    ]
