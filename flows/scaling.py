"""The scaling flow — the paper's central experiment (Figures 3-5): prepare once -> pre-train every model on every
nested upstream subset -> transfer each (few-shot, and fine-tune when asked) -> one table, Figures 4 and 5.

Every stage is the benchmark flow's own (``flows/plan.py`` builds them, ``tasks/`` runs them, cached on their
content-addressed folders), so a re-run reuses what finished and adding a size to ``upstream_sizes`` trains only
that size. All stages run under one parent MLflow run.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.task_runners import ThreadPoolTaskRunner

from flows import plan
from flows.benchmark import mark_runs_killed, open_tracking, preset_tags, resolve, run_preset, submit_prepares, transfer
from flows.costs import training_flops
from flows.scaling_spec import FULL, ScalingSpec
from flows.specs import BenchmarkSpec
from tasks.aggregate import publish_run_page
from tasks.common import TrackingContext, run_logger
from tasks.scaling import ScalingAggregateStage, ScalingArm, scaling_aggregate_task
from tasks.stages import DatasetRef, RunSummary, TrainResult, TrainStage, result_store
from tasks.train import train_task


def pretrain_steps(spec: ScalingSpec, upstream_images: int | None) -> int | None:
    """The steps every size trains for: ``pretrain.steps``, or ``pretrain.epochs`` over the *whole* upstream
    split (the same compute per model whatever the size; None when the split's size is not known yet)."""
    p = spec.base.pretrain
    assert p is not None
    if p.steps is not None:
        return p.steps
    return math.ceil(p.epochs * upstream_images / p.batch_size) if upstream_images else None


def subsets(spec: ScalingSpec, upstream: DatasetRef) -> list[int | None]:
    """The training subsets (None: the whole split), smallest first; a size equal to the split is the whole split."""
    total = upstream.splits["train"]
    out: list[int | None] = []
    for size in spec.upstream_sizes:
        if size != FULL and size > total:
            raise ValueError(f"upstream_sizes: {size:,} is more than the {total:,} training images of {upstream.name}")
        subset = None if size in (FULL, total) else size
        if subset not in out:
            out.append(subset)
    return out


def arm(spec: ScalingSpec, model: str, subset: int | None, upstream: DatasetRef) -> tuple[ScalingArm, BenchmarkSpec]:
    """One (model, size) arm: its description (images, exaFLOPs) and its benchmark spec."""
    images = subset or upstream.splits["train"]
    steps = pretrain_steps(spec, upstream.splits["train"])
    arm_spec = spec.arm_spec(model, subset, steps)
    p = arm_spec.pretrain
    exaflops = training_flops(model, p.image_size) * steps * p.batch_size / 1e18
    label = f"{model}-" + (f"n{subset}" if subset else "full")
    pretrain = upstream.name if subset is None else f"{upstream.name} {subset:,}"
    return ScalingArm(model=model, label=label, pretrain=pretrain, images=images, exaflops=exaflops), arm_spec


@flow(name="pretrain-arms", flow_run_name="pretrain {experiment}", log_prints=True)
def pretrain_arms(experiment: str, stages: list[TrainStage]) -> list[TrainResult]:
    """Pre-train every arm, at most ``compute.max_parallel`` at a time; finished arms are Cached."""
    train = train_task.with_options(result_storage=result_store())
    futures = [train.submit(stage) for stage in stages]
    return [f.result() for f in futures]


def _open(spec: ScalingSpec):
    models = ", ".join(spec.models)
    name = f"{run_preset() or spec.base.experiment} {models} {datetime.now():%Y-%m-%d %H:%M}"
    tracker, parent, ctx = open_tracking(spec.base, name, {**preset_tags(), "vitflow.flow": "scaling"})
    tracker.log_text(parent, json.dumps(spec.model_dump(mode="json"), indent=2), "scaling_spec.json")
    tracker.set_tags(parent, {"vitflow.scaling.models": models, "vitflow.scaling.sizes": str(spec.upstream_sizes)})
    return tracker, parent, ctx


def _study(spec: ScalingSpec, ctx: TrackingContext) -> ScalingAggregateStage:
    """Prepare, pre-train every arm, transfer each model's arms: what the aggregation needs."""
    base = spec.base
    datasets = {name: f.result() for name, f in submit_prepares(base, ctx).items()}
    upstream = datasets[base.pretrain.dataset.name]
    arms = [arm(spec, model, subset, upstream) for model in spec.models for subset in subsets(spec, upstream)]
    stages = [plan.pretrain_stage(arm_spec, upstream, ctx) for _, arm_spec in arms]
    run_logger().info("%d arms: %s", len(arms), ", ".join(a.label for a, _ in arms))
    runner = ThreadPoolTaskRunner(max_workers=base.compute.max_parallel)
    trained = pretrain_arms.with_options(task_runner=runner)(base.experiment, stages)
    results = {}
    for model in spec.models:
        models = {a.label: r.model_uri for (a, _), r in zip(arms, trained, strict=True) if a.model == model}
        runner = ThreadPoolTaskRunner(max_workers=base.compute.max_parallel)
        results[model] = transfer.with_options(task_runner=runner)(spec.model_spec(model), ctx, datasets, models)
    return ScalingAggregateStage(
        experiment=base.experiment,
        artifact_root=base.resolved_artifact_root(),
        tracking=ctx,
        arms=[a for a, _ in arms],
        results=results,
        setting=spec.plot.setting,
        shots=spec.plot.shots,
        panels=spec.plot.panels,
    )


def mark_arms_killed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect's on_cancellation hook: the benchmark flow's, for the study's base spec (every MLflow run of the
    flow run not finished ends KILLED)."""
    base = ScalingSpec.model_validate(flow_run.parameters["spec"]).base
    mark_runs_killed(flow, SimpleNamespace(id=flow_run.id, parameters={"spec": base.model_dump(mode="json")}), state)


@flow(name="scaling", log_prints=True, on_cancellation=[mark_arms_killed])
def scaling(spec: ScalingSpec) -> RunSummary:
    """The paper's scaling study: pre-train every model on nested random subsets of the upstream set, transfer each
    (few-shot, and fine-tune with ``finetune``), and plot accuracy against pre-training set size (Figure 4) and
    compute (Figure 5). Finished stages are reused (Cached): adding a size trains only that size.

    Args:
        spec: the study (presets: scaling, scaling-i21k, bit-vs-vit; `vitflow presets`).
    """
    spec = spec.model_copy(update={"base": resolve(spec.base)})
    tracker, parent, ctx = _open(spec)
    status = "FAILED"
    try:
        summary = scaling_aggregate_task(_study(spec, ctx))
        tracker.set_tags(parent, {"vitflow.results_uri": summary.results_uri})
        tracker.flush()
        publish_run_page(summary, ctx)
        run_logger().info("results: %s", summary.report_uri)
        status = "FINISHED"
        return summary
    except TerminationSignal:
        status = "KILLED"
        raise
    finally:
        tracker.finish(parent, status)
