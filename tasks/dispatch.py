"""Running a stage on a work pool instead of in-process: ``run_deployment`` of the stage's deployment, then
reading the stage's result from the artifact store, where the remote worker wrote it (content-addressed, so the
orchestrator knows where to look)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.deployments import run_deployment

from tasks.common import read_done, run_logger, stage_uri

TRAIN_DEPLOYMENT = "train-stage/train-stage"
FEWSHOT_DEPLOYMENT = "fewshot-stage/fewshot-stage"


def _run(deployment: str, run_name: str, parameters: dict[str, Any]) -> None:
    flow_run = run_deployment(deployment, parameters=parameters, flow_run_name=run_name, timeout=None)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"{run_name}: run {flow_run.id} of deployment {deployment} ended "
            f"{state.name if state else 'without a state'}"
        )


@task(name="dispatch-train", task_run_name="{run_name} (work pool)", cache_policy=NONE)
def dispatch_train_task(run_name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run ``train_task``'s parameters as a ``train-stage`` deployment run and return its stored result."""
    p = parameters
    uri = stage_uri(p["artifact_root"], p["kind"], run_name, p["key"])
    if (done := read_done(uri)) is None:
        run_logger().info("%s: dispatched to the work pool", run_name)
        _run(TRAIN_DEPLOYMENT, run_name, {**parameters, "run_name": run_name})
        done = read_done(uri)
    if done is None:
        raise RuntimeError(f"{run_name}: the deployment run finished but wrote no result to {uri}")
    return done


@task(name="dispatch-fewshot", task_run_name="fewshot:{benchmark}:{model_label} (work pool)", cache_policy=NONE)
def dispatch_fewshot_task(benchmark: str, model_label: str, parameters: dict[str, Any]) -> dict[str, Any]:
    from tasks.evaluate import fewshot_stage_uri

    uri = fewshot_stage_uri(benchmark=benchmark, model_label=model_label, **parameters)
    if (done := read_done(uri)) is None:
        _run(
            FEWSHOT_DEPLOYMENT,
            f"fewshot:{benchmark}:{model_label}",
            {**parameters, "benchmark": benchmark, "model_label": model_label},
        )
        done = read_done(uri)
    if done is None:
        raise RuntimeError(f"fewshot:{benchmark}: the deployment run finished but wrote no result to {uri}")
    return done
