"""Judging an evaluation against the baseline the team chose, on a real MLflow (SQLite) registry and real results
files: the @champion's evaluation or the best of the last N; a drop inside the seeds' spread is not a regression;
`vitflow promote` is the step that moves an alias; the parent run carries every number under one name."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from tasks import results as R
from tasks.compare import BaselineChoice, evaluation, find_baseline, judge
from tasks.registry_ops import ModelNotRegistered, require_registered

MODEL, SUITE, EXPERIMENT = "nightly-model", "fewshot-nightly", "transfer-eval-fewshot-nightly"
REF = f"models:/{MODEL}@candidate"
SEEDS = {"good": (90.0, 94.0, 86.0), "noisy": (87.0, 91.0, 83.0), "regressed": (80.0, 84.0, 76.0)}  # std 4 points


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def register_version(uri: str, tmp_path) -> str:
    client = MlflowClient(uri)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=str(tmp_path / "model")).version
    client.set_registered_model_alias(MODEL, "candidate", version)
    return str(version)


def evaluation_run(uri: str, tmp_path, version: str, accuracies: tuple[float, ...]) -> str:
    """A finished nightly parent run of version ``version`` whose results table holds ``accuracies`` (one per seed)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    tags = {"vitflow.stage": "flow", "vitflow.model_ref": REF, "vitflow.suite": SUITE}
    tags |= {"vitflow.registered_model": MODEL, "vitflow.model_version": version}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    rows = [
        {"run": run_id, "model": "vit_micro_4", "pretrain": "checkpoint", "benchmark": "synth/noise", "metric": "top1",
         "value": value, "seed": seed, "shots": 10}
        for seed, value in enumerate(accuracies)
    ]  # fmt: skip
    paths = R.write_results(R.results_frame(rows), tmp_path / run_id)
    client.set_tag(run_id, "vitflow.results_uri", str(paths["parquet"]))
    client.set_terminated(run_id)
    return run_id


def evaluated(uri: str, run_id: str, version: str):
    resolved = {"registered_model": MODEL, "model_version": version}
    return evaluation(uri, EXPERIMENT, {"vitflow.model_ref": REF, "vitflow.suite": SUITE}, resolved, run_id)


def promote(*args: str):
    from flows.cli import app

    return CliRunner().invoke(app, ["promote", *args])


def test_candidates_are_judged_against_the_champions_evaluation(mlflow_uri, tmp_path):
    v1 = register_version(mlflow_uri, tmp_path)
    champion_run = evaluation_run(mlflow_uri, tmp_path, v1, SEEDS["good"])
    first = judge(mlflow_uri, EXPERIMENT, evaluated(mlflow_uri, champion_run, v1), BaselineChoice(), 1.0)
    assert first.baseline.run_id is None and not first.regressions
    assert f"vitflow promote models:/{MODEL}/{v1} --alias champion" in first.message()

    result = promote(f"models:/{MODEL}/{v1}", "--alias", "champion")
    assert (
        result.exit_code == 0
        and result.output.strip() == f"models:/{MODEL}@champion moved from no version to version 1"
    )

    v2 = register_version(mlflow_uri, tmp_path)
    noisy_run = evaluation_run(mlflow_uri, tmp_path, v2, SEEDS["noisy"])
    noisy = judge(mlflow_uri, EXPERIMENT, evaluated(mlflow_uri, noisy_run, v2), BaselineChoice(), 1.0)
    assert noisy.baseline.run_id == champion_run
    assert noisy.evaluation.alias_moved and "moved from version 1" in noisy.message()
    (row,) = noisy.rows()
    assert row == {"metric": "synth/noise/10shot/top1", "baseline": 90.0, "candidate": 87.0, "delta": -3.0,
                   "spread": 4.0, "regressed": ""}  # fmt: skip
    assert not noisy.regressions  # 3 points > the 1-point threshold, but within the seeds' spread of 4

    v3 = register_version(mlflow_uri, tmp_path)
    bad_run = evaluation_run(mlflow_uri, tmp_path, v3, SEEDS["regressed"])
    bad = judge(mlflow_uri, EXPERIMENT, evaluated(mlflow_uri, bad_run, v3), BaselineChoice(), 1.0)
    assert bad.baseline.run_id == champion_run  # the champion, not the previous (noisy) night
    assert bad.regressions == ["synth/noise/10shot/top1"] and bad.rows()[0]["regressed"] == "REGRESSED"
    assert bad.tags()["vitflow.regression"] == "true" and champion_run in bad.message()


