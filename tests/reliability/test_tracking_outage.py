"""The MLflow server killed in the middle of training: training goes on untouched; what could not be logged is
queued and sent when the server is back, or saved under $VITFLOW_HOME/mlflow-pending and synced by a later run.
A replay that is itself interrupted and run again creates nothing twice."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from tasks.common import TrackingContext, local_workdir, stage_uri, start_stage_run
from tasks.launch import Launch, run_training
from tasks.models import log_checkpoint
from tasks.prepare import dataset_ref, log_dataset_input
from tasks.settings import vitflow_home
from tasks.stages import Registration, TrainStage
from tasks.tracking import LOCAL_ID_TAG, Tracker, forward_events, sync_pending
from tasks.train import train_task
from tests.reliability.conftest import events, train_config
from vit.engine.config import TrainConfig

STEPS = 30
NOT_REPEATABLE = ("train/images_per_s", "train/mfu", "train/grad_norm")  # timing, and float noise in norms


def pending_files() -> list[Path]:
    return sorted((vitflow_home() / "mlflow-pending").glob("*.jsonl"))


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

    # The server returns while the stage is finishing: the queue is flushed, nothing is left behind.
    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "120")
    restart = threading.Thread(target=mlflow_server.start)
    restart.start()
    tracker.finish(run)
    restart.join()
    client = MlflowClient(mlflow_server.url)
    assert tracker.pending == 0 and not pending_files()
    assert [m.step for m in client.get_metric_history(run.id, "train/loss")] == list(range(1, STEPS + 1))
    finished = client.get_run(run.id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["vitflow.last_checkpoint"].endswith("step-00000030")


def test_a_stage_run_offline_is_replayed_once_even_when_the_replay_is_interrupted(
    mlflow_server, tiny_dataset, tmp_path, monkeypatch
):
    """Everything a stage logs (a run, params, a dataset input, an artifact whose file is gone by the time MLflow
    is back, a model, its registration) is saved while the server is down; a replay that stops half way and is
    run again leaves exactly one finished run with all of it."""
    experiment = Tracker(mlflow_server.url).experiment_id("offline")
    ctx = TrackingContext(mlflow_server.url, experiment, None, {"vitflow.test": "offline"})
    checkpoint = _train_checkpoint(tiny_dataset, tmp_path)
    mlflow_server.kill()
    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "1")
    tracker, run = start_stage_run(ctx, "fewshot:offline", "fewshot", params={"shots": 5})
    log_dataset_input(tracker, run, dataset_ref(tiny_dataset), "evaluation")
    report = tmp_path / "gone" / "report.md"
    report.parent.mkdir()
    report.write_text("# offline\n")
    tracker.log_artifact(run, report, "reports")
    model = log_checkpoint(tracker, run, experiment, checkpoint, tmp_path / "mlflow-model")
    tracker.log_metrics(run, {"fewshot/offline/5shot": 0.75}, model=model)
    tracker.register_model("vit-offline", model, "candidate", run)
    tracker.finish(run)
    report.unlink()
    (saved,) = pending_files()
    assert run.id is None

    mlflow_server.start()
    ops = saved.read_text().splitlines()
    interrupted = saved.with_name("0-interrupted.jsonl")  # the first half of the replay went through, then it died
    full = tmp_path / saved.name
    saved.rename(full)
    interrupted.write_text("\n".join(ops[: 1 + len(ops) // 2]) + "\n")
    assert sync_pending(mlflow_server.url) == len(ops) // 2
    full.rename(saved)
    assert sync_pending(mlflow_server.url) == len(ops) - 1 and not pending_files()

    client = MlflowClient(mlflow_server.url)
    (synced,) = client.search_runs([experiment], "attributes.run_name = 'fewshot:offline'")
    assert synced.info.status == "FINISHED" and synced.data.params == {"shots": "5"}
    assert synced.data.metrics == {"fewshot/offline/5shot": 0.75}
    assert [(d.dataset.name, d.tags[0].value) for d in synced.inputs.dataset_inputs] == [("tiny", "evaluation")]
    assert [a.path for a in client.list_artifacts(synced.info.run_id, "reports")] == ["reports/report.md"]
    (logged,) = client.search_logged_models([experiment])
    assert [o.model_id for o in synced.outputs.model_outputs] == [logged.model_id]
    (version,) = client.search_model_versions("name = 'vit-offline'")
    assert version.source == logged.artifact_location
    assert client.get_model_version_by_alias("vit-offline", "candidate").version == version.version


def _train_checkpoint(dataset: str, tmp_path: Path) -> str:
    cfg = TrainConfig.from_dict(train_config(dataset, str(tmp_path / "ckpt"), 4, every=4))
    return run_training(cfg, tmp_path / "ckpt-work", Launch(threads=1), lambda e: None, lambda line: None)["model_uri"]


def test_mlflow_killed_mid_stage_ends_with_the_contents_of_an_uninterrupted_run(
    mlflow_server, tiny_dataset, tmp_path, monkeypatch
):
    """A pre-training stage (dataset input, metrics, a logged model, its registration) whose server is killed
    mid-training and comes back only after the stage: the stage finishes, and after the next run's sync the
    runs, params, metrics, inputs, tags, models and versions equal those of the same stage run without outage."""
    monkeypatch.setenv("VITFLOW_MLFLOW_FLUSH_SECONDS", "1")
    clean = _pretrain_stage(mlflow_server, tiny_dataset, tmp_path, "clean", kill_at=None)
    outage = _pretrain_stage(mlflow_server, tiny_dataset, tmp_path, "outage", kill_at=5)
    assert clean["model_version"] == "1" and outage["model_version"] is None  # the registration is queued
    assert outage["run_id"] is not None and len(pending_files()) == 1  # the run existed when the server died
    mlflow_server.start()
    sync_pending(mlflow_server.url)
    assert not pending_files()
    client = MlflowClient(mlflow_server.url)
    expected, got = _contents(client, "clean", tmp_path), _contents(client, "outage", tmp_path)
    assert got.keys() == expected.keys()
    for name, run in expected.items():
        for part, value in run.items():
            assert got[name][part] == value, (name, part)


def _pretrain_stage(server, dataset: str, tmp_path: Path, label: str, kill_at: int | None) -> dict[str, Any]:
    """``train_task`` as the pretrain flow calls it; with ``kill_at``, the server is SIGKILLed once the engine
    has logged that step."""
    experiment = Tracker(server.url).experiment_id(label)
    root = str(tmp_path / label)
    config = train_config(dataset, "set-by-the-stage", 100, every=50)
    config["log_every"] = 5
    uri = stage_uri(root, "pretrain", "pretrain:micro", {"test": "outage"})
    workdir = local_workdir(uri)
    killed = threading.Event()

    def kill_mid_training() -> None:
        while not any(e["event"] == "metrics" and e["step"] >= kill_at for e in events(workdir)):
            threading.Event().wait(0.02)
        server.kill()
        killed.set()

    if kill_at is not None:
        threading.Thread(target=kill_mid_training, daemon=True).start()
    stage = TrainStage(
        kind="pretrain",
        name="pretrain:micro",
        title="pretrain micro",
        uri=uri,
        config=TrainConfig.from_dict(config),
        launch=Launch(threads=1),
        tracking=TrackingContext(server.url, experiment, None, {"vitflow.test": label}),
        datasets=[dataset_ref(dataset)],
        registration=Registration(name=f"vit-{label}", alias="candidate"),
    )
    done = train_task.fn(stage).model_dump()
    if kill_at is not None:
        assert killed.is_set() and max(e["step"] for e in events(workdir)) > kill_at  # killed mid-training
    return done


def _contents(client: MlflowClient, label: str, tmp_path: Path) -> dict[str, Any]:
    """What a person sees of an experiment's runs, with the run's own names, paths and ids made neutral."""
    experiment = client.get_experiment_by_name(label).experiment_id

    def neutral(text: str) -> str:
        return text.replace(str(tmp_path / label), "<root>").replace(label, "<label>")

    runs = {}
    for run in client.search_runs([experiment]):
        metrics = {
            key: [
                (m.step, m.value if key not in NOT_REPEATABLE else None)
                for m in client.get_metric_history(run.info.run_id, key)
            ]
            for key in run.data.metrics
            if not key.startswith("system/")  # MLflow's own sampler, not logged through vitflow
        }
        models = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
        runs[run.info.run_name] = {
            "status": run.info.status,
            "params": run.data.params,
            "metrics": metrics,
            "inputs": [(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs],
            "tags": {k: neutral(v) for k, v in run.data.tags.items() if k != LOCAL_ID_TAG},
            "models": [(m.name, m.status.to_proto(), neutral(json.dumps(_no_ids(m.tags)))) for m in models],
            "logged": models,
        }
    versions = client.search_model_versions(f"name = 'vit-{label}'")
    locations = {m.artifact_location for run in runs.values() for m in run.pop("logged")}
    aliases = client.get_registered_model(f"vit-{label}").aliases
    runs["registry"] = {"versions": [(v.version, v.source in locations) for v in versions], "aliases": aliases}
    return runs


def _no_ids(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k != LOCAL_ID_TAG}
