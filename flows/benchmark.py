"""The benchmark flow — prepare -> pre-train -> transfer (fan-out) -> aggregate — and its subflows.

Reads like the pipeline diagram in DESIGN.md: the flows decide what runs; tasks/ do the work.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any, Literal

from prefect import Task, flow
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import plan
from flows.presets import PRESET_TAG
from flows.specs import BenchmarkItem, BenchmarkSpec
from tasks.aggregate import aggregate_task, publish_run_page
from tasks.common import TrackingContext, run_logger
from tasks.dispatch import dispatch_fewshot_task, dispatch_train_task
from tasks.fewshot import fewshot_task, init_checkpoint_task
from tasks.models import resolve_model_ref
from tasks.prepare import prepare_dataset_task
from tasks.stages import (
    DatasetRef,
    FewshotOutcome,
    FinetuneOutcome,
    RunSummary,
    TrainResult,
    TransferResults,
    result_store,
)
from tasks.tracking import RunRef, Tracker, flatten, git_commit, sync_pending
from tasks.train import train_task
from vit import __version__, storage
from vit.engine.recipes import select_best_lr


def preload_imports(spec: BenchmarkSpec) -> None:
    """Import what the flow's first stages import (MLflow's SQL store, the dataset and report code), for a caller
    that would otherwise sit idle, e.g. while Prefect's temporary server boots: seconds saved off every run."""
    import tasks.report  # noqa: F401

    if spec.resolved_tracking_uri().startswith("sqlite"):
        with contextlib.suppress(ImportError):  # MLflow's own module: if it moves, the flow imports it later
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def open_tracking(
    spec: BenchmarkSpec, run_name: str, extra_tags: dict[str, str] | None = None
) -> tuple[Tracker, RunRef, TrackingContext]:
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
    parent = _continued_parent(tracker, experiment_id, tags["prefect.flow_run_id"])
    if parent is None:
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


def _flow_run_filter(flow_run_id: str) -> str:
    return f"tags.`prefect.flow_run_id` = '{flow_run_id}'"


def _continued_parent(tracker: Tracker, experiment_id: str, flow_run_id: str) -> RunRef | None:
    """The parent MLflow run an earlier attempt of this flow run started: one flow run, one parent run."""
    if not flow_run_id:
        return None
    query = f"{_flow_run_filter(flow_run_id)} and tags.`vitflow.stage` = 'flow'"
    return tracker.continue_run(experiment_id, query, "parent")


def mark_runs_killed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect's on_cancellation hook (run by the worker or runner that killed the flow run's process): every
    MLflow run of the flow run not finished ends KILLED (those the killed process ended FAILED as it went)."""
    spec = BenchmarkSpec.model_validate(flow_run.parameters["spec"])
    tracker = Tracker(spec.resolved_tracking_uri())
    experiment = tracker.client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return
    for run in tracker.client.search_runs(
        [experiment.experiment_id], f"{_flow_run_filter(str(flow_run.id))} and attributes.status != 'FINISHED'"
    ):
        tracker.client.set_terminated(run.info.run_id, "KILLED")


def run_preset() -> str | None:
    """The preset this flow run's spec came from, when known: the ``preset:<name>`` tag its deployment (one per
    preset) or ``vitflow run PRESET`` gave it."""
    from prefect.runtime import flow_run

    return next((t.removeprefix(PRESET_TAG) for t in flow_run.tags or () if t.startswith(PRESET_TAG)), None)


def preset_tags() -> dict[str, str]:
    """``vitflow.preset`` for the parent MLflow run, where the preset is known."""
    return {"vitflow.preset": preset} if (preset := run_preset()) else {}


def parent_run_name(spec: BenchmarkSpec) -> str:
    """The parent MLflow run's name: what ran (the preset, else the experiment), on which model, when
    (``demo vit_micro_4 2026-12-01 23:20``)."""
    from datetime import datetime

    return f"{run_preset() or spec.experiment} {spec.model.name} {datetime.now():%Y-%m-%d %H:%M}"


def resolve(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Check local inputs and fix the artifact root and tracking URI (defaults come from this machine's
    environment, so a worker's settings apply to the runs it executes)."""
    spec.check_inputs()
    return spec.model_copy(
        update={"artifact_root": spec.resolved_artifact_root(), "tracking_uri": spec.resolved_tracking_uri()}
    )


def submit_prepares(spec: BenchmarkSpec, tracking: TrackingContext) -> dict[str, PrefectFuture]:
    storage.check_writable(spec.resolved_artifact_root())
    return {name: prepare_dataset_task.submit(stage) for name, stage in plan.dataset_stages(spec, tracking).items()}


