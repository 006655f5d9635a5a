"""Running a stage on a work pool instead of in-process: ``run_deployment`` of the stage's deployment, then
reading the stage's result from the artifact store, where the remote worker wrote it (content-addressed, so the
orchestrator knows where to look)."""

from __future__ import annotations

from prefect import task
from prefect.deployments import run_deployment

from tasks import fewshot, train
from tasks.common import read_done, run_logger
from tasks.stages import FewshotResult, FewshotStage, TrainResult, TrainStage, cached_stage

TRAIN_DEPLOYMENT = "train-stage/train-stage"
FEWSHOT_DEPLOYMENT = "fewshot-stage/fewshot-stage"


def _run(deployment: str, run_name: str, stage: TrainStage | FewshotStage) -> dict:
    """Run the stage's deployment and wait; the stage's recorded result once it is there."""
    if (done := read_done(stage.uri)) is not None:
        return done
    run_logger().info("%s: dispatched to the work pool", run_name)
    flow_run = run_deployment(deployment, parameters={"stage": stage}, flow_run_name=run_name, timeout=None)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"{run_name}: run {flow_run.id} of deployment {deployment} ended "
            f"{state.name if state else 'without a state'}"
        )
    if (done := read_done(stage.uri)) is None:
        raise RuntimeError(f"{run_name}: the deployment run finished but wrote no result to {stage.uri}")
    return done


@task(
    name="dispatch-train",
    task_run_name="{stage.title} (work pool)",
    **cached_stage(train.record_reuse),
)
def dispatch_train_task(stage: TrainStage) -> TrainResult:
    """Run a training stage as a ``train-stage`` deployment run and return its stored result."""
    return TrainResult.model_validate(_run(TRAIN_DEPLOYMENT, stage.name, stage))


@task(
    name="dispatch-fewshot",
    task_run_name="fewshot {stage.benchmark} ({stage.model_label}, work pool)",
    **cached_stage(fewshot.record_reuse),
)
def dispatch_fewshot_task(stage: FewshotStage) -> FewshotResult:
    """Run a few-shot evaluation as a ``fewshot-stage`` deployment run and return its stored result."""
    name = f"fewshot:{stage.benchmark}:{stage.model_label}"
    return FewshotResult.model_validate(_run(FEWSHOT_DEPLOYMENT, name, stage))
