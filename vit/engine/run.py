"""One training run from a :class:`TrainConfig`: data, model, trainer, evaluation and the final weights."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vit import storage
from vit.checkpoints import load_pretrained, save_checkpoint
from vit.engine.callbacks import Callback
from vit.engine.config import TrainConfig
from vit.engine.distributed import DistInfo, init_distributed
from vit.engine.evaluation import evaluate_classifier
from vit.engine.losses import classification_loss, mixup_loss
from vit.engine.mpp import MaskedPatchPrediction, mpp_loss
from vit.engine.trainer import Trainer
from vit.model import VisionTransformer, create_model, flops_per_image

if TYPE_CHECKING:
    from vit.data.dataset import PreparedDataset


@dataclass
class TrainOutcome:
    step: int
    resumed_from: int | None
    model_uri: str | None
    eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    model: VisionTransformer | None = None
    rank_digests: list[str] = field(default_factory=list)  # sha256 of each rank's final weights, by rank


def rank_digests(model: nn.Module) -> list[str]:
    """The sha256 of every rank's weights (gathered across the process group): equal on all ranks when DDP kept
    them in step, which the result reports and the launcher's tests check."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [digest.hexdigest()]
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, digest.hexdigest())
    return [str(d) for d in gathered]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, num_classes: int) -> VisionTransformer:
    """A fresh model, or one loaded from ``model.init`` with a new zero head at the training resolution."""
    m = cfg.model
    overrides: dict[str, Any] = {**m.overrides, "gelu_approximate": m.gelu_approximate}
    if m.dropout is not None:
        overrides["dropout"] = m.dropout
    if m.init:
        model = load_pretrained(m.init, **overrides)
        if m.reset_head:
            model.reset_classifier(num_classes, head_bias_init=cfg.model.head_bias_init or 0.0)
        model.set_image_size(m.image_size)
        return model
    return create_model(
        m.name,
        num_classes=num_classes,
        image_size=m.image_size,
        representation_size=m.representation_size,
        head_bias_init=cfg.head_bias,
        pooling=m.pooling,
        **overrides,
    )


def total_steps(cfg: TrainConfig, train_count: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * train_count / cfg.batch_size))


def decode_device(cfg: TrainConfig, device: torch.device) -> str | None:
    """Where the training batches are decoded: None (in the loader workers) or the training GPU. Raises
    ValueError when ``data.decode_device=cuda`` is asked of a run that does not train on a GPU."""
    if cfg.data.decode_device == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"data.decode_device=cuda decodes on the training GPU, but this run trains on {device}")
    return str(device)


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), dist: DistInfo | None = None) -> TrainOutcome:
    """Train as configured (resuming from ``checkpoint.dir`` when it holds a checkpoint) and save the final weights
    (Polyak-averaged if enabled) to ``<checkpoint.dir>/model.safetensors``.
    """
    from vit.data import open_dataset

    dist = dist or init_distributed(cfg.device)
    cfg.validate(dist.world_size)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    ds = open_dataset(cfg.data.dataset)
    for field_name in ("train_split", "eval_split"):
        split = getattr(cfg.data, field_name)
        if split and split not in ds.splits:
            raise ValueError(f"data.{field_name} {split!r} is not in {ds.uri} (splits: {ds.splits})")
    num_classes = cfg.model.num_classes or ds.num_classes
    model = build_model(cfg, num_classes)
    micro = cfg.batch_size // (dist.world_size * cfg.accum_steps)
    module: nn.Module
    if cfg.objective == "mpp":
        module, loss_fn = MaskedPatchPrediction(model), mpp_loss
    else:
        module, loss_fn = model, _classification_loss(cfg)
    trainer = Trainer(
        module,
        cfg,
        _train_loader(cfg, ds, micro, dist),
        total_steps(cfg, min(ds.count(cfg.data.train_split), cfg.data.train_subset or math.inf)),
        dist,
        loss_fn,
        _evaluator(cfg, ds, micro, num_classes, dist),
        callbacks,
        flops_per_image=flops_per_image(model.cfg),
        metadata={"dataset": ds.uri, "fingerprint": ds.fingerprint},
    )
    result = trainer.fit()
    model_uri = None
    with trainer.averaged_weights():
        if cfg.checkpoint.dir and dist.is_main:
            model_uri = storage.join(cfg.checkpoint.dir, "model.safetensors")
            save_checkpoint(model_uri, model, {"step": result.step, "dataset": ds.uri, "train_config": cfg.to_dict()})
        final = type(model)(model.cfg)
        final.load_state_dict(model.state_dict())
    digests = rank_digests(model)
    return TrainOutcome(result.step, result.resumed_from, model_uri, result.eval, result.history, final.eval(), digests)


def _train_loader(cfg: TrainConfig, ds: PreparedDataset, micro: int, dist: DistInfo):
    """The endless, shuffled training stream of this rank. Each step's global batch is the same samples whatever
    the world size (vit.data.loader): micro-batch j of rank r is chunk j * world_size + r of the global order."""
    from vit.data import build_transform

    return ds.loader(
        cfg.data.train_split,
        micro,
        build_transform(cfg.data.train_transform, cfg.model.image_size, cfg.data.resize),
        shuffle=True,
        seed=cfg.seed,
        repeat=True,
        num_workers=cfg.data.num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=_pinned(dist),
        decode_device=decode_device(cfg, dist.device),
        subset=cfg.data.train_subset,
        subset_seed=cfg.data.subset_seed,
    )


def _pinned(dist: DistInfo) -> bool:
    """Page-locked batches on CUDA, so the trainer's non_blocking copies overlap compute."""
    return dist.device.type == "cuda"


def _evaluator(cfg: TrainConfig, ds: PreparedDataset, micro: int, num_classes: int, dist: DistInfo):
    """Top-1 on ``data.eval_split`` (gathered over ranks), or None when there is nothing to evaluate."""
    if not cfg.data.eval_split or cfg.objective != "classification":
        return None
    from vit.data import build_transform

    eval_transform = build_transform(cfg.data.eval_transform, cfg.model.image_size, cfg.data.resize)

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        batches = ds.loader(
            cfg.data.eval_split,
            micro,
            eval_transform,
            shuffle=False,
            repeat=False,
            num_workers=cfg.data.num_workers,
            rank=dist.rank,
            world_size=dist.world_size,
            pin_memory=_pinned(dist),
        )
        metrics = evaluate_classifier(m, batches, num_classes, micro, dist.device, cfg.precision)
        return {f"val/{k}": v for k, v in metrics.items()}

    return evaluate_fn


def _classification_loss(cfg: TrainConfig):
    def loss(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if cfg.mixup_alpha:
            return mixup_loss(cfg.loss, module, images, labels, cfg.mixup_alpha, cfg.label_smoothing)
        return classification_loss(cfg.loss, module(images), labels, cfg.label_smoothing)

    return loss
