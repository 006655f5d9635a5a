"""The Prefect and MLflow UIs in a real browser (headless Debian Chromium driven by Playwright).

On the served stack (a real `prefect server`, `vitflow deploy` serving the deployments, an `mlflow server`, S3 on
moto) a person opens the Prefect UI, starts a custom run of `benchmark` from its form (the demo preset with small
overrides), the run completes and its runs are in MLflow; then compares two of them in MLflow's UI. Screenshots are
kept in ``test-artifacts/ui/`` (git-ignored).
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.helpers import SYNTHETIC_DEMO
from tests.servers import REPO, SERVED_BUCKET, api_post, wait_for_flow_run

pytest_plugins = ["tests.servers"]

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts" / "ui"
EXPERIMENT = "ui-test"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BENCH = "synth/natural_objects"
LR = 0.01
# What a person types into the `overrides` field: the demo preset made small (one benchmark, a few steps).
OVERRIDES = {
    **SYNTHETIC_DEMO,
    "experiment": EXPERIMENT,
    "pretrain.steps": 16,
    "pretrain.batch_size": 32,
    "pretrain.warmup_steps": 4,
    "pretrain.dataset.options.classes": 10,
    "pretrain.dataset.options.per_class": 20,
    "transfer.benchmarks": [
        {
            "name": BENCH,
            "protocol": "vtab",
            "dataset": {
                "name": "synth-natural_objects",
                "source": "synthetic-vtab:natural_objects",
                "options": {"size": 32, "test": 60},
            },
        }
    ],
    "transfer.finetune.steps": 6,
    "transfer.finetune.batch_size": 16,
    "transfer.finetune.lrs": [LR],
    "transfer.fewshot.shots": [1, 5],
    "transfer.fewshot.seeds": [0],
    "transfer.from_scratch_baseline": False,
    "analysis.enabled": False,
    "compute.max_parallel": 2,
}
STAGES = ["pretrain:vit_micro_4", f"finetune:{BENCH}:lr={LR:g}"]  # the two runs compared in MLflow


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing (.ci/run installs it)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def shot(page, name: str, full_page: bool = False) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture(scope="module")
def ui_run(served_stack, browser) -> dict[str, Any]:
    """What a person does in the Prefect UI: deployments → benchmark → Run → Custom run → fill the form → Submit,
    then the run's page once it is over (reached through the link MLflow keeps on the run)."""
    from playwright.sync_api import expect

    stack = served_stack
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{stack.ui}/deployments")
    page.get_by_role("link", name="benchmark", exact=True).first.wait_for()
    listed = page.inner_text("body")
    shots = {"deployments": shot(page, "prefect-deployments")}

    page.get_by_role("link", name="benchmark", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()

    def field(parameter: str):
        return page.locator(".schema-form-property", has_text=f"{parameter} (Optional)").locator("textarea")

    run_name = f"ui-benchmark-{uuid.uuid4().hex[:8]}"
    name = page.locator(".flow-run-name-input input")
    expect(name).not_to_have_value("")  # the form generates a name once loaded: replace it after that
    name.fill(run_name)
    field("preset").fill("demo")
    field("overrides").fill(json.dumps(OVERRIDES, indent=1))
    shots["form"] = shot(page, "prefect-benchmark-form", full_page=True)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"/deployments/deployment/[^/]+\?tab=Runs"))  # back on the deployment

    flow_run = wait_for_flow_run(stack.api, {"name": {"any_": [run_name]}})
    client = MlflowClient(stack.mlflow)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = (
        client.search_runs(
            [experiment.experiment_id],
            f"tags.`prefect.flow_run_id` = '{flow_run['id']}' and tags.`vitflow.stage` = 'flow'",
        )
        if experiment
        else []
    )
    completed_page, run_page = "", {}
    if parents:
        page.goto(parents[0].data.tags["prefect.flow_run_url"])
        page.get_by_text(run_name).first.wait_for()
        if flow_run["state_type"] == "COMPLETED":  # else the test reports the state and the served log
            page.get_by_text("Completed").first.wait_for()
        shots["completed"] = shot(page, "prefect-benchmark-completed")
        completed_page = page.inner_text("body")
        run_page = _run_page(page, stack, flow_run, shots)
    context.close()
    return {
        "flow_run": flow_run,
        "parents": parents,
        "deployments_page": listed,
        "completed_page": completed_page,
        "run_name": run_name,
        "shots": shots,
        "run_page": run_page,
    }


