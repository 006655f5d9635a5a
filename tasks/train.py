"""Prefect task: one training stage (pre-training, or one fine-tune at one learning rate).

The stage's output folder is content-addressed: a finished stage is skipped (its recorded result is returned and
logged to a child run tagged ``vitflow.cached``), an interrupted one resumes from its last checkpoint. Training
runs in a subprocess (``torchrun`` for several processes) whose output streams into this task's log and whose
metrics stream into the stage's MLflow run.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from prefect import task

from tasks.common import claim_stage, local_workdir, run_logger, start_stage_run, write_done
from tasks.launch import run_training
from tasks.models import CHECKPOINT_TAG, log_checkpoint
from tasks.prepare import log_dataset_input
from tasks.stages import TestEval, TrainResult, TrainStage, cached_stage
from tasks.tracking import RunRef, Tracker, flatten, forward_events
from vit import storage


class _Progress:
    """Training progress for people: a Prefect progress artifact (when in a run) and, at most every
    ``every_s`` seconds, a log line with step, loss, throughput and the time left."""

    def __init__(self, name: str, total: int, log: Any, every_s: float = 20.0):
        self.name, self.total, self.log, self.every_s = name, max(total, 1), log, every_s
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.last_log = 0.0
        self.artifact_id = None
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:  # outside a run the call would start a temporary Prefect server
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, description="training progress (%)")

    def __call__(self, event: dict[str, Any]) -> None:
        step = int(event["step"])
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, min(100.0, 100.0 * step / self.total))
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.started = step, now
            return
        if now - self.last_log < self.every_s and step < self.total:
            return
        self.last_log = now
        rate = (step - self.first_step) / max(now - self.started, 1e-9)  # resumed runs count from their start
        left = (self.total - step) / rate if rate > 0 else float("nan")
        self.log(
            "%s: step %d/%d (%d%%) · loss %.3f · %.0f img/s · %s left",
            self.name,
            step,
            self.total,
            100 * step // self.total,
            event.get("train/loss", float("nan")),
            event.get("train/images_per_s", float("nan")),
            f"{left // 60:.0f}m{left % 60:02.0f}s" if left == left else "?",
        )


def _system_metrics(run_id: str | None, tracking_uri: str):
    if run_id is None:
        return None
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its start/stop/skip-GPU INFO lines repeat for every stage and drown the flow's own log
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # system metrics are a nicety, never a reason to fail
        return None


class _Events:
    """Where the training process's events go: MLflow (every event), the progress artifact and log, warnings."""

    def __init__(self, stage: TrainStage, tracker: Tracker, run: RunRef, logger: Any):
        self.stage, self.tracker, self.run, self.logger = stage, tracker, run, logger
        self.progress: _Progress | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        forward_events(self.tracker, self.run, [event])
        name = self.stage.name
        if event["event"] == "start":
            self.progress = _Progress(name, event["total_steps"], self.logger.info)
            if event.get("resumed_from"):
                self.logger.info("%s: resuming from the checkpoint at step %s", name, event["resumed_from"])
                self.tracker.set_tags(self.run, {"vitflow.resumed_from": event["resumed_from"]})
        elif event["event"] == "metrics" and self.progress is not None:
            self.progress(event)
        elif event["event"] == "warning":
            self.logger.warning("%s: %s", name, event.get("message"))


def _open_run(stage: TrainStage, cached: bool) -> tuple[Tracker, RunRef]:
    """The stage's MLflow run, with its parameters and datasets, tagged as reused or not."""
    tags = {**stage.tags, "vitflow.stage_uri": stage.uri, "vitflow.cached": str(cached).lower()}
    tracker, run = start_stage_run(stage.tracking, stage.name, stage.kind, tags, params=flatten(stage.config.to_dict()))
    for ref in stage.datasets:
        log_dataset_input(tracker, run, ref, "training" if ref is stage.datasets[0] else "evaluation")
    return tracker, run