@flow(name="prepare-datasets", log_prints=True)
def prepare_datasets(spec: BenchmarkSpec, tracking: TrackingContext | None = None) -> dict[str, DatasetRef]:
    """Prepare every dataset a spec names (already-prepared ones are found by fingerprint and reused).

    Args:
        spec: the spec whose datasets are prepared (each deployment starts from its preset's).
        tracking: the MLflow parent run to log under (set by a calling flow); empty: a parent run of its own.
    """
    parent = None
    if tracking is None:
        spec = resolve(spec)
        tracker, parent, tracking = open_tracking(spec, "prepare-datasets", preset_tags())
    futures = submit_prepares(spec, tracking)
    try:
        return {name: f.result() for name, f in futures.items()}
    finally:
        if parent is not None:
            tracker.finish(parent)


def _stage_tasks(spec: BenchmarkSpec) -> tuple[Task, Task]:
    """The train and few-shot tasks: in this process, or dispatched to the work pool; results in the artifact store."""
    store = result_store()
    remote = spec.compute.dispatch == "deployments"
    train, fewshot = (dispatch_train_task, dispatch_fewshot_task) if remote else (train_task, fewshot_task)
    return train.with_options(result_storage=store), fewshot.with_options(result_storage=store)


class _Transfer:
    """The transfer flow's fan-out: few-shot and sweep runs at once; each (benchmark, model)'s final runs as soon
    as its own sweep is over (``as_completed``), not after every benchmark's sweep."""

    def __init__(self, spec: BenchmarkSpec, tracking: TrackingContext, datasets: dict[str, DatasetRef]):
        self.spec, self.tracking, self.datasets = spec, tracking, datasets
        self.train, self.fewshot = _stage_tasks(spec)
        self.fewshots: list[tuple[str, str, PrefectFuture]] = []
        self.sweeps: dict[PrefectFuture, tuple[BenchmarkItem, tuple[str, str], float]] = {}
        self.finals: list[tuple[str, str, float, int, PrefectFuture]] = []

    def submit(self, models: dict[str, str]) -> None:
        """Few-shot and sweep runs of every benchmark and model; the final runs of those with nothing to sweep."""
        for bench in self.spec.transfer.benchmarks:
            dataset = self.datasets[bench.dataset.name]
            for model in models.items():
                if bench.fewshot and self.spec.transfer.fewshot.enabled:
                    stage = plan.fewshot_stage(self.spec, bench, dataset, model, self.tracking)
                    self.fewshots.append((bench.name, model[0], self.fewshot.submit(stage)))
                if not bench.finetune:
                    continue
                lrs = plan.sweep_lrs(self.spec, plan.finetune_recipe(self.spec, bench))
                seed = self.spec.transfer.finetune.seeds[0]
                for lr in lrs:
                    stage = plan.finetune_stage(self.spec, bench, dataset, model, lr, seed, False, self.tracking)
                    self.sweeps[self.train.submit(stage)] = (bench, model, lr)
                if not lrs:
                    self.submit_finals(bench, model, plan.finetune_recipe(self.spec, bench).lrs[0])

    def submit_finals(self, bench: BenchmarkItem, model: tuple[str, str], lr: float) -> None:
        dataset = self.datasets[bench.dataset.name]
        for seed in self.spec.transfer.finetune.seeds:
            stage = plan.finetune_stage(self.spec, bench, dataset, model, lr, seed, True, self.tracking)
            self.finals.append((bench.name, model[0], lr, seed, self.train.submit(stage)))

    def sweep_and_finals(self) -> list[FinetuneOutcome]:
        """Wait for the sweeps; start each (benchmark, model)'s final runs with its best learning rate as soon as
        its last sweep run is over. Returns the sweep outcomes."""
        left = Counter((bench.name, label) for bench, (label, _), _ in self.sweeps.values())
        seed = self.spec.transfer.finetune.seeds[0]
        outcomes = []
        for future in as_completed(list(self.sweeps)):
            bench, model, lr = self.sweeps[future]
            outcomes.append(
                FinetuneOutcome(benchmark=bench.name, model=model[0], lr=lr, seed=seed, result=future.result())
            )
            left[bench.name, model[0]] -= 1
            if left[bench.name, model[0]] == 0:
                self.submit_finals(bench, model, self._best_lr(outcomes, bench.name, model[0]))
        return outcomes

    @staticmethod
    def _best_lr(outcomes: list[FinetuneOutcome], bench: str, label: str) -> float:
        scores = {o.lr: o.result.metrics["val/top1"] for o in outcomes if (o.benchmark, o.model) == (bench, label)}
        best = select_best_lr(scores)
        run_logger().info("%s (%s): best learning rate %g (val top-1 %.4f)", bench, label, best, scores[best])
        return best

    def results(self, sweeps: list[FinetuneOutcome]) -> TransferResults:
        finals = [
            FinetuneOutcome(benchmark=b, model=label, lr=lr, seed=seed, result=f.result())
            for b, label, lr, seed, f in self.finals
        ]
        fewshot = [FewshotOutcome(benchmark=b, model=label, result=f.result()) for b, label, f in self.fewshots]
        return TransferResults(sweeps=sweeps, finals=finals, fewshot=fewshot)