def _artifacts(api: str, flow_run_id: str) -> dict[str, dict[str, Any]]:
    """The flow run's own Prefect artifacts (not its subflows' or tasks'), by key."""
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode()
    request = urllib.request.Request(f"{api}/artifacts/filter", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        artifacts = json.load(response)
    return {a["key"]: a for a in artifacts if a["key"] and a["task_run_id"] is None}


def _run_page(page, stack, flow_run: dict[str, Any], shots: dict[str, Path]) -> dict[str, Any]:
    """What the parent run's page shows: its Artifacts tab, the report artifact's images (decoded by the browser
    or not) and where the MLflow link leads."""
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("results-table").first.wait_for()
    shots["run-artifacts"] = shot(page, "prefect-benchmark-artifacts", full_page=True)
    artifacts_tab = page.inner_text("body")
    artifacts = _artifacts(stack.api, flow_run["id"])
    page.goto(f"{stack.ui}/artifacts/artifact/{artifacts['report']['id']}")
    page.locator("img").first.wait_for()
    page.wait_for_function("[...document.images].every(i => i.complete)")
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
    shots["report"] = shot(page, "prefect-benchmark-report", full_page=True)
    page.goto(f"{stack.ui}/artifacts/artifact/{artifacts['links']['id']}")
    link = page.get_by_role("link", name="MLflow parent run")
    link.wait_for()
    shots["links"] = shot(page, "prefect-benchmark-links")
    page.goto(link.get_attribute("href"))
    page.get_by_text("benchmark", exact=False).first.wait_for()
    return {"artifacts_tab": artifacts_tab, "artifacts": artifacts, "widths": widths, "mlflow": page.inner_text("body")}


def test_custom_benchmark_run_from_the_prefect_ui_lands_in_mlflow(served_stack, ui_run):
    flow_run = ui_run["flow_run"]
    assert flow_run["state_type"] == "COMPLETED", served_stack.serve_log.read_text()[-6000:]
    assert flow_run["parameters"]["preset"] == "demo"
    assert flow_run["parameters"]["overrides"] == OVERRIDES  # the form sent exactly what was typed
    # the deployments page lists every deployment, with the nightly evaluation's cron schedule
    assert all(n in ui_run["deployments_page"] for n in ("benchmark", "transfer-eval-nightly", "prepare-datasets"))
    assert "At 02:00 AM every day" in ui_run["deployments_page"]
    assert ui_run["run_name"] in ui_run["completed_page"] and "Completed" in ui_run["completed_page"]

    (parent,) = ui_run["parents"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["transfer.finetune.steps"] == "6" and parent.data.params["pretrain.steps"] == "16"
    assert parent.data.tags["vitflow.results_uri"].startswith(f"s3://{SERVED_BUCKET}/vitflow/runs/")
    client = MlflowClient(served_stack.mlflow)
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=100
        )
    }
    assert {
        "prepare:synthetic-upstream",
        "prepare:synth-natural_objects",
        *STAGES,
        f"fewshot:{BENCH}",
        "aggregate",
    } <= set(children)
    assert not any(n.endswith(":scratch") for n in children)  # the override turned the baseline off
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert 0.0 <= children[STAGES[1]].data.metrics["test/top1"] <= 1.0
    assert "fewshot/synth/natural_objects/5shot" in children[f"fewshot:{BENCH}"].data.metrics
    # the pre-trained model is registered under the experiment's name, with the alias the nightly evaluation reads
    version = client.get_model_version_by_alias(f"{EXPERIMENT}-vit_micro_4", "candidate")
    assert version.run_id == children[STAGES[0]].info.run_id
    assert {"deployments", "form", "completed", "run-artifacts", "report"} <= set(ui_run["shots"])
    assert all(p.stat().st_size > 10_000 for p in ui_run["shots"].values())
    print(f"screenshots: {SHOTS}")


def test_the_flow_run_page_holds_the_results_report_and_http_links(served_stack, ui_run):
    run_page = ui_run["run_page"]
    assert {"results-table", "report", "links", "mlflow-run"} <= set(run_page["artifacts"])  # on the parent run
    assert "results-table" in run_page["artifacts_tab"] and "report" in run_page["artifacts_tab"]
    table = json.loads(run_page["artifacts"]["results-table"]["data"])
    assert [row["benchmark"] for row in table] == [BENCH]
    assert run_page["widths"] and all(w > 0 for w in run_page["widths"])  # every plot of the report is drawn
    links = run_page["artifacts"]["links"]["data"]
    urls = re.findall(r"\]\(([^)]+)\)", links)
    assert "s3://" not in links and urls and all(u.startswith(served_stack.mlflow) for u in urls)
    assert all(f"[{name}]" in links for name in STAGES)  # each stage's MLflow run
    report = next(u for u in urls if "get-artifact" in u)
    with urllib.request.urlopen(report) as response:
        assert b"<img" in response.read()  # the HTML report, served through MLflow
    (parent,) = ui_run["parents"]
    assert parent.info.run_id in run_page["artifacts"]["mlflow-run"]["data"]
    assert parent.info.run_name in run_page["mlflow"]  # the link opened the parent run's MLflow page


