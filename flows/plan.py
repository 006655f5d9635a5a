"""From a BenchmarkSpec to the engine's training configs: what each stage runs, and what identifies its output."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flows.specs import BenchmarkItem, BenchmarkSpec
from vit.configs import is_bit, model_config
from vit.engine.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from vit.engine.recipes import FinetuneRecipe, default_finetune_recipe

# Few-shot train/test splits per protocol (big_vision uses the official train/test splits; VTAB its 1k split).
FEWSHOT_SPLITS = {"imagenet": ("train", "val"), "vtab": ("train800val200", "test")}


def launch(spec: BenchmarkSpec) -> dict[str, Any]:
    c = spec.compute
    return {
        "nproc_per_node": c.nproc_per_node,
        "nnodes": c.nnodes,
        "rdzv_endpoint": c.rdzv_endpoint,
        "threads": c.threads_per_job,
        "gpu_slots_limit": c.gpu_slots_limit,
        "prefork": c.prefork,
    }


def _compute_fields(spec: BenchmarkSpec) -> dict[str, Any]:
    c = spec.compute
    return {
        "device": c.device,
        "precision": c.precision,
        "compile": c.compile,
        "grad_checkpointing": c.grad_checkpointing,
        "accum_steps": c.accum_steps,
    }


def pretrain_config(spec: BenchmarkSpec, dataset_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The TrainConfig of the pre-training stage, and the key its output folder is addressed by."""
    p = spec.pretrain
    assert p is not None
    with_pre_logits = p.pre_logits and not is_bit(spec.model.name)  # a ResNet has no pre-logits layer
    representation = model_config(spec.model.name).hidden_size if with_pre_logits else None
    cfg = TrainConfig(
        objective=p.objective,
        loss=p.loss,
        label_smoothing=p.label_smoothing,
        model=ModelConfig(
            name=spec.model.name,
            image_size=p.image_size,
            representation_size=representation,
            dropout=p.dropout,
            gelu_approximate=spec.model.gelu_approximate,
            head_bias_init=p.head_bias_init,
        ),
        data=DataConfig(
            dataset=dataset_uri, train_split="train", train_transform="pretrain", num_workers=spec.compute.num_workers
        ),
        optim=OptimConfig(
            name="adam",
            lr=p.lr,
            weight_decay=p.weight_decay,
            weight_decay_mode=p.weight_decay_mode,
            warmup_steps=p.warmup_steps,
            decay=p.decay,
            linear_end=p.linear_end,
            grad_clip=p.grad_clip,
        ),
        checkpoint=CheckpointConfig(every_minutes=p.checkpoint_every_minutes),
        batch_size=p.batch_size,
        steps=p.steps,
        epochs=p.epochs,
        seed=spec.seed,
        **_compute_fields(spec),
    )
    key = {
        "model": spec.model.model_dump(mode="json"),
        "pretrain": p.model_dump(
            mode="json", exclude={"registered_model", "alias", "checkpoint_every_minutes", "dataset"}
        ),
        "dataset": dataset_uri,
        "seed": spec.seed,
        "precision": spec.compute.precision,
    }
    return cfg.to_dict(), key


def finetune_recipe(spec: BenchmarkSpec, bench: BenchmarkItem) -> FinetuneRecipe:
    """Table 4's row for the benchmark's protocol (the BiT-HyperRule for BiT models), with the spec's overrides."""
    f = spec.transfer.finetune
    base = default_finetune_recipe(bench.protocol, bit=is_bit(spec.model.name))
    recipe = replace(base, image_size=f.image_size, batch_size=f.batch_size, polyak=f.polyak)
    if f.steps is not None:
        recipe = replace(recipe, steps=f.steps)
    if f.lrs is not None:
        recipe = replace(recipe, lrs=tuple(f.lrs))
    if f.warmup_steps is not None:
        recipe = replace(recipe, warmup_steps=f.warmup_steps)
    return recipe


def sweep_lrs(spec: BenchmarkSpec, recipe: FinetuneRecipe) -> tuple[float, ...]:
    """Learning rates to sweep; empty when there is nothing to choose between."""
    return recipe.lrs if spec.transfer.finetune.sweep and len(recipe.lrs) > 1 else ()


def finetune_config(
    spec: BenchmarkSpec, bench: BenchmarkItem, dataset_uri: str, init_uri: str, lr: float, seed: int, final: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(TrainConfig, output key, test evaluation) of one fine-tune: a sweep run (train on the held-out protocol's
    training part, validate on its dev split) or a final run (full training split, then the test split)."""
    recipe = finetune_recipe(spec, bench)
    train_split = recipe.final_train if final else recipe.sweep_train
    eval_split = None if final else recipe.sweep_val
    cfg = recipe.train_config(
        init_uri, dataset_uri, lr, train_split, eval_split, None, spec.model.dropout, seed=seed, **_compute_fields(spec)
    )
    cfg.model.gelu_approximate = spec.model.gelu_approximate
    cfg.data.num_workers = spec.compute.num_workers
    key = {
        "init": init_uri,
        "dataset": dataset_uri,
        "recipe": recipe.__dict__,
        "lr": lr,
        "seed": seed,
        "train": train_split,
        "eval": eval_split,
        "precision": spec.compute.precision,
        "gelu": spec.model.gelu_approximate,
    }
    test = {"split": recipe.test, "transform": recipe.eval_transform, "real": bench.real} if final else None
    return cfg.to_dict(), key, test


def fewshot_splits(bench: BenchmarkItem) -> tuple[str, str]:
    return FEWSHOT_SPLITS.get(bench.protocol, ("train", "test"))
