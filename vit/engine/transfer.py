"""The transfer protocol of the paper: learning-rate sweep on held-out data, final fine-tune, test; few-shot.

The pipeline fans each swept learning rate out as its own task; these functions are the same steps run in one
process (``vitflow finetune --sweep``, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from vit import storage
from vit.engine.callbacks import Callback
from vit.engine.evaluation import evaluate_classifier, extract_features
from vit.engine.recipes import FinetuneRecipe, select_best_lr
from vit.engine.run import TrainOutcome, train
from vit.metrics import fewshot_evaluate
from vit.model import VisionTransformer


@dataclass
class TransferResult:
    sweep: dict[float, float]
    best_lr: float
    test: dict[str, float]
    model_uri: str | None


def evaluate_split(
    model: VisionTransformer,
    dataset_uri: str,
    split: str,
    transform: str,
    batch_size: int,
    precision: str = "fp32",
    real: bool = False,
) -> dict[str, float]:
    """Top-1 of a model on a prepared split (every sample counted; ReaL when ``real`` and labels exist)."""
    from vit.data import build_transform, open_dataset

    ds = open_dataset(dataset_uri)
    device = next(model.parameters()).device
    batches = ds.loader(
        split, batch_size, build_transform(transform, model.cfg.image_size[0]), shuffle=False, repeat=False
    )
    real_labels = None
    if real:
        manifest = ds.manifest(split)
        if "real_labels" in manifest.columns:
            real_labels = list(manifest["real_labels"])
    return evaluate_classifier(model, batches, model.cfg.num_classes, batch_size, device, precision, real_labels)


def finetune_with_sweep(
    recipe: FinetuneRecipe,
    init: str,
    dataset_uri: str,
    output_dir: str,
    callbacks: Sequence[Callback] = (),
    sweep: bool = True,
    **overrides,
) -> TransferResult:
    """Sweep ``recipe.lrs`` (train on sweep_train, validate on sweep_val), retrain with the best on final_train,
    report the test split. ``overrides`` replace TrainConfig fields (e.g. steps, batch_size for CPU runs).
    """
    val: dict[float, float] = {}
    lrs = recipe.lrs if sweep and len(recipe.lrs) > 1 else recipe.lrs[:1]
    if len(lrs) > 1:
        for lr in lrs:
            cfg = recipe.train_config(
                init,
                dataset_uri,
                lr,
                recipe.sweep_train,
                recipe.sweep_val,
                storage.join(output_dir, f"sweep-lr{lr:g}"),
                **overrides,
            )
            val[lr] = train(cfg, callbacks).eval["val/top1"]
    best = select_best_lr(val) if val else lrs[0]
    cfg = recipe.train_config(
        init, dataset_uri, best, recipe.final_train, None, storage.join(output_dir, "final"), **overrides
    )
    outcome: TrainOutcome = train(cfg, callbacks)
    test = evaluate_split(outcome.model, dataset_uri, recipe.test, recipe.eval_transform, cfg.batch_size, cfg.precision)
    return TransferResult(val, best, test, outcome.model_uri)


def fewshot_on_dataset(
    model: VisionTransformer,
    dataset_uri: str,
    train_split: str,
    test_split: str,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2: float = 1024.0,
    batch_size: int = 256,
    transform: str = "fewshot",
) -> pd.DataFrame:
    """Few-shot linear accuracy on pre-logits features, extracted once and reused across shots and seeds; images
    preprocessed as big_vision's few-shot evaluator (resize to 8/7 of the resolution, central crop)."""
    from vit.data import build_transform, open_dataset

    ds = open_dataset(dataset_uri)
    tf = build_transform(transform, model.cfg.image_size[0])
    device = next(model.parameters()).device
    with torch.inference_mode():
        train_x, train_y = extract_features(
            model, ds.loader(train_split, batch_size, tf, shuffle=False, repeat=False), device
        )
        test_x, test_y = extract_features(
            model, ds.loader(test_split, batch_size, tf, shuffle=False, repeat=False), device
        )
    return fewshot_evaluate(train_x, train_y, test_x, test_y, shots=tuple(shots), seeds=tuple(seeds), l2=l2)