def test_best_of_last_picks_the_best_recent_evaluation(mlflow_uri, tmp_path):
    version = register_version(mlflow_uri, tmp_path)
    runs = [evaluation_run(mlflow_uri, tmp_path, version, SEEDS[k]) for k in ("regressed", "good", "noisy")]
    latest = evaluation_run(mlflow_uri, tmp_path, version, SEEDS["noisy"])
    choice = BaselineChoice(kind="best-of-last", last=3)
    baseline = find_baseline(mlflow_uri, EXPERIMENT, evaluated(mlflow_uri, latest, version), choice)
    assert baseline.run_id == runs[1] and "best of the last 3" in baseline.label
    narrow = find_baseline(
        mlflow_uri, EXPERIMENT, evaluated(mlflow_uri, latest, version), choice.model_copy(update={"last": 1})
    )
    assert narrow.run_id == runs[2]


def test_an_unregistered_reference_fails_with_what_to_register(mlflow_uri, tmp_path):
    with pytest.raises(ModelNotRegistered, match=f"No model named '{MODEL}' is registered") as info:
        require_registered(REF, mlflow_uri)
    assert str(info.value).count(". ") == 0 and "--alias candidate" in str(info.value)  # one sentence
    MlflowClient(mlflow_uri).create_registered_model(MODEL)
    with pytest.raises(ModelNotRegistered, match="has the alias @candidate"):
        require_registered(REF, mlflow_uri)
    result = promote(f"models:/{MODEL}/7", "--alias", "champion")
    assert result.exit_code == 2 and "no version 7" in result.output


def test_the_parent_run_carries_every_result_in_percent_with_a_curve_over_shots(mlflow_uri):
    from tasks.aggregate import log_results_to_parent
    from tasks.common import TrackingContext
    from tasks.tracking import Tracker

    tracker = Tracker(mlflow_uri)
    experiment_id = tracker.experiment_id("naming")
    assert MlflowClient(mlflow_uri).get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"  # MLflow 3 opens it in the model-training view, not GenAI's traces
    )
    parent = tracker.start_run(experiment_id, "flow")
    ctx = TrackingContext(mlflow_uri, experiment_id, parent.id, {})
    row = {"run": parent.id, "model": "vit_b_16", "pretrain": "imagenet21k", "metric": "top1"}
    df = R.results_frame(
        [
            row | {"benchmark": "cifar10", "value": 98.5, "seed": 0},
            row | {"benchmark": "cifar10", "pretrain": "scratch", "value": 70.0, "seed": 0},
        ]
        + [row | {"benchmark": "cifar10", "value": v, "seed": 0, "shots": k} for k, v in ((1, 50.0), (10, 90.0))]
    )
    log_results_to_parent(tracker, ctx, df, {})
    run = MlflowClient(mlflow_uri).get_run(parent.id)
    assert run.data.metrics == {
        "cifar10/finetune/top1": 98.5,
        "cifar10/finetune-scratch/top1": 70.0,
        "cifar10/1shot/top1": 50.0,
        "cifar10/10shot/top1": 90.0,
        "cifar10/fewshot/top1": 90.0,  # the curve's last point
    }
    curve = MlflowClient(mlflow_uri).get_metric_history(parent.id, "cifar10/fewshot/top1")
    assert sorted((m.step, m.value) for m in curve) == [(1, 50.0), (10, 90.0)]
    assert run.data.tags["paper/cifar10/finetune/top1"] == "98.95 (T5)"
