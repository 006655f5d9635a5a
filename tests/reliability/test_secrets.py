"""Credentials in the environment never end up in anything the pipeline writes: MLflow params, tags, metrics and
artifacts, Prefect logs, artifacts and run parameters, reports, the artifact store, $VITFLOW_HOME."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import SYNTHETIC_DEMO_SETS, synthetic_benchmarks
from vit import storage

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-7f3c9e1d5b",
    "AWS_SESSION_TOKEN": "aws-session-token-2a8e6c4f0d",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-9b1d7f3a5c",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-password-4e2c0a8f6d",
    "PREFECT_API_KEY": "pnu_prefect-key-6d4b2f0e8a",
}


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def leaks(data: bytes, where: str) -> list[str]:
    return [f"{name} in {where}" for name, value in SECRETS.items() if value.encode() in data]


async def prefect_records() -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        logs = await client.read_logs()
        artifacts = await client.read_artifacts()
        flow_runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs()
    out = [(f"prefect log {log.id}", log.message) for log in logs]
    out += [(f"prefect artifact {a.key}", f"{a.data} {a.description}") for a in artifacts]
    out += [(f"prefect flow run {r.name}", f"{r.parameters} {r.state}") for r in flow_runs]
    out += [(f"prefect task run {r.name}", f"{r.task_inputs} {r.state}") for r in task_runs]
    return out


def test_no_secret_reaches_anything_the_pipeline_writes(
    prefect_harness, mlflow_server, s3_bucket, tmp_path, monkeypatch
):
    from flows.benchmark import benchmark
    from flows.presets import build_spec

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    root = f"{s3_bucket}/vitflow"
    spec = build_spec(
        "demo",
        [
            *SYNTHETIC_DEMO_SETS, f"artifact_root={root}", f"tracking_uri={mlflow_server.url}", "experiment=secrets",
            "pretrain.steps=4", "pretrain.batch_size=16", "pretrain.warmup_steps=1", "pretrain.image_size=16",
            "pretrain.dataset.options.classes=4", "pretrain.dataset.options.per_class=8",
            "pretrain.dataset.options.size=16", "transfer.finetune.steps=2", "transfer.finetune.batch_size=8",
            "transfer.finetune.image_size=16", "transfer.fewshot.shots=[1]", "transfer.fewshot.seeds=[0]",
            "transfer.from_scratch_baseline=false", "analysis.num_images=1",
        ],
    )  # fmt: skip
    benches = synthetic_benchmarks(("synth/natural_objects",), size=16, test=20)
    spec = spec.model_copy(update={"transfer": spec.transfer.model_copy(update={"benchmarks": benches})})
    summary = benchmark(spec=spec)

    found: list[str] = []
    # MLflow: every run's params, tags and metrics, and every artifact, through the API
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("secrets").experiment_id
    runs = client.search_runs([experiment], max_results=500)
    assert summary.run_id in {r.info.run_id for r in runs} and len(runs) >= 5
    for run in runs:
        found += leaks(repr((run.data.params, run.data.tags, run.data.metrics, run.info)).encode(), run.info.run_name)
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "mlflow" / run.info.run_id)))
        found += [leak for f in local.rglob("*") if f.is_file() for leak in leaks(f.read_bytes(), str(f))]
    # Prefect: logs, artifacts (results table, report, links, progress) and run parameters
    records = asyncio.run(prefect_records())
    assert any(where.startswith("prefect artifact") for where, _ in records) and len(records) > 20
    found += [leak for where, text in records for leak in leaks(text.encode(), where)]
    # the artifact store (datasets, checkpoints, results, report) and everything under VITFLOW_HOME
    objects = storage.list_files(root)
    assert summary.report_uri in objects and summary.results_uri in objects
    found += [leak for uri in objects for leak in leaks(storage.read_bytes(uri), uri)]
    home = Path(os.environ["VITFLOW_HOME"])
    assert any(home.rglob("*"))
    found += [leak for f in home.rglob("*") if f.is_file() for leak in leaks(f.read_bytes(), str(f))]
    assert found == []
