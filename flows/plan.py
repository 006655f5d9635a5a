"""From a BenchmarkSpec to what each stage runs: the one place the spec is turned into stage specs and engine configs.

preset -> :class:`~flows.specs.BenchmarkSpec` (validated) -> the stage specs of ``tasks/stages.py`` built here ->
the engine's :class:`~vit.engine.config.TrainConfig`. Each derived value (default resolutions, the protocol's
recipe with the spec's overrides, the learning rates to sweep, what identifies a stage's output) is computed here
once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from flows.specs import BenchmarkItem, BenchmarkSpec
from tasks.common import TrackingContext, stage_uri
from tasks.fewshot import fewshot_key
from tasks.launch import Launch
from tasks.stages import (
    AggregateStage,
    AnalysisTarget,
    DatasetRef,
    DatasetStage,
    FewshotStage,
    Registration,
    TestEval,
    TrainResult,
    TrainStage,
    TransferResults,
)
from vit.configs import is_bit, model_config
from vit.engine.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from vit.engine.recipes import FinetuneRecipe, default_finetune_recipe

# Few-shot train/test splits per protocol (big_vision uses the official train/test splits; VTAB its 1k split).
FEWSHOT_SPLITS = {"imagenet": ("train", "val"), "vtab": ("train800val200", "test")}
PRETRAINED, SCRATCH = "pretrained", "scratch"


def launch(spec: BenchmarkSpec, pretrain: bool = False) -> Launch:
    c = spec.compute
    return Launch(
        nproc_per_node=c.nproc_per_node,
        nnodes=c.nnodes,
        rdzv_endpoint=c.rdzv_endpoint,
        threads=(c.pretrain_threads or c.threads_per_job) if pretrain else c.threads_per_job,
        gpu_slots_limit=c.gpu_slots_limit,
        prefork=c.prefork,
    )


def upstream_size(spec: BenchmarkSpec) -> int:
    """The resolution of the model transfer starts from: pre-training's, else the fine-tuning resolution."""
    return spec.pretrain.image_size if spec.pretrain else spec.transfer.finetune.image_size


def fewshot_size(spec: BenchmarkSpec) -> int | None:
    """Few-shot features are extracted at ``transfer.fewshot.image_size``, default pre-training's resolution;
    None (no pre-training stage): the checkpoint's own resolution."""
    return spec.transfer.fewshot.image_size or (spec.pretrain.image_size if spec.pretrain else None)


def datasets(spec: BenchmarkSpec) -> dict[str, Any]:
    """Every dataset the spec names, once each (benchmarks may share one)."""
    items = {spec.pretrain.dataset.name: spec.pretrain.dataset} if spec.pretrain else {}
    items.update({b.dataset.name: b.dataset for b in spec.transfer.benchmarks})
    return items


def dataset_stages(spec: BenchmarkSpec, tracking: TrackingContext) -> dict[str, DatasetStage]:
    root = spec.resolved_artifact_root()
    return {
        name: DatasetStage(
            name=name,
            source=d.source,
            options=d.options,
            max_corrupt_fraction=d.max_corrupt_fraction,
            artifact_root=root,
            seed=spec.seed,
            tracking=tracking,
        )
        for name, d in datasets(spec).items()
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


def pretrain_config(spec: BenchmarkSpec, dataset_uri: str) -> tuple[TrainConfig, dict[str, Any]]:
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
            dataset=dataset_uri,
            train_split="train",
            train_subset=p.train_subset,
            subset_seed=spec.seed,
            eval_split=p.eval_split,
            train_transform=p.train_transform,
            num_workers=spec.compute.num_workers,
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
            mode="json", exclude={"registered_model", "alias", "checkpoint_every_minutes", "dataset", "train_subset"}
        ),
        "dataset": dataset_uri,
        "seed": spec.seed,
        "precision": spec.compute.precision,
    }
    if p.train_subset is not None:  # a key of its own, so the whole set's stages keep the folders they had
        key["train_subset"] = p.train_subset
    return cfg, key


def pretrain_stage(spec: BenchmarkSpec, dataset: DatasetRef, tracking: TrackingContext) -> TrainStage:
    """Pre-training on the upstream dataset, registered as ``<experiment>-<model>@<alias>`` unless named."""
    assert spec.pretrain is not None
    config, key = pretrain_config(spec, dataset.uri)
    subset = spec.pretrain.train_subset
    name = f"pretrain:{spec.model.name}" + (f":n={subset}" if subset else "")
    return TrainStage(
        kind="pretrain",
        name=name,
        title=f"pretrain {spec.model.name} on {dataset.name}" + (f" ({subset:,} images)" if subset else ""),
        uri=stage_uri(spec.resolved_artifact_root(), "pretrain", name, key),
        config=config,
        launch=launch(spec, pretrain=True),
        tracking=tracking,
        datasets=[dataset],
        registration=Registration(
            name=spec.pretrain.registered_model or f"{spec.experiment}-{spec.model.name}", alias=spec.pretrain.alias
        ),
        tags={"vitflow.fingerprint": dataset.fingerprint},
    )


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
) -> tuple[TrainConfig, dict[str, Any], TestEval | None]:
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
    test = TestEval(split=recipe.test, transform=recipe.eval_transform, real=bench.real) if final else None
    return cfg, key, test


