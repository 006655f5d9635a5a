"""The MLflow server killed in the middle of training: training goes on untouched; what could not be logged is
queued and sent when the server is back, or saved under $VITFLOW_HOME/mlflow-pending and synced by a later run."""

from __future__ import annotations

import threading

from mlflow import MlflowClient

from tasks.common import TrackingContext, finish_stage_run, start_stage_run
from tasks.launch import Launch, run_training
from tasks.settings import vitflow_home
from tasks.tracking import Tracker, forward_events, sync_pending
from tests.reliability.conftest import train_config
from vit.engine.config import TrainConfig

STEPS = 30


def test_training_survives_an_mlflow_outage_and_every_metric_arrives(
    mlflow_server, tiny_dataset, tmp_path, monkeypatch
):
    experiment = Tracker(mlflow_server.url).experiment_id("outage")
    ctx = TrackingContext(mlflow_server.url, experiment, None, {"vitflow.test": "outage"})
    tracker, run = start_stage_run(ctx, "pretrain:outage", "pretrain")
    cfg = TrainConfig.from_dict(train_config(tiny_dataset, str(tmp_path / "ckpt"), STEPS, every=10))
    killed_at: list[int] = []

    def on_event(event: dict) -> None:
        forward_events(tracker, run, [event])
        if event["event"] == "metrics" and event["step"] >= 5 and not killed_at:
            mlflow_server.kill()  # from here on, every MLflow call fails
            killed_at.append(event["step"])

    result = run_training(cfg, tmp_path / "work", Launch(threads=1), on_event, lambda line: None, poll_seconds=0.1)
    assert result["step"] == STEPS and killed_at  # training finished while MLflow was down
    assert tracker.pending >= STEPS - killed_at[0]  # the rest of the curve is queued, in order

    # 1. The server returns while the stage is finishing: the queue is flushed, nothing is left behind.
    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "120")
    restart = threading.Thread(target=mlflow_server.start)
    restart.start()
    finish_stage_run(tracker, run)
    restart.join()
    client = MlflowClient(mlflow_server.url)
    assert tracker.pending == 0 and not (vitflow_home() / "mlflow-pending").exists()
    assert [m.step for m in client.get_metric_history(run.id, "train/loss")] == list(range(1, STEPS + 1))
    finished = client.get_run(run.id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["vitflow.last_checkpoint"].endswith("step-00000030")

    # 2. The server is down for the whole of a stage: its run, params and metrics are saved locally, then synced.
    mlflow_server.kill()
    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "1")
    offline, offline_run = start_stage_run(ctx, "fewshot:offline", "fewshot", params={"shots": 5})
    offline.log_metrics(offline_run, {"fewshot/offline/5shot": 0.75})
    finish_stage_run(offline, offline_run)
    saved = list((vitflow_home() / "mlflow-pending").glob("*.jsonl"))
    assert len(saved) == 1 and offline_run.id is None
    mlflow_server.start()
    assert sync_pending(mlflow_server.url) == 4  # create the run, log params, log metrics, end it
    assert not list((vitflow_home() / "mlflow-pending").glob("*.jsonl"))
    synced = client.search_runs([experiment], "attributes.run_name = 'fewshot:offline'")
    assert len(synced) == 1 and synced[0].info.status == "FINISHED"
    assert synced[0].data.metrics == {"fewshot/offline/5shot": 0.75} and synced[0].data.params == {"shots": "5"}