def test_mlflow_ui_compares_the_pretraining_and_the_finetune(served_stack, ui_run, page):
    (parent,) = ui_run["parents"]
    client = MlflowClient(served_stack.mlflow)
    experiment_id = parent.info.experiment_id
    runs = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    ids = [runs[n] for n in STAGES]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    page.goto(f"{served_stack.mlflow}/#/compare-runs?{query}")
    page.get_by_text("Comparing 2 Runs").wait_for()
    close_assistant = page.get_by_role("button", name="Close")
    if close_assistant.count():
        close_assistant.first.click()
    page.get_by_role("link", name="train/loss", exact=True).scroll_into_view_if_needed()  # the metrics table
    text = page.inner_text("body")
    path = shot(page, "mlflow-compare-runs")
    assert all(n in text for n in STAGES) and all(i in text for i in ids)
    lines = {line.strip() for line in text.splitlines()}
    assert {"Parameters", "Metrics", "train/loss", "train/lr"} <= lines  # both runs' curves side by side
    assert path.stat().st_size > 10_000


def _flow_runs_mlflow(tracking: str, flow_run_id: str) -> list[Any]:
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    filter_ = f"tags.`prefect.flow_run_id` = '{flow_run_id}'"
    return client.search_runs([experiment.experiment_id], filter_) if experiment else []


def _wait(condition, what: str, timeout: float = 120) -> Any:
    """Poll ``condition`` until it returns something truthy (a deadline, not a timed assert: fails only if the
    event never comes)."""
    start = time.monotonic()
    while not (found := condition()):
        assert time.monotonic() - start < timeout, f"never saw {what}"
        time.sleep(1)
    return found


def _set_state(api: str, flow_run_id: str, state: dict[str, str]) -> None:
    api_post(f"{api}/flow_runs/{flow_run_id}/set_state", {"state": state, "force": True})


def test_cancel_kills_the_mlflow_runs_and_retry_continues_the_same_parent(served_stack, ui_run):
    """Cancel a running benchmark (a long pre-training): its MLflow runs end KILLED; Retry (what the UI's Retry
    button sends) runs the same flow run again, under the same parent MLflow run."""
    api = served_stack.api
    (deployment,) = api_post(f"{api}/deployments/filter", {"deployments": {"name": {"any_": ["benchmark"]}}})
    overrides = {**OVERRIDES, "pretrain.steps": 100_000, "pretrain.warmup_steps": 10}
    flow_run = api_post(
        f"{api}/deployments/{deployment['id']}/create_flow_run", {"parameters": {"overrides": overrides}}
    )

    def running_pretrain() -> list[Any]:
        runs = _flow_runs_mlflow(served_stack.mlflow, flow_run["id"])
        return [r for r in runs if r.info.run_name.startswith("pretrain") and r.info.status == "RUNNING"] and runs

    _wait(running_pretrain, "the pre-training running", timeout=240)
    _set_state(api, flow_run["id"], {"type": "CANCELLING"})
    assert wait_for_flow_run(api, {"id": {"any_": [flow_run["id"]]}})["state_type"] == "CANCELLED"
    runs = _wait(
        lambda: (
            (r := _flow_runs_mlflow(served_stack.mlflow, flow_run["id"]))
            and all(x.info.status != "RUNNING" for x in r)
            and r
        ),
        "every MLflow run ended",
    )
    status = {r.info.run_name: r.info.status for r in runs}
    assert {s for n, s in status.items() if not n.startswith("prepare:")} == {"KILLED"}, status  # flow, pretrain
    assert {s for n, s in status.items() if n.startswith("prepare:")} == {"FINISHED"}  # done before the cancel
    (parent,) = [r for r in runs if r.data.tags["vitflow.stage"] == "flow"]
    assert parent.info.run_name.startswith("demo vit_micro_4 ")  # preset, model, date

    _set_state(api, flow_run["id"], {"type": "SCHEDULED", "name": "AwaitingRetry"})
    _wait(running_pretrain, "the retried pre-training running", timeout=240)
    parents = [
        r for r in _flow_runs_mlflow(served_stack.mlflow, flow_run["id"]) if r.data.tags["vitflow.stage"] == "flow"
    ]
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "RUNNING"
    _set_state(api, flow_run["id"], {"type": "CANCELLING"})
    wait_for_flow_run(api, {"id": {"any_": [flow_run["id"]]}})
