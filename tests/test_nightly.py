"""The nightly transfer evaluation, triggered through its deployment on the served stack (real `prefect server` with
its triggers service, `vitflow deploy`, `mlflow server`, S3, a local webhook listener): with nothing registered it
fails saying what to register and the team's webhook hears of it; a good candidate is evaluated, promoted to
@champion after the review, then a degraded checkpoint takes @candidate and the next night fails against the
champion's evaluation, naming what regressed, saying the alias moved, and notifying the webhook again. (A candidate
whose drop stays within the seeds' spread is not flagged: tests/test_compare.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.servers import ServedStack, api_post, wait_for_flow_run

pytest_plugins = ["tests.servers"]

MODEL = "nightly-vit_micro_4"
REFERENCE = f"models:/{MODEL}@candidate"
SUITE = "fewshot-nightly"
BENCH = "synth/specialized_noise"  # a randomly initialised ViT's features already beat chance here
THRESHOLD = 1.0
# The nightly suite made small: one benchmark, 60 test images, two shot counts, no analysis figures.
OVERRIDES = {
    "transfer.benchmarks": [
        {
            "name": BENCH,
            "protocol": "vtab",
            "finetune": False,
            "dataset": {
                "name": "synth-specialized_noise",
                "source": "synthetic-vtab:specialized_noise",
                "options": {"size": 32, "test": 60},
            },
        }
    ],
    "transfer.fewshot.shots": [5, 10],
    "transfer.fewshot.seeds": [0],
    "analysis.enabled": False,
}


def register_candidate(stack: ServedStack, name: str, degraded: bool) -> str:
    """Save a vit_micro_4 checkpoint to S3 and point ``REFERENCE``'s alias at it (a new registry version).
    Degraded: every weight zeroed, so its features are constant and few-shot accuracy falls to chance."""
    import torch

    import vit
    from tasks.models import register_model
    from vit.checkpoints import save_checkpoint

    torch.manual_seed(0)
    model = vit.create_model("vit_micro_4", num_classes=0, image_size=32)
    if degraded:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    uri = f"{stack.artifact_root}/candidates/{name}.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.s3.items():
            mp.setenv(key, value)
        save_checkpoint(uri, model, {"candidate": name})
        return register_model(stack.mlflow, MODEL, "candidate", uri)  # reads the checkpoint back from S3


def trigger_nightly(stack: ServedStack) -> dict[str, Any]:
    """Run the `transfer-eval-nightly` deployment (as its schedule would, with the test's parameters) and wait
    for the flow run to end."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    parameters = {"model": REFERENCE, "suite": SUITE, "threshold": THRESHOLD, "overrides": OVERRIDES}
    with temporary_settings(updates={PREFECT_API_URL: stack.api}):
        flow_run = run_deployment("transfer-eval/transfer-eval-nightly", parameters=parameters, timeout=0)
    return wait_for_flow_run(stack.api, {"id": {"any_": [str(flow_run.id)]}})


def mlflow_run(stack: ServedStack, flow_run: dict[str, Any]):
    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name(f"transfer-eval-{SUITE}")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        f"tags.`prefect.flow_run_id` = '{flow_run['id']}' and tags.`vitflow.stage` = 'flow'",
    )
    return run


def artifact(stack: ServedStack, flow_run: dict[str, Any], key: str) -> dict[str, Any]:
    (found,) = api_post(
        f"{stack.api}/artifacts/filter",
        {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run["id"]]}}},
    )
    return found


def promote(stack: ServedStack, version: str) -> str:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(
        app, ["promote", f"models:/{MODEL}/{version}", "--alias", "champion"], env={"MLFLOW_TRACKING_URI": stack.mlflow}
    )
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_nightly_evaluation_judges_candidates_against_the_champion_and_notifies_failures(served_stack):
    stack = served_stack
    assert "failed nightly runs notify custom-webhook/" in stack.serve_log.read_text()  # `vitflow deploy` made it
    # nothing registered yet: one sentence says what to register, and the automation posts to the webhook
    unregistered = trigger_nightly(stack)
    assert unregistered["state_type"] == "FAILED"
    assert f"No model named {MODEL!r} is registered" in unregistered["state"]["message"]
    (notice,) = stack.webhook.wait(1)
    assert unregistered["name"] in notice["subject"] and "Failed" in notice["body"]
    assert "transfer-eval-nightly" in notice["body"] and "No model named" in notice["body"]

    assert register_candidate(stack, "good", degraded=False) == "1"
    first = trigger_nightly(stack)
    assert first["state_type"] == "COMPLETED", stack.serve_log.read_text()[-6000:]
    assert first["deployment_id"] and first["parameters"]["model"] == REFERENCE
    champion = mlflow_run(stack, first)
    assert champion.data.tags["vitflow.regression"] == "false" and champion.data.tags["vitflow.model_version"] == "1"
    assert f"{BENCH}/5shot/top1" in champion.data.metrics  # one name per benchmark and setting, in percent
    assert 1.0 < champion.data.metrics[f"{BENCH}/5shot/top1"] <= 100.0
    summary = artifact(stack, first, "nightly-summary")["data"]
    assert f"version 1 of {MODEL}" in summary and f"vitflow promote models:/{MODEL}/1 --alias champion" in summary

    assert promote(stack, "1") == f"models:/{MODEL}@champion moved from no version to version 1"
    assert register_candidate(stack, "degraded", degraded=True) == "2"  # @candidate moves to version 2
    second = trigger_nightly(stack)
    assert second["state_type"] == "FAILED", stack.serve_log.read_text()[-6000:]
    message = second["state"]["message"]
    assert "RegressionDetected" in message and f"dropped by more than {THRESHOLD} points" in message, message
    assert f"models:/{MODEL}@champion (version 1, run {champion.info.run_id})" in message
    assert "moved from version 1" in message
    regressed_run = mlflow_run(stack, second)
    assert regressed_run.info.status == "FAILED"
    tags = regressed_run.data.tags
    assert tags["vitflow.regression"] == "true" and tags["vitflow.model_version"] == "2"
    assert tags["vitflow.alias_moved"] == "true" and tags["vitflow.baseline_run"] == champion.info.run_id
    regressed = tags["vitflow.regressed"].split(", ")
    assert all(m.startswith(BENCH) for m in regressed) and all(m in message for m in regressed)
    # the comparison is a table artifact, regressed rows first
    table = artifact(stack, second, "nightly-comparison")
    assert table["type"] == "table"
    rows = json.loads(table["data"])
    flags = [row["regressed"] for row in rows]
    assert flags[: len(regressed)] == ["REGRESSED"] * len(regressed) and "REGRESSED" not in flags[len(regressed) :]
    assert [row["metric"] for row in rows[: len(regressed)]] == regressed
    # the failed night reaches the webhook too
    assert len(stack.webhook.wait(2)) == 2 and second["name"] in stack.webhook.received[1]["subject"]