def record_reuse(stage: TrainStage, result: TrainResult) -> None:
    """The MLflow run of a stage found finished: its recorded metrics, tagged ``vitflow.cached``."""
    run_logger().info("%s: finished earlier, reusing %s", stage.name, stage.uri)
    tracker, run = _open_run(stage, cached=True)
    tracker.log_metrics(run, result.metrics, result.step)
    tracker.set_tags(run, {"vitflow.model_uri": result.model_uri})
    tracker.finish(run)


@task(
    name="train",
    task_run_name="{stage.title}",
    retries=1,
    retry_delay_seconds=5,
    **cached_stage(record_reuse),
)
def train_task(stage: TrainStage) -> TrainResult:
    """Train (or reuse) one stage: a Prefect cache hit when the stage folder holds its result; else the folder's
    ``_done.json`` (a stage another run finished) or its last checkpoint (an interrupted one) is where it resumes."""
    with claim_stage(stage.uri) as done:  # one run trains a stage at a time; a concurrent one waits and reuses it
        if done is not None:
            result = TrainResult.model_validate(done)
            record_reuse(stage, result)
            return result
        return _train(stage)


def _train(stage: TrainStage) -> TrainResult:
    tracker, run = _open_run(stage, cached=False)
    monitor = _system_metrics(run.id, stage.tracking.tracking_uri)
    try:
        result = _run_stage(stage, tracker, run)
        write_done(stage.uri, result.model_dump(mode="json"))
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    tracker.finish(run)
    return result


def _run_stage(stage: TrainStage, tracker: Tracker, run: RunRef) -> TrainResult:
    """Train in a child process, test the final weights, log them, register them."""
    logger = run_logger()
    cfg = copy.deepcopy(stage.config)
    cfg.checkpoint.dir = storage.join(stage.uri, "checkpoints")
    workdir = local_workdir(stage.uri)
    with stage.launch.slots():
        out = run_training(cfg, workdir, stage.launch, _Events(stage, tracker, run, logger), logger.info)
    metrics = {k: v for k, v in out["eval"].items() if k.startswith("val/") and k != "val/count"}
    if stage.test is not None:
        from vit.engine.callbacks import JsonlLog

        started = time.time()
        metrics.update(_test_metrics(out["model_uri"], cfg.data.dataset, stage.test, cfg.batch_size))
        # when the test evaluation ran, in the stage's event log beside the engine's own events
        JsonlLog(workdir / "events.jsonl")("test", out["step"], {"start": started})
    reg = stage.registration
    model = None
    if reg is not None or stage.test is not None:  # the models people load: pre-trained, and final fine-tunes
        model = log_checkpoint(tracker, run, stage.tracking.experiment_id, out["model_uri"], workdir / "mlflow")
    tracker.log_metrics(run, metrics, out["step"], model=model)
    tracker.set_tags(run, {"vitflow.model_uri": out["model_uri"]})
    if storage.is_s3(stage.uri):  # the event log beside the checkpoints, for the curves of later reports
        storage.upload(workdir / "events.jsonl", storage.join(stage.uri, "events.jsonl"))
    version = None
    if reg is not None:
        version = tracker.register_model(reg.name, model, reg.alias, run, {CHECKPOINT_TAG: out["model_uri"]})
        reference = f"models:/{reg.name}" + (f"@{reg.alias}" if reg.alias else "")
        tracker.set_tags(run, {"vitflow.registered_model": reference})
    return TrainResult(
        kind=stage.kind,
        name=stage.name,
        stage_uri=stage.uri,
        model_uri=out["model_uri"],
        metrics=metrics,
        step=out["step"],
        run_id=run.id,
        model_version=version,
    )


def _test_metrics(model_uri: str, dataset_uri: str, test: TestEval, batch_size: int) -> dict[str, float]:
    import torch

    from vit import load_pretrained
    from vit.engine.transfer import evaluate_split

    model = load_pretrained(model_uri).to("cuda" if torch.cuda.is_available() else "cpu")
    out = evaluate_split(model, dataset_uri, test.split, test.transform, min(batch_size, 256), real=test.real)
    metrics = {"test/top1": out["top1"], "test/count": out["count"]}
    if "real_top1" in out:
        metrics.update({"test/real_top1": out["real_top1"], "test/real_count": out["real_count"]})
    return metrics
