"""The benchmark flow — prepare -> pre-train -> transfer (fan-out) -> aggregate — and its subflows.

Reads like the pipeline diagram in DESIGN.md: the flows decide what runs; tasks/ do the work.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import plan
from flows.presets import build_spec
from flows.specs import BenchmarkItem, BenchmarkSpec
from tasks.aggregate import aggregate_task
from tasks.common import TrackingContext, run_logger
from tasks.dispatch import dispatch_fewshot_task, dispatch_train_task
from tasks.evaluate import fewshot_task, init_checkpoint_task
from tasks.models import resolve_model_ref
from tasks.prepare import prepare_dataset_task
from tasks.tracking import Tracker, flatten, git_commit, sync_pending
from tasks.train import train_task
from vit import __version__, storage
from vit.engine.recipes import select_best_lr


def preload_imports(spec: BenchmarkSpec) -> None:
    """Import what the flow's first stages import (MLflow's SQL store, the dataset and report code), for a caller
    that would otherwise sit idle, e.g. while Prefect's temporary server boots: seconds saved off every run."""
    import vit.data.dataset  # noqa: F401
    import vit.data.prepare  # noqa: F401
    import vit.report  # noqa: F401

    if spec.resolved_tracking_uri().startswith("sqlite"):
        with contextlib.suppress(ImportError):  # MLflow's own module: if it moves, the flow imports it later
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def open_tracking(spec: BenchmarkSpec, run_name: str, extra_tags: dict[str, str] | None = None):
    """The flow run's parent MLflow run, and the context its stage runs are created under."""
    from prefect.runtime import flow_run

    uri = spec.resolved_tracking_uri()
    sync_pending(uri, run_logger().info)
    tracker = Tracker(uri)
    artifacts = None if uri.startswith("http") else storage.join(spec.resolved_artifact_root(), "mlflow")
    experiment_id = tracker.experiment_id(spec.experiment, artifact_location=artifacts)
    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": ui_url if (ui_url := str(flow_run.ui_url or "")).startswith("http") else "",
        "vitflow.spec_hash": spec.spec_hash(),
        **(extra_tags or {}),
    }
    parent = tracker.start_run(
        experiment_id,
        run_name,
        None,
        {**tags, "vitflow.version": __version__, "vitflow.git_commit": git_commit(), "vitflow.stage": "flow"},
    )
    tracker.log_params(parent, flatten(spec.model_dump(mode="json")))
    tracker.log_text(parent, json.dumps(spec.model_dump(mode="json"), indent=2), "spec.json")
    ctx = TrackingContext(uri, experiment_id, parent.id, tags)
    return tracker, parent, ctx


