"""The paper's fine-tuning recipes as typed objects: Table 4 (the pre-training rows of Table 3 are the
``paper-*`` presets of flows/presets.py).

Sources and choices (paper-facts §5, §8):
- Fine-tuning: SGD momentum 0.9, batch 512, cosine, no weight decay, clip 1, 384 px; warmup 500 steps for the long
  schedules and 100 for Pets/Flowers (big_vision transfer configs; the paper's warmup is UNCONFIRMED); VTAB-1k:
  lr 0.01, 2500 steps; its warmup is UNCONFIRMED too (200 here).
- Dropout: the variant's official fine-tuning rate (vit_jax configs/models.py: 0.1 for L/16, H/14 and the R50
  hybrids, 0 otherwise) unless the caller gives one; ``None`` leaves it to vit.load_pretrained.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from vit.engine.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig


@dataclass(frozen=True)
class FinetuneRecipe:
    """Table 4 plus the split protocol: sweep on (sweep_train -> sweep_val), retrain on final_train, report test."""

    steps: int
    lrs: tuple[float, ...]
    warmup_steps: int
    sweep_train: str = "train_minus_minival"
    sweep_val: str = "minival"
    final_train: str = "train"
    test: str = "test"
    batch_size: int = 512
    image_size: int = 384
    transform: str = "finetune"
    eval_transform: str = "eval"
    polyak: float | None = None

    def train_config(
        self,
        init: str,
        dataset_uri: str,
        lr: float,
        train_split: str,
        eval_split: str | None,
        checkpoint_dir: str | None,
        dropout: float | None = None,
        **overrides,
    ) -> TrainConfig:
        cfg = TrainConfig(
            objective="classification",
            loss="softmax",
            model=ModelConfig(image_size=self.image_size, init=init, dropout=dropout),
            data=DataConfig(
                dataset=dataset_uri,
                train_split=train_split,
                eval_split=eval_split,
                train_transform=self.transform,  # type: ignore[arg-type]
                eval_transform=self.eval_transform,  # type: ignore[arg-type]
            ),
            optim=OptimConfig(
                name="sgd", lr=lr, momentum=0.9, warmup_steps=self.warmup_steps, decay="cosine", grad_clip=1.0
            ),
            checkpoint=CheckpointConfig(dir=checkpoint_dir),
            batch_size=self.batch_size,
            steps=self.steps,
            polyak=self.polyak,
        )
        return replace(cfg, **overrides)


_SWEEP = (0.001, 0.003, 0.01, 0.03)

# Table 4 of the paper, keyed by benchmark.
TABLE4: dict[str, FinetuneRecipe] = {
    "imagenet": FinetuneRecipe(20_000, (0.003, 0.01, 0.03, 0.06), 500, final_train="train", test="val"),
    "cifar10": FinetuneRecipe(10_000, _SWEEP, 500),
    "cifar100": FinetuneRecipe(10_000, _SWEEP, 500),
    "pets": FinetuneRecipe(500, _SWEEP, 100),
    "flowers102": FinetuneRecipe(500, _SWEEP, 100),
    "vtab": FinetuneRecipe(
        2_500,
        (0.01,),
        200,
        sweep_train="train800",
        sweep_val="val200",
        final_train="train800val200",
        transform="vtab",
        eval_transform="vtab",
    ),
}


def select_best_lr(val_top1: Mapping[float, float]) -> float:
    """The learning rate with the highest validation accuracy (ties: the smaller learning rate)."""
    if not val_top1:
        raise ValueError("no sweep results to select from")
    return max(sorted(val_top1), key=lambda lr: val_top1[lr])


# --------------------------------------------------------------------------------------------------------------
# BiT-HyperRule: the fine-tuning protocol of the paper's ResNet baselines (Kolesnikov et al., "Big Transfer",
# ECCV 2020 §3.3, and big_transfer's bit_hyperrule.py). SGD momentum 0.9 at lr 0.003, batch 512, no weight decay;
# steps by training-set size (<20k: 500, <500k: 10k, else 20k) with linear warmup, then the learning rate divided
# by 10 at three points (the code's supports: 200/300/400 of 500 steps after 100 warmup; 30/60/90% with 500 warmup
# for the long schedules); resolution by image area (< 96x96 px: 160 -> 128 crop, else 448 -> 384, the paper's
# numbers; the released code uses 512 -> 480); MixUp alpha 0.1 except for < 20k examples. The crop is vitflow's
# ``finetune`` transform (shorter side to 7/6 of the crop), not BiT's square resize.

BIT_SMALL_AREA = 96 * 96


@dataclass(frozen=True)
class BiTFinetuneRecipe(FinetuneRecipe):
    """A :class:`FinetuneRecipe` trained the BiT way: step decay at ``decay_at`` (fractions of all steps), MixUp."""

    mixup_alpha: float = 0.0
    decay_at: tuple[float, float, float] = (0.3, 0.6, 0.9)

    def train_config(self, *args: Any, **overrides: Any) -> TrainConfig:
        """As :meth:`FinetuneRecipe.train_config` (same positional arguments), trained the BiT way."""
        cfg = super().train_config(*args)
        optim = replace(cfg.optim, decay="step", step_decay_at=self.decay_at, grad_clip=None)
        return replace(replace(cfg, optim=optim, mixup_alpha=self.mixup_alpha), **overrides)


def bit_hyperrule(train_count: int, image_hw: tuple[int, int], lr: float = 0.003, **fields) -> BiTFinetuneRecipe:
    """The BiT-HyperRule for a training set of ``train_count`` images of ``image_hw`` pixels."""
    if train_count < 20_000:
        steps, warmup, decay_at = 500, 100, (0.4, 0.6, 0.8)
    else:
        steps, warmup, decay_at = (10_000 if train_count < 500_000 else 20_000), 500, (0.3, 0.6, 0.9)
    crop = 128 if image_hw[0] * image_hw[1] < BIT_SMALL_AREA else 384
    mixup = 0.0 if train_count < 20_000 else 0.1
    return BiTFinetuneRecipe(steps, (lr,), warmup, image_size=crop, mixup_alpha=mixup, decay_at=decay_at, **fields)


# The HyperRule per protocol of TABLE4, from each benchmark's training-set size and typical image size
# (VTAB-1k: 1000 examples; its images are resized to 384 as in the ViT paper's VTAB protocol, App. B.1.1).
BIT_HYPERRULE: dict[str, BiTFinetuneRecipe] = {
    "imagenet": bit_hyperrule(1_281_167, (224, 224), final_train="train", test="val"),
    "cifar10": bit_hyperrule(50_000, (32, 32)),
    "cifar100": bit_hyperrule(50_000, (32, 32)),
    "pets": bit_hyperrule(3_680, (224, 224)),
    "flowers102": bit_hyperrule(2_040, (224, 224)),
    "vtab": bit_hyperrule(
        1_000,
        (384, 384),
        sweep_train="train800",
        sweep_val="val200",
        final_train="train800val200",
        transform="vtab",
        eval_transform="vtab",
    ),
}


def default_finetune_recipe(protocol: str, bit: bool = False) -> FinetuneRecipe:
    """The protocol's Table 4 row for a ViT, its BiT-HyperRule for a BiT model."""
    table = BIT_HYPERRULE if bit else TABLE4
    if protocol not in table:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(table)}")
    return table[protocol]
