"""Single-stage flows for ``dispatch=deployments``: each fine-tune or few-shot evaluation of a benchmark becomes
its own flow run on a work pool (GPU workers), and writes its result to the artifact store."""

from __future__ import annotations

from prefect import flow

from tasks.fewshot import fewshot_task
from tasks.stages import FewshotResult, FewshotStage, TrainResult, TrainStage, result_store
from tasks.train import train_task


@flow(name="train-stage", log_prints=True)
def train_stage(stage: TrainStage) -> TrainResult:
    """One training stage (a fine-tune at one learning rate, or pre-training), run by a worker."""
    return train_task.with_options(result_storage=result_store())(stage)


@flow(name="fewshot-stage", log_prints=True)
def fewshot_stage(stage: FewshotStage) -> FewshotResult:
    """Few-shot linear evaluation of one model on one benchmark, run by a worker."""
    return fewshot_task.with_options(result_storage=result_store())(stage)