def finetune_name(bench: BenchmarkItem, label: str, lr: float, seed: int, final: bool) -> str:
    """``finetune:<benchmark>:lr=<lr>[:<model>][:seed=<seed>]`` (the seed of a final run when it is not 0)."""
    suffix = "" if label == PRETRAINED else f":{label}"
    return f"finetune:{bench.name}:lr={lr:g}{suffix}" + (f":seed={seed}" if final and seed else "")


def finetune_stage(
    spec: BenchmarkSpec,
    bench: BenchmarkItem,
    dataset: DatasetRef,
    model: tuple[str, str],
    lr: float,
    seed: int,
    final: bool,
    tracking: TrackingContext,
) -> TrainStage:
    """One fine-tune of ``model`` = (label, checkpoint URI): a sweep run or a final run."""
    label, init = model
    config, key, test = finetune_config(spec, bench, dataset.uri, init, lr, seed, final)
    name = finetune_name(bench, label, lr, seed, final)
    tags = {
        "vitflow.benchmark": bench.name,
        "vitflow.model_label": label,
        "vitflow.lr": f"{lr:g}",
        "vitflow.phase": "final" if final else "sweep",
        "vitflow.fingerprint": dataset.fingerprint,
    }
    phase = "" if final else " sweep"
    return TrainStage(
        kind="finetune",
        name=name,
        title=f"finetune {bench.name} lr={lr:g} seed={seed}{phase}" + ("" if label == PRETRAINED else f" ({label})"),
        uri=stage_uri(spec.resolved_artifact_root(), "finetune", name, key),
        config=config,
        launch=launch(spec),
        tracking=tracking,
        datasets=[dataset],
        test=test,
        tags=tags,
    )


def fewshot_stage(
    spec: BenchmarkSpec, bench: BenchmarkItem, dataset: DatasetRef, model: tuple[str, str], tracking: TrackingContext
) -> FewshotStage:
    """Few-shot evaluation of ``model`` = (label, checkpoint URI) on a benchmark's protocol splits."""
    label, init = model
    train_split, test_split = FEWSHOT_SPLITS.get(bench.protocol, ("train", "test"))
    fs = spec.transfer.fewshot
    fields = {
        "benchmark": bench.name,
        "model_label": label,
        "model_uri": init,
        "dataset": dataset,
        "train_split": train_split,
        "test_split": test_split,
        "shots": fs.shots,
        "seeds": fs.seeds,
        "l2": fs.l2,
        "image_size": fewshot_size(spec),
        "tracking": tracking,
        "tags": {"vitflow.benchmark": bench.name, "vitflow.model_label": label},
    }
    draft = FewshotStage(uri="", **fields)
    uri = stage_uri(spec.resolved_artifact_root(), "fewshot", f"{bench.name}-{label}", fewshot_key(draft))
    return draft.model_copy(update={"uri": uri})


def aggregate_stage(
    spec: BenchmarkSpec,
    tracking: TrackingContext,
    results: TransferResults,
    pretrained: TrainResult | None,
    refs: dict[str, DatasetRef],
    model_uri: str,
) -> AggregateStage:
    """The aggregation of a run; the analysis figures are drawn for ``model_uri`` on the first benchmark."""
    benches = spec.transfer.benchmarks
    analysis = None
    if spec.analysis.enabled and benches and not is_bit(spec.model.name):  # the figures are of a ViT's attention
        first = refs[benches[0].dataset.name]
        analysis = AnalysisTarget(
            model_uri=model_uri,
            dataset_uri=first.uri,
            split="test" if "test" in first.splits else "val",
            image_size=upstream_size(spec),
            num_images=spec.analysis.num_images,
        )
    return AggregateStage(
        experiment=spec.experiment,
        model_name=spec.model.name,
        pretrain_name=spec.pretrain.dataset.name if spec.pretrain else "checkpoint",
        artifact_root=spec.resolved_artifact_root(),
        tracking=tracking,
        results=results,
        pretrained=pretrained,
        groups={b.name: refs[b.dataset.name].vtab_group for b in benches},
        curve_seed=spec.transfer.finetune.seeds[0],
        analysis=analysis,
    )
