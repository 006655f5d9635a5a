"""The pipeline end to end on a small demo, against a real S3 server (moto), a real `mlflow server` subprocess
with proxied S3 artifacts, and Prefect's test harness: hierarchy, params, metrics, artifacts, reuse, resume."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import SYNTHETIC_DEMO_SETS, synthetic_benchmarks
from vit import storage

SMALL = [
    *SYNTHETIC_DEMO_SETS,
    "pretrain.steps=24",
    "pretrain.batch_size=32",
    "pretrain.warmup_steps=4",
    "pretrain.dataset.options.classes=10",
    "pretrain.dataset.options.per_class=20",
    "transfer.finetune.steps=6",
    "transfer.finetune.batch_size=16",
    "transfer.fewshot.shots=[1,5]",
    "transfer.fewshot.seeds=[0,1]",
    "analysis.num_images=2",
    "compute.max_parallel=1",
]


def small_spec(artifact_root: str, tracking_uri: str, experiment: str = "pipeline-test", extra=()):
    from flows.presets import build_spec

    spec = build_spec(
        "demo",
        [*SMALL, f"artifact_root={artifact_root}", f"tracking_uri={tracking_uri}", f"experiment={experiment}", *extra],
    )
    benches = synthetic_benchmarks(("synth/natural_objects", "synth/structured_count"), size=32, test=60)
    return spec.model_copy(update={"transfer": spec.transfer.model_copy(update={"benchmarks": benches})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_runs_on_real_images_and_says_what_it_runs_without_them(monkeypatch, tmp_path, caplog):
    """The default machine (Debian's Fashion-MNIST installed): pre-training on half of its classes, on both cores;
    the held-out half VTAB-1k style, fine-tuned and few-shot. Without the package: a warning naming it, then the
    synthetic upstream set and digits."""
    import flows.presets as presets

    installed = presets.fashion_mnist_installed()
    with monkeypatch.context() as patch, caplog.at_level("WARNING", logger="flows.presets"):
        patch.setattr(presets, "FASHION_MNIST_DIR", tmp_path / "absent")
        spec = presets.build_spec("demo")
    assert f"Fashion-MNIST is not installed in {tmp_path / 'absent'}" in caplog.text
    assert spec.pretrain.dataset.source == "synthetic-upstream:"
    assert [(b.name, b.finetune, b.fewshot) for b in spec.transfer.benchmarks] == [("digits", True, True)]
    spec.check_inputs()  # nothing it reads is missing
    if installed:
        from flows import plan

        spec = presets.build_spec("demo")
        assert spec.pretrain.dataset.options == {"keep_classes": "0,1,3,5,7"}
        data = plan.pretrain_config(spec, "file:///upstream")[0].data
        assert (data.train_transform, data.eval_split) == ("eval", "test")  # whole images; top-1 on the test split
        assert [(b.name, b.dataset.options, b.finetune, b.fewshot) for b in spec.transfer.benchmarks] == [
            ("fashion-mnist-held-out", {"vtab1k": True, "keep_classes": "2,4,6,8,9"}, True, True)
        ]
        assert (plan.launch(spec, pretrain=True).threads, plan.launch(spec).threads) == (2, 1)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def mlflow_server(moto_endpoint, tmp_path_factory):
    """`mlflow server` with a SQLite store, proxying artifacts into a bucket on the moto S3 server."""
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="mlflow-artifacts")
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {
        **os.environ,
        **creds,
        "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination",
            "s3://mlflow-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (home / "server.log").read_text()) from None
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    run = client.get_run(parent_id)
    found = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=500)
    return {r.info.run_name: r for r in found}


def test_benchmark_end_to_end_on_s3_and_mlflow_server(prefect_server, mlflow_server, s3_bucket, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.benchmark import benchmark
    from tasks.compare import compare, find_runs

    root = f"{s3_bucket}/vitflow"
    spec = small_spec(root, mlflow_server)
    first = benchmark(spec=spec)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(first.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.steps"] == "24" and parent.data.params["model.name"] == "vit_micro_4"
    assert parent.data.tags["vitflow.spec_hash"] == spec.spec_hash()
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.info.run_name.startswith("pipeline-test vit_micro_4 ")  # no preset known: the experiment's name
    assert "vitflow.preset" not in parent.data.tags
    assert "vitflow.git_commit" in parent.data.tags
    runs = children(client, first.run_id)
    assert {
        "prepare:synthetic-upstream",
        "pretrain:vit_micro_4",
        "aggregate",
        "finetune:synth/natural_objects:lr=0.03",
        "finetune:synth/structured_count:lr=0.03:scratch",
        "fewshot:synth/natural_objects",
        "fewshot:synth/structured_count:scratch",
    } <= set(runs)
    pretrain = runs["pretrain:vit_micro_4"]
    losses = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert [m.step for m in losses] == [10, 20, 24]
    assert pretrain.data.params["optim.lr"] == "0.002"
    assert pretrain.inputs.dataset_inputs[0].dataset.name == "synthetic-upstream"
    # upstream accuracy: the pre-trained model's top-1 on the upstream test split, on the parent and in the table
    upstream = parent.data.metrics["upstream/top1"]
    assert upstream == pytest.approx(100 * pretrain.data.metrics["val/top1"])
    assert f"upstream: synthetic-upstream, held-out top-1 {upstream:.2f}" in first.table
    final = runs["finetune:synth/natural_objects:lr=0.03"]
    assert 0.0 <= final.data.metrics["test/top1"] <= 1.0 and final.data.metrics["test/count"] == 60
    assert "fewshot/synth/natural_objects/5shot" in runs["fewshot:synth/natural_objects"].data.metrics
    # the pre-trained model is registered with an alias: an MLflow Model of the run, whose checkpoint is in S3
    version = client.get_model_version_by_alias("pipeline-test-vit_micro_4", "candidate")
    checkpoint = version.tags["vitflow.checkpoint_uri"]
    assert version.run_id == pretrain.info.run_id and checkpoint.startswith(root) and storage.exists(checkpoint)
    assert [o.model_id for o in pretrain.outputs.model_outputs] == [
        m.model_id for m in client.search_logged_models([pretrain.info.experiment_id], "name = 'pretrain-vit_micro_4'")
    ]
    # artifacts: the spec on the parent, results and report on the parent and the aggregate run (proxied to S3)
    parent_files = {f.path for f in client.list_artifacts(first.run_id)}
    assert {"spec.json", "results.parquet", "results.csv", "report.html", "report.md"} <= parent_files
    assert "plots" in {f.path for f in client.list_artifacts(runs["aggregate"].info.run_id)}
    # the results table is in the S3 artifact store
    assert first.results_uri == f"{root}/runs/{first.run_id}/results.parquet"
    assert storage.exists(first.results_uri)
    # the report's header links the parent run's MLflow page and its artifacts tab, the S3 folder beside as code;
    # the same in the Prefect `report` artifact
    folder = f"{root}/runs/{first.run_id}"
    run_page = f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs/{first.run_id}"
    header = [
        f"| MLflow run | [{first.run_id}]({run_page}) |",
        "| experiment | pipeline-test |",
        f"| artifacts | [open in MLflow]({run_page}/artifacts) · `{folder}` |",
    ]
    html_header = [
        f'<td><a href="{run_page}">{first.run_id}</a></td>',
        f'<td><a href="{run_page}/artifacts">open in MLflow</a> · <code>{folder}</code></td>',
    ]
    markdown = storage.read_text(f"{folder}/report.md")
    assert all(line in markdown for line in header), markdown[:1000]
    assert all(cell in storage.read_text(f"{folder}/report.html") for cell in html_header)
    with get_client(sync_client=True) as prefect:
        (report,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[parent.data.tags["prefect.flow_run_id"]]),
            )
        )
    assert all(line in report.data for line in header)

    # an unchanged re-run trains nothing: every stage is reused, a Prefect cache hit, and still in MLflow
    rerun_started = datetime.datetime.now(datetime.UTC)
    second = benchmark(spec=spec)
    reruns = children(client, second.run_id)
    trained = [n for n, r in reruns.items() if n.startswith(("pretrain:", "finetune:", "fewshot:"))]
    assert trained and all(reruns[n].data.tags["vitflow.cached"] == "true" for n in trained)
    with get_client(sync_client=True) as prefect:
        stages = [
            r
            for r in prefect.read_task_runs(limit=200)
            if r.created >= rerun_started and r.name.startswith(("pretrain ", "finetune ", "fewshot "))
        ]
    assert len(stages) == len(trained) and {r.state.name for r in stages} == {"Cached"}
    assert first.headline == second.headline

    # search_runs compares the two runs
    import mlflow

    # process-wide, and exported as $MLFLOW_TRACKING_URI: undone below, or later tests talk to this server
    mlflow.set_tracking_uri(mlflow_server)
    try:
        found = mlflow.search_runs(experiment_names=["pipeline-test"], filter_string="tags.`vitflow.stage` = 'flow'")
    finally:
        mlflow.set_tracking_uri(None)  # also unsets the variable (it was not set when the test began)
    assert {first.run_id, second.run_id} <= set(found["run_id"])
    assert find_runs(mlflow_server, "pipeline-test", last=2) == [second.run_id, first.run_id]
    table = compare(mlflow_server, [first.run_id, second.run_id], threshold=1.0)
    assert not table["regressed"].any() and (table[f"Δ {second.run_id}"] == 0).all()

    # the `report` and `compare` commands on the same runs, through the CLI
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner(env={"MLFLOW_TRACKING_URI": mlflow_server})
    rebuilt = runner.invoke(app, ["report", first.run_id, "--output", str(tmp_path / "report")])
    assert rebuilt.exit_code == 0, rebuilt.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "synth/natural_objects" in html and "data:image/png;base64," in html
    assert all(cell in html for cell in html_header)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| benchmark" in markdown and all(line in markdown for line in header)
    side_by_side = runner.invoke(app, ["compare", "--experiment", "pipeline-test", "--last", "2", "--format", "csv"])
    assert side_by_side.exit_code == 0, side_by_side.output
    assert first.run_id in side_by_side.output and second.run_id in side_by_side.output
    assert "REGRESSED" not in side_by_side.output
    missing = runner.invoke(app, ["report", "0" * 32, "--output", str(tmp_path / "none")])
    assert missing.exit_code == 2


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the whole `vitflow run` process group during pre-training, run again: training resumes."""
    home = tmp_path / "home"
    root = tmp_path / "artifacts"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "VITFLOW_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    args = [
        str(Path(sys.executable).parent / "vitflow"),
        "run",
        "demo",
        *sum((["--set", o] for o in SMALL), []),
        "--set",
        "pretrain.steps=400",
        "--set",
        "pretrain.checkpoint_every_minutes=0.02",
        "--set",
        "transfer.benchmarks=[]",
        "--set",
        f"artifact_root={root}",
        "--set",
        f"tracking_uri={tracking}",
        "--set",
        "experiment=resume-test",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    latest = None
    while time.time() < deadline:
        found = list((root / "stages" / "pretrain").rglob("checkpoints/latest.json"))
        if found and json.loads(found[0].read_text())["step"] >= 20:
            latest = found[0]
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(1)
    assert latest is not None, "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert not (latest.parent.parent / "_done.json").exists()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from the checkpoint at step {killed_at}" in done.stdout + done.stderr, done.stderr[-6000:]
    result = json.loads((latest.parent.parent / "_done.json").read_text())
    assert result["step"] == 400
    client = MlflowClient(tracking)
    resumed = client.search_runs(
        [client.get_experiment_by_name("resume-test").experiment_id], "tags.`vitflow.resumed_from` != ''"
    )
    assert [int(r.data.tags["vitflow.resumed_from"]) for r in resumed] == [killed_at]
