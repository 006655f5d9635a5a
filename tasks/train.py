"""Prefect task: one training stage (pre-training, or one fine-tune at one learning rate).

The stage's output folder is content-addressed: a finished stage is skipped (its recorded result is returned and
logged to a child run tagged ``vitflow.cached``), an interrupted one resumes from its last checkpoint. Training
runs in a subprocess (``torchrun`` for several processes) whose output streams into this task's log and whose
metrics stream into the stage's MLflow run.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import (
    TrackingContext,
    claim_stage,
    local_workdir,
    run_logger,
    stage_uri,
    start_stage_run,
    write_done,
)
from tasks.launch import Launch, run_training
from tasks.models import CHECKPOINT_TAG, log_checkpoint
from tasks.prepare import log_dataset_input
from tasks.tracking import flatten, forward_events
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
    except Exception:  # noqa: BLE001 - system metrics are a nicety, never a reason to fail
        return None


@task(name="train", task_run_name="{run_name}", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def train_task(
    kind: str,
    run_name: str,
    key: dict[str, Any],
    config: dict[str, Any],
    artifact_root: str,
    launch: dict[str, Any],
    tracking: dict[str, Any],
    datasets: list[dict[str, Any]],
    test: dict[str, Any] | None = None,
    register: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one stage. ``test`` = {split, transform, real} evaluates the final weights on a split;
    ``register`` = {name, alias} registers them in the MLflow model registry."""
    from vit.engine.config import TrainConfig

    logger = run_logger()
    ctx = TrackingContext(**tracking)
    uri = stage_uri(artifact_root, kind, run_name, key)
    with claim_stage(uri) as done:  # one run trains a stage at a time; a concurrent one waits and reuses it
        stage_tags = {**(tags or {}), "vitflow.stage_uri": uri, "vitflow.cached": str(done is not None).lower()}
        tracker, run = start_stage_run(ctx, run_name, kind, stage_tags, params=flatten(config))
        for ref in datasets:
            log_dataset_input(tracker, run, ref, "training" if ref is datasets[0] else "evaluation")
        if done is not None:
            logger.info("%s: finished earlier, reusing %s", run_name, uri)
            tracker.log_metrics(run, done["metrics"], done.get("step"))
            tracker.set_tags(run, {"vitflow.model_uri": done["model_uri"]})
            tracker.finish(run)
            return done

        cfg = TrainConfig.from_dict(config)
        cfg.checkpoint.dir = storage.join(uri, "checkpoints")
        progress = None
        monitor = _system_metrics(run.id, ctx.tracking_uri)

        def on_event(event: dict[str, Any]) -> None:
            nonlocal progress
            forward_events(tracker, run, [event])
            if event["event"] == "start":
                progress = _Progress(run_name, event["total_steps"], logger.info)
                if event.get("resumed_from"):
                    logger.info("%s: resuming from the checkpoint at step %s", run_name, event["resumed_from"])
                    tracker.set_tags(run, {"vitflow.resumed_from": event["resumed_from"]})
            elif event["event"] == "metrics" and progress is not None:
                progress(event)
            elif event["event"] == "warning":
                logger.warning("%s: %s", run_name, event.get("message"))

        try:
            job = Launch(**launch)
            with job.slots():
                result = run_training(cfg, local_workdir(uri), job, on_event, logger.info)
            metrics = {k: v for k, v in result["eval"].items() if k.startswith("val/") and k != "val/count"}
            if test is not None:
                from vit.engine.callbacks import JsonlLog

                started = time.time()
                metrics.update(_test_metrics(result["model_uri"], cfg.data.dataset, test, cfg.batch_size))
                # when the test evaluation ran, in the stage's event log beside the engine's own events
                JsonlLog(local_workdir(uri) / "events.jsonl")("test", result["step"], {"start": started})
            model = None
            if register or test is not None:  # the models people load: pre-trained, and final fine-tunes
                model = log_checkpoint(
                    tracker, run, ctx.experiment_id, result["model_uri"], local_workdir(uri) / "mlflow"
                )
            tracker.log_metrics(run, metrics, result["step"], model=model)
            tracker.set_tags(run, {"vitflow.model_uri": result["model_uri"]})
            if storage.is_s3(uri):  # the event log beside the checkpoints, for the curves of later reports
                storage.upload(local_workdir(uri) / "events.jsonl", storage.join(uri, "events.jsonl"))
            version = None
            if register:
                alias = register.get("alias")
                tags = {CHECKPOINT_TAG: result["model_uri"]}
                version = tracker.register_model(register["name"], model, alias, run, tags)
                reference = f"models:/{register['name']}" + (f"@{alias}" if alias else "")
                tracker.set_tags(run, {"vitflow.registered_model": reference})
            done = {
                "kind": kind,
                "name": run_name,
                "stage_uri": uri,
                "model_uri": result["model_uri"],
                "metrics": metrics,
                "step": result["step"],
                "run_id": run.id,
                "model_version": version,
            }
            write_done(uri, done)
        except BaseException:
            tracker.finish(run, "FAILED")
            raise
        finally:
            if monitor is not None:
                monitor.finish()
        tracker.finish(run)
        return done


def _test_metrics(model_uri: str, dataset_uri: str, test: dict[str, Any], batch_size: int) -> dict[str, float]:
    import torch

    from vit import load_pretrained
    from vit.engine.protocol import evaluate_split

    model = load_pretrained(model_uri).to("cuda" if torch.cuda.is_available() else "cpu")
    out = evaluate_split(
        model, dataset_uri, test["split"], test["transform"], min(batch_size, 256), real=bool(test.get("real"))
    )
    metrics = {"test/top1": out["top1"], "test/count": out["count"]}
    if "real_top1" in out:
        metrics.update({"test/real_top1": out["real_top1"], "test/real_count": out["real_count"]})
    return metrics
