"""The transfer-eval flow: a model reference through a transfer suite, compared with earlier evaluations.

A reference is an MLflow registry alias (``models:/<name>@candidate``), an artifact URI or an official ``.npz``.
When a metric drops by more than ``threshold`` percentage points against the previous evaluation of the same
reference and suite, the MLflow run is tagged, a Prefect artifact names the regressed metrics, and the flow run
fails with a message saying which.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.benchmark import aggregate, open_tracking, prepare_datasets, resolve, transfer
from flows.presets import build_spec
from tasks.common import run_logger
from tasks.compare import compare, find_runs, regressed_metrics
from tasks.models import resolve_model_ref
from tasks.stages import RunSummary
from vit.results import to_markdown


class RegressionDetected(RuntimeError):
    pass


@flow(name="transfer-eval", log_prints=True)
def transfer_eval(
    model: str, suite: str = "fewshot-nightly", threshold: float = 1.0, overrides: dict[str, Any] | None = None
) -> RunSummary:
    """Evaluate ``model`` on the transfer suite of preset ``suite`` and compare with the previous evaluation of
    the same model reference and suite; fails on a drop of more than ``threshold`` percentage points."""
    logger = run_logger()
    spec = build_spec(
        suite, {**(overrides or {}), "init": model, "pretrain": None, "experiment": f"transfer-eval-{suite}"}
    )
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
        tracker.log_metrics(parent, summary.headline)
        tracker.set_tags(parent, {"vitflow.results_uri": summary.results_uri})
        tracker.flush()
        previous = [r for r in find_runs(ctx.tracking_uri, spec.experiment, ref_tags, last=2) if r != parent.id][:1]
        regressions: list[str] = []
        if previous and parent.id:
            table = compare(ctx.tracking_uri, [previous[0], parent.id], threshold, baseline=previous[0])
            regressions = regressed_metrics(table)
            summary.comparison = to_markdown(table)
            logger.info("compared with run %s:\n%s", previous[0], summary.comparison)
        summary.regressions = regressions
        if regressions:
            message = (
                f"{model} on {suite}: {len(regressions)} metric(s) dropped by more than {threshold} points "
                f"since run {previous[0]}: {', '.join(regressions)}"
            )
            tracker.set_tags(parent, {"vitflow.regression": "true", "vitflow.regressed": ", ".join(regressions)})
            _regression_artifact(message, summary.comparison or "")
            raise RegressionDetected(message)
        tracker.set_tags(parent, {"vitflow.regression": "false"})
        status = "FINISHED"
        return summary
    finally:
        tracker.end_run(parent, status)
        if not tracker.wait_flush(30):
            tracker.persist_pending()


def _regression_artifact(message: str, comparison: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        f"# Regression\n\n{message}\n\n{comparison}\n",
        key="regression",
        description="metrics that dropped beyond the threshold",
    )
