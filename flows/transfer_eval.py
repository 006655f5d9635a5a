"""The transfer-eval flow: a model reference through a transfer suite, judged against a baseline the team chose.

A reference is an MLflow registry alias (``models:/<name>@candidate``), an artifact URI or an official ``.npz``. The
baseline is the evaluation of the version another alias of the same registered model points at (``@champion``,
moved by ``vitflow promote`` after a review) or the best of the last N evaluations of the same reference. A metric
regresses when it drops by more than both ``threshold`` percentage points and the seeds' spread; the flow run then
fails naming the regressed metrics. Every run publishes its comparison as a table artifact (regressed rows first)
and says which model version it evaluated and whether the reference moved since the previous evaluation.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.benchmark import aggregate, open_tracking, prepare_datasets, resolve, transfer
from flows.presets import build_spec
from tasks.aggregate import publish_run_page
from tasks.common import run_logger
from tasks.compare import BaselineChoice, evaluation, judge, publish_verdict
from tasks.models import resolve_model_ref
from tasks.registry_ops import require_registered
from tasks.results import to_markdown
from tasks.stages import RunSummary


class RegressionDetected(RuntimeError):
    pass


@flow(name="transfer-eval", log_prints=True)
def transfer_eval(
    model: str,
    suite: str = "fewshot-nightly",
    threshold: float = 1.0,
    baseline: BaselineChoice | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunSummary:
    """Evaluate ``model`` on the transfer suite of preset ``suite`` and compare with ``baseline`` (default: the
    evaluation of the version aliased @champion); fails on a drop beyond ``threshold`` points and the seeds' spread."""
    choice = baseline or BaselineChoice()
    spec = build_spec(
        suite, {**(overrides or {}), "init": model, "pretrain": None, "experiment": f"transfer-eval-{suite}"}
    )
    require_registered(model, spec.resolved_tracking_uri())
    # A registry reference names no file: resolve it first, so the spec holds (and checks) the checkpoint evaluated.
    source, resolved = resolve_model_ref(model, spec.resolved_tracking_uri())
    spec = resolve(spec.model_copy(update={"init": source}))
    ref_tags = {"vitflow.model_ref": model, "vitflow.suite": suite}
    tracker, parent, ctx = open_tracking(spec, f"transfer-eval:{suite}", ref_tags)
    status = "FAILED"
    try:
        tracker.set_tags(parent, {f"vitflow.{k}": v for k, v in resolved.items()})
        tracking = ctx
        datasets = prepare_datasets(spec=spec, tracking=tracking)
        runner = ThreadPoolTaskRunner(max_workers=spec.compute.max_parallel)
        results = transfer.with_options(task_runner=runner)(spec, tracking, datasets, {"pretrained": source})
        summary = aggregate(spec, tracking, results, None, datasets, source)
        tracker.set_tags(parent, {"vitflow.results_uri": summary.results_uri})
        publish_run_page(summary, tracking)
        if not tracker.flush() or parent.id is None:  # the results are kept; judging them needs MLflow
            run_logger().warning("MLflow unreachable: %s evaluated, not compared with a baseline", model)
            status = "FINISHED"
            return summary
        evaluated = evaluation(ctx.tracking_uri, spec.experiment, ref_tags, resolved, parent.id)
        verdict = judge(ctx.tracking_uri, spec.experiment, evaluated, choice, threshold)
        tracker.set_tags(parent, verdict.tags())
        publish_verdict(verdict)
        run_logger().info("%s\n%s", verdict.message(), to_markdown(verdict.table))
        summary.comparison, summary.regressions = to_markdown(verdict.table), verdict.regressions
        if verdict.regressions:
            raise RegressionDetected(verdict.message())
        status = "FINISHED"
        return summary
    finally:
        tracker.finish(parent, status)
