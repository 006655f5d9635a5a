"""Prefect task: one training stage (pre-training, or one fine-tune at one learning rate).

The stage's output folder is content-addressed: a finished stage is skipped (its recorded result is returned and
logged to a child run tagged ``vitflow.cached``), an interrupted one resumes from its last checkpoint. Training
runs in a subprocess (``torchrun`` for several processes) whose output streams into this task's log and whose
metrics stream into the stage's MLflow run.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import (
    TrackingContext,
    finish_stage_run,
    local_workdir,
    read_done,
    run_logger,
    stage_uri,
    start_stage_run,
    write_done,
)
from tasks.launch import Launch, run_training
from tasks.models import register_model
from tasks.prepare import log_dataset_input
from tasks.tracking import flatten, forward_events
from vit import storage


def _progress(total: int):
    """A Prefect progress artifact updated from training events (a no-op outside a run)."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        artifact_id = create_progress_artifact(0.0, description="training progress (%)")
    except Exception:  # noqa: BLE001 - outside a Prefect run
        return lambda step: None

    def update(step: int) -> None:
        update_progress_artifact(artifact_id, min(100.0, 100.0 * step / max(total, 1)))

    return update


def _system_metrics(run_id: str | None, tracking_uri: str):
    if run_id is None:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

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
    done = read_done(uri)
    stage_tags = {**(tags or {}), "vitflow.stage_uri": uri, "vitflow.cached": str(done is not None).lower()}
    tracker, run = start_stage_run(ctx, run_name, kind, stage_tags, params=flatten(config))
    for ref in datasets:
        log_dataset_input(tracker, run, ref, "training" if ref is datasets[0] else "evaluation")
    if done is not None:
        logger.info("%s: finished earlier, reusing %s", run_name, uri)
        tracker.log_metrics(run, done["metrics"], done.get("step"))
        tracker.set_tags(run, {"vitflow.model_uri": done["model_uri"]})
        finish_stage_run(tracker, run)
        return done

    cfg = TrainConfig.from_dict(config)
    cfg.checkpoint.dir = storage.join(uri, "checkpoints")
    progress = None
    monitor = _system_metrics(run.id, ctx.tracking_uri)

    def on_event(event: dict[str, Any]) -> None:
        nonlocal progress
        forward_events(tracker, run, [event])
        if event["event"] == "start":
            progress = _progress(event["total_steps"])
            if event.get("resumed_from"):
                logger.info("%s: resuming from the checkpoint at step %s", run_name, event["resumed_from"])
                tracker.set_tags(run, {"vitflow.resumed_from": event["resumed_from"]})
        elif event["event"] == "metrics" and progress is not None:
            progress(event["step"])
        elif event["event"] == "warning":
            logger.warning("%s: %s", run_name, event.get("message"))

    try:
        job = Launch(**launch)
        with job.slots():
            result = run_training(cfg, local_workdir(uri), job, on_event, logger.info)
        metrics = {k: v for k, v in result["eval"].items() if k.startswith("val/") and k != "val/count"}
        if test is not None:
            metrics.update(_test_metrics(result["model_uri"], cfg.data.dataset, test, cfg.batch_size))
        tracker.log_metrics(run, metrics, result["step"])
        tracker.set_tags(run, {"vitflow.model_uri": result["model_uri"]})
        version = None
        if register:
            version = register_model(ctx.tracking_uri, register["name"], register["alias"], result["model_uri"], run.id)
            tracker.set_tags(run, {"vitflow.registered_model": f"models:/{register['name']}@{register['alias']}"})
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
        finish_stage_run(tracker, run, "FAILED")
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    finish_stage_run(tracker, run)
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
