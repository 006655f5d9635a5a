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
