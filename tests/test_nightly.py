"""The nightly transfer evaluation, triggered through its deployment on the served stack (real `prefect server`,
`vitflow deploy`, `mlflow server`, S3): a candidate registered in MLflow is evaluated, then a deliberately degraded
checkpoint takes the alias and the next evaluation of the same reference fails, naming what regressed."""

from __future__ import annotations

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


def regression_artifacts(stack: ServedStack, flow_run: dict[str, Any]) -> list[dict[str, Any]]:
    return api_post(
        f"{stack.api}/artifacts/filter",
        {"artifacts": {"key": {"any_": ["regression"]}, "flow_run_id": {"any_": [flow_run["id"]]}}},
    )


def test_nightly_evaluation_flags_a_degraded_checkpoint(served_stack):
    stack = served_stack
    assert register_candidate(stack, "good", degraded=False) == "1"
    first = trigger_nightly(stack)
    assert first["state_type"] == "COMPLETED", stack.serve_log.read_text()[-6000:]
    assert first["deployment_id"] and first["parameters"]["model"] == REFERENCE
    baseline = mlflow_run(stack, first)
    assert baseline.info.status == "FINISHED"
    assert baseline.data.tags["vitflow.regression"] == "false"
    assert baseline.data.tags["vitflow.model_version"] == "1"
    assert not regression_artifacts(stack, first)

    assert register_candidate(stack, "degraded", degraded=True) == "2"
    second = trigger_nightly(stack)
    # the flow run fails, saying why
    assert second["state_type"] == "FAILED", stack.serve_log.read_text()[-6000:]
    message = second["state"]["message"]
    assert "RegressionDetected" in message and f"dropped by more than {THRESHOLD} points" in message, message
    assert baseline.info.run_id in message and BENCH in message
    # the MLflow run is tagged with what regressed
    regressed_run = mlflow_run(stack, second)
    assert regressed_run.info.status == "FAILED"
    assert regressed_run.data.tags["vitflow.regression"] == "true"
    assert regressed_run.data.tags["vitflow.model_version"] == "2"
    regressed = regressed_run.data.tags["vitflow.regressed"].split(", ")
    assert any(m.startswith(BENCH) for m in regressed), regressed
    assert all(m in message for m in regressed)
    # the Prefect artifact of the failed run names the regressed metrics and the run compared with
    (artifact,) = regression_artifacts(stack, second)
    assert artifact["type"] == "markdown"
    assert all(m in artifact["data"] for m in regressed) and baseline.info.run_id in artifact["data"]