def resolve(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Check local inputs and fix the artifact root and tracking URI (defaults come from this machine's
    environment, so a worker's settings apply to the runs it executes)."""
    spec.check_inputs()
    return spec.model_copy(
        update={"artifact_root": spec.resolved_artifact_root(), "tracking_uri": spec.resolved_tracking_uri()}
    )


def _datasets(spec: BenchmarkSpec) -> dict[str, Any]:
    items = {spec.pretrain.dataset.name: spec.pretrain.dataset} if spec.pretrain else {}
    items.update({b.dataset.name: b.dataset for b in spec.transfer.benchmarks})
    return items


@flow(name="prepare-datasets", log_prints=True)
def prepare_datasets(
    preset: str = "demo",
    overrides: dict[str, Any] | None = None,
    spec: BenchmarkSpec | None = None,
    tracking: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Prepare every dataset a spec names (already-prepared ones are found by fingerprint and reused)."""
    spec = spec or resolve(build_spec(preset, overrides or {}))
    root = spec.resolved_artifact_root()
    storage.check_writable(root)
    parent = None
    if tracking is None:
        tracker, parent, ctx = open_tracking(spec, "prepare-datasets", {"vitflow.preset": preset})
        tracking = ctx.to_dict()
    futures = {
        name: prepare_dataset_task.submit(name, d.source, d.options, d.max_corrupt_fraction, root, tracking, spec.seed)
        for name, d in _datasets(spec).items()
    }
    try:
        return {name: f.result() for name, f in futures.items()}
    finally:
        if parent is not None:
            tracker.finish(parent)


@flow(name="pretrain", log_prints=True)
def pretrain(spec: BenchmarkSpec, tracking: dict[str, Any], dataset: dict[str, Any]) -> dict[str, Any]:
    """Pre-train on the upstream dataset (resuming from its checkpoint) and register the model with an alias."""
    assert spec.pretrain is not None
    config, key = plan.pretrain_config(spec, dataset["uri"])
    register = {
        "name": spec.pretrain.registered_model or f"{spec.experiment}-{spec.model.name}",
        "alias": spec.pretrain.alias,
    }
    return train_task(
        "pretrain",
        f"pretrain:{spec.model.name}",
        key,
        config,
        spec.resolved_artifact_root(),
        plan.launch(spec),
        tracking,
        [dataset],
        register=register,
        tags={"vitflow.fingerprint": dataset["fingerprint"]},
    )


def _submit_finetune(
    spec: BenchmarkSpec,
    bench: BenchmarkItem,
    dataset: dict[str, Any],
    label: str,
    init: str,
    lr: float,
    seed: int,
    final: bool,
    tracking: dict[str, Any],
):
    """One fine-tune, in this process's task runner or as a run of the ``train-stage`` deployment."""
    config, key, test = plan.finetune_config(spec, bench, dataset["uri"], init, lr, seed, final)
    suffix = "" if label == "pretrained" else f":{label}"
    name = f"finetune:{bench.name}:lr={lr:g}{suffix}" + (f":seed={seed}" if final and seed else "")
    tags = {
        "vitflow.benchmark": bench.name,
        "vitflow.model_label": label,
        "vitflow.lr": f"{lr:g}",
        "vitflow.phase": "final" if final else "sweep",
        "vitflow.fingerprint": dataset["fingerprint"],
    }
    parameters = {
        "kind": "finetune",
        "key": key,
        "config": config,
        "artifact_root": spec.resolved_artifact_root(),
        "launch": plan.launch(spec),
        "tracking": tracking,
        "datasets": [dataset],
        "test": test,
        "tags": tags,
    }
    if spec.compute.dispatch == "deployments":
        return dispatch_train_task.submit(name, parameters)
    return train_task.submit(run_name=name, **parameters)


def _submit_fewshot(
    spec: BenchmarkSpec,
    bench: BenchmarkItem,
    dataset: dict[str, Any],
    label: str,
    init: str,
    image_size: int | None,
    tracking: dict[str, Any],
):
    train_split, test_split = plan.fewshot_splits(bench)
    fs = spec.transfer.fewshot
    parameters = {
        "model_uri": init,
        "dataset": dataset,
        "train_split": train_split,
        "test_split": test_split,
        "shots": fs.shots,
        "seeds": fs.seeds,
        "l2": fs.l2,
        "image_size": image_size,
        "artifact_root": spec.resolved_artifact_root(),
        "tracking": tracking,
        "tags": {"vitflow.benchmark": bench.name, "vitflow.model_label": label},
    }
    if spec.compute.dispatch == "deployments":
        return dispatch_fewshot_task.submit(bench.name, label, parameters)
    return fewshot_task.submit(benchmark=bench.name, model_label=label, **parameters)


@flow(name="transfer", log_prints=True)
def transfer(
    spec: BenchmarkSpec, tracking: dict[str, Any], datasets: dict[str, dict[str, Any]], models: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """Fine-tune (learning-rate sweep, then final runs per seed) and few-shot every benchmark, for each model
    (``pretrained``, and ``scratch`` for the from-scratch baseline), fanned out over the task runner or, with
    ``compute.dispatch=deployments``, over a work pool."""
    logger = run_logger()
    ft = spec.transfer.finetune
    fewshot_size = spec.transfer.fewshot.image_size or (spec.pretrain.image_size if spec.pretrain else None)
    fewshots, sweeps = [], []
    for bench in spec.transfer.benchmarks:
        dataset = datasets[bench.dataset.name]
        for label, init in models.items():
            if bench.fewshot and spec.transfer.fewshot.enabled:
                future = _submit_fewshot(spec, bench, dataset, label, init, fewshot_size, tracking)
                fewshots.append(((bench.name, label), future))
            if bench.finetune:
                for lr in plan.sweep_lrs(spec, plan.finetune_recipe(spec, bench)):
                    future = _submit_finetune(spec, bench, dataset, label, init, lr, ft.seeds[0], False, tracking)
                    sweeps.append(((bench.name, label, lr), future))
    sweep_records = [{"benchmark": b, "model": label, "lr": lr, **f.result()} for (b, label, lr), f in sweeps]
    finals = []
    for bench in spec.transfer.benchmarks:
        if not bench.finetune:
            continue
        for label, init in models.items():
            scores = {
                r["lr"]: r["metrics"]["val/top1"]
                for r in sweep_records
                if r["benchmark"] == bench.name and r["model"] == label
            }
            best = select_best_lr(scores) if scores else plan.finetune_recipe(spec, bench).lrs[0]
            if scores:
                logger.info("%s (%s): best learning rate %g (val top-1 %.4f)", bench.name, label, best, scores[best])
            for seed in ft.seeds:
                future = _submit_finetune(
                    spec, bench, datasets[bench.dataset.name], label, init, best, seed, True, tracking
                )
                finals.append(((bench.name, label, best, seed), future))
    return {
        "sweeps": sweep_records,
        "finals": [
            {"benchmark": b, "model": label, "lr": lr, "seed": seed, **f.result()} for (b, label, lr, seed), f in finals
        ],
        "fewshot": [{"benchmark": b, "model": label, **f.result()} for (b, label), f in fewshots],
    }


@flow(name="aggregate", log_prints=True)
def aggregate(
    spec: BenchmarkSpec,
    tracking: dict[str, Any],
    results: dict[str, Any],
    pretrained: dict[str, Any] | None,
    datasets: dict[str, dict[str, Any]],
    model_uri: str,
) -> dict[str, Any]:
    """One results table, the paper's numbers beside ours, the report and the analysis figures."""
    return aggregate_task(spec.model_dump(mode="json"), tracking, results, pretrained, datasets, model_uri)


@flow(name="benchmark", log_prints=True)
def benchmark(
    preset: str = "demo",
    overrides: dict[str, Any] | None = None,
    spec: BenchmarkSpec | None = None,
    dispatch: Literal["local", "deployments"] | None = None,
) -> dict[str, Any]:
    """The whole protocol of the paper for one model: prepare the datasets, pre-train (or start from ``init``),
    transfer to every benchmark, and aggregate. ``preset`` + ``overrides`` (``{"pretrain.steps": 100}``) build the
    spec unless ``spec`` is given; ``dispatch`` overrides ``compute.dispatch`` (``deployments``: each fine-tune and
    evaluation runs on a work pool). Finished stages are reused; an interrupted run resumes where it stopped."""
    spec = resolve(spec or build_spec(preset, overrides or {}))
    if dispatch is not None:
        spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"dispatch": dispatch})})
    logger = run_logger()
    tracker, parent, ctx = open_tracking(spec, f"benchmark:{spec.experiment}", {"vitflow.preset": preset})
    tracking = ctx.to_dict()
    status = "FAILED"
    try:
        datasets = prepare_datasets(spec=spec, tracking=tracking)
        pretrained = None
        if spec.pretrain is not None:
            pretrained = pretrain(spec, tracking, datasets[spec.pretrain.dataset.name])
            models = {"pretrained": pretrained["model_uri"]}
        else:
            source, resolved = resolve_model_ref(spec.init, ctx.tracking_uri)
            tracker.set_tags(parent, {"vitflow.init": spec.init, **{f"vitflow.{k}": v for k, v in resolved.items()}})
            models = {"pretrained": source}
        if spec.transfer.from_scratch_baseline:
            size = spec.pretrain.image_size if spec.pretrain else spec.transfer.finetune.image_size
            models["scratch"] = init_checkpoint_task(
                spec.model.name,
                size,
                spec.seed,
                spec.resolved_artifact_root(),
                {"gelu_approximate": spec.model.gelu_approximate},
            )
        runner = ThreadPoolTaskRunner(max_workers=spec.compute.max_parallel)
        results = transfer.with_options(task_runner=runner)(spec, tracking, datasets, models)
        summary = aggregate(spec, tracking, results, pretrained, datasets, models["pretrained"])
        tracker.log_metrics(parent, summary.get("headline", {}))
        tracker.set_tags(parent, {"vitflow.results_uri": summary["results_uri"]})
        logger.info("results: %s", summary["report_uri"])
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(parent, status)