@flow(name="transfer", flow_run_name="transfer {spec.experiment}", log_prints=True)
def transfer(
    spec: BenchmarkSpec, tracking: TrackingContext, datasets: dict[str, DatasetRef], models: dict[str, str]
) -> TransferResults:
    """Fine-tune (learning-rate sweep, then final runs per seed) and few-shot every benchmark, for each model
    (``pretrained``, and ``scratch`` for the from-scratch baseline), fanned out over the task runner or, with
    ``compute.dispatch=deployments``, over a work pool."""
    fan_out = _Transfer(spec, tracking, datasets)
    fan_out.submit(models)
    return fan_out.results(fan_out.sweep_and_finals())


@flow(name="aggregate", flow_run_name="aggregate {spec.experiment}", log_prints=True)
def aggregate(
    spec: BenchmarkSpec,
    tracking: TrackingContext,
    results: TransferResults,
    pretrained: TrainResult | None,
    datasets: dict[str, DatasetRef],
    model_uri: str,
) -> RunSummary:
    """One results table, the paper's numbers beside ours, the report and the analysis figures."""
    return aggregate_task(plan.aggregate_stage(spec, tracking, results, pretrained, datasets, model_uri))


def _models(
    spec: BenchmarkSpec, tracker: Tracker, parent: RunRef, tracking: TrackingContext
) -> tuple[dict[str, str], TrainResult | None, dict[str, DatasetRef]]:
    """Prepare the datasets, pre-train as soon as the upstream one is ready (or resolve ``init``) and initialise
    the from-scratch baseline meanwhile: the models transfer starts from, pre-training's result, the datasets."""
    prepared = submit_prepares(spec, tracking)
    scratch = None
    if spec.transfer.from_scratch_baseline:
        scratch = init_checkpoint_task.submit(
            spec.model.name,
            plan.upstream_size(spec),
            spec.seed,
            spec.resolved_artifact_root(),
            spec.model.gelu_approximate,
        )
    pretrained = None
    if spec.pretrain is not None:
        stage = plan.pretrain_stage(spec, prepared[spec.pretrain.dataset.name].result(), tracking)
        pretrained = train_task.with_options(result_storage=result_store())(stage)
        models = {plan.PRETRAINED: pretrained.model_uri}
    else:
        source, resolved = resolve_model_ref(spec.init, tracking.tracking_uri)
        tracker.set_tags(parent, {"vitflow.init": spec.init, **{f"vitflow.{k}": v for k, v in resolved.items()}})
        models = {plan.PRETRAINED: source}
    if scratch is not None:
        models[plan.SCRATCH] = scratch.result()
    return models, pretrained, {name: f.result() for name, f in prepared.items()}


@flow(name="benchmark", log_prints=True, on_cancellation=[mark_runs_killed])
def benchmark(spec: BenchmarkSpec, dispatch: Literal["local", "deployments"] | None = None) -> RunSummary:
    """The whole protocol of the paper for one model: prepare the datasets, pre-train (or start from ``init``),
    transfer to every benchmark, and aggregate. Finished stages are reused (Cached); an interrupted run resumes
    where it stopped.

    Args:
        spec: what to run; each deployment (one per preset, e.g. benchmark/demo) fills in its preset's spec.
        dispatch: local (here) or deployments (each fine-tune on a work pool); empty: the spec's compute.dispatch.
    """
    spec = resolve(spec)
    if dispatch is not None:
        spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"dispatch": dispatch})})
    logger = run_logger()
    tracker, parent, ctx = open_tracking(spec, parent_run_name(spec), preset_tags())
    status = "FAILED"
    try:
        models, pretrained, datasets = _models(spec, tracker, parent, ctx)
        runner = ThreadPoolTaskRunner(max_workers=spec.compute.max_parallel)
        results = transfer.with_options(task_runner=runner)(spec, ctx, datasets, models)
        summary = aggregate(spec, ctx, results, pretrained, datasets, models[plan.PRETRAINED])
        tracker.set_tags(parent, {"vitflow.results_uri": summary.results_uri})
        tracker.flush()
        publish_run_page(summary, ctx)
        logger.info("results: %s", summary.report_uri)
        status = "FINISHED"
        return summary
    except TerminationSignal:  # cancelled: the worker or runner terminates the flow run's process
        status = "KILLED"
        raise
    finally:
        tracker.finish(parent, status)
