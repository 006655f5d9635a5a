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
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from flows.deployments import definitions
from tests.servers import (
    REPO,
    SERVED_BUCKET,
    SERVED_DEMO,
    TERMINAL,
    UI_BENCH,
    UI_EXPERIMENT,
    api_post,
    wait_for_flow_run,
)

pytest_plugins = ["tests.servers"]

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts" / "ui"
EXPERIMENT = UI_EXPERIMENT
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
BENCH = UI_BENCH
LR = SERVED_DEMO["transfer.finetune.lrs"][0]
# The two typed fields a person changes in the form of benchmark/demo (found by their one-line descriptions), and
# what they type: everything else is the deployment's default, the demo preset as `vitflow deploy --set` made it.
TYPED = {
    "pretrain.lr": ("peak learning rate (Adam)", 0.004),
    "transfer.finetune.steps": ("fine-tuning steps (None: the protocol's)", 8),
}
PRETRAIN_STEPS = "training steps (give steps or epochs)"
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


def demo_deployment(api: str) -> dict[str, Any]:
    """The `benchmark/demo` deployment (`prepare-datasets/demo` has the same name)."""
    (flow,) = api_post(f"{api}/flows/filter", {"flows": {"name": {"any_": ["benchmark"]}}})
    body = {"deployments": {"name": {"any_": ["demo"]}}, "flows": {"id": {"any_": [flow["id"]]}}}
    (deployment,) = api_post(f"{api}/deployments/filter", body)
    return deployment


def form_field(page, description: str):
    """A field of the Custom run form, by its one-line description (the innermost property that shows it)."""
    return page.locator(".schema-form-property", has=page.get_by_text(description, exact=True)).last.locator("input")


def open_custom_run(page, stack, deployment: dict[str, Any]) -> None:
    """Deployments → benchmark/demo → Run → Custom run: the typed form, filled with the deployment's spec."""
    page.goto(f"{stack.ui}/deployments/deployment/{deployment['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    form_field(page, PRETRAIN_STEPS).wait_for()


def leaves(data: Any, path: str = "") -> dict[str, Any]:
    """``{dotted path: value}`` of nested JSON (list items by index)."""
    if isinstance(data, dict | list):
        items = data.items() if isinstance(data, dict) else enumerate(data)
        return {k: v for key, value in items for k, v in leaves(value, f"{path}{key}.").items()}
    return {path.rstrip("."): data}


def watch_progress(api: str, flow_run_id: str, timeout: float = 400) -> tuple[dict[str, Any], list[float]]:
    """Poll the flow run and the progress artifact of its pre-training (the parent run's own progress artifact)
    until the run is over: its final state and every value of the artifact seen meanwhile (a deadline, not a timed
    assert)."""
    seen: list[float] = []
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["progress"]}}}
    start = time.monotonic()
    while True:
        (run,) = api_post(f"{api}/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        seen += [float(a["data"]) for a in api_post(f"{api}/artifacts/filter", body)]
        if run["state_type"] in TERMINAL:
            return run, seen
        assert time.monotonic() - start < timeout, f"flow run {flow_run_id} did not finish within {timeout:.0f} s"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def ui_run(served_stack, browser) -> dict[str, Any]:
    """What a person does in the Prefect UI: deployments → benchmark/demo → Run → Custom run → type two fields →
    Submit, then the run's page once it is over (reached through the link MLflow keeps on the run)."""
    from playwright.sync_api import expect

    stack = served_stack
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{stack.ui}/deployments")
    page.get_by_role("link", name="demo", exact=True).first.wait_for()
    listed = page.inner_text("body")
    shots = {"deployments": shot(page, "prefect-deployments")}
    page.get_by_placeholder("Search deployments").fill("nightly")  # the list has pages: find the nightly one
    page.get_by_text("At 02:00 AM every day").first.wait_for()
    listed += page.inner_text("body")

    deployment = demo_deployment(stack.api)
    open_custom_run(page, stack, deployment)
    run_name = f"ui-benchmark-{uuid.uuid4().hex[:8]}"
    name = page.locator(".flow-run-name-input input")
    expect(name).not_to_have_value("")  # the form generates a name once loaded: replace it after that
    name.fill(run_name)
    shown = {"pretrain.steps": form_field(page, PRETRAIN_STEPS).input_value()}
    shots["form"] = shot(page, "prefect-benchmark-form")  # the top of the form: experiment, model, pre-training
    for path, (description, value) in TYPED.items():
        shown[path] = form_field(page, description).input_value()
        form_field(page, description).fill(str(value))
    form_field(page, TYPED["pretrain.lr"][0]).scroll_into_view_if_needed()
    shots["form-typed"] = shot(page, "prefect-benchmark-form-typed")
    page.get_by_role("button", name="Submit").click()
    back = re.compile(r"/deployments/deployment/[^/]+\?tab=Runs")  # submitted: back on the deployment
    expect(page).to_have_url(back, timeout=30_000)

    submitted = wait_for_flow_run(stack.api, {"name": {"any_": [run_name]}}, terminal=False)
    flow_run, progress = watch_progress(stack.api, submitted["id"])
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
        "deployment": deployment,
        "shown": shown,
        "progress": progress,
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
    default = ui_run["deployment"]["parameters"]["spec"]
    # the form showed the preset's values, and sent them with exactly the two typed changes
    assert ui_run["shown"] == {
        "pretrain.steps": str(SERVED_DEMO["pretrain.steps"]),
        "pretrain.lr": str(default["pretrain"]["lr"]),
        "transfer.finetune.steps": str(SERVED_DEMO["transfer.finetune.steps"]),
    }
    sent, before = leaves(flow_run["parameters"]["spec"]), leaves(default)
    changed = {k: sent.get(k) for k in sent.keys() | before.keys() if sent.get(k) != before.get(k)}
    assert changed == {path: value for path, (_, value) in TYPED.items()}
    assert set(flow_run["parameters"]) <= {"spec", "dispatch"} and flow_run["parameters"].get("dispatch") is None
    assert "preset:demo" in flow_run["tags"]
    # the pre-training's progress artifact moved while it trained, and ended at 100
    assert any(0 < p < 100 for p in ui_run["progress"]) and ui_run["progress"][-1] == 100, ui_run["progress"]
    # the deployments page lists a deployment per preset and the others, with the nightly evaluation's schedule
    names = ("benchmark", "prepare-datasets", "demo", "paper-b16-i1k", "transfer-eval-nightly")
    assert all(n in ui_run["deployments_page"] for n in names)
    assert f"{len(definitions())} Deployments" in ui_run["deployments_page"]
    assert "At 02:00 AM every day" in ui_run["deployments_page"]
    assert ui_run["run_name"] in ui_run["completed_page"] and "Completed" in ui_run["completed_page"]

    (parent,) = ui_run["parents"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["transfer.finetune.steps"] == "8" and parent.data.params["pretrain.lr"] == "0.004"
    assert parent.data.params["pretrain.steps"] == "150" and parent.data.tags["vitflow.preset"] == "demo"
    assert parent.info.run_name.startswith("demo vit_micro_4 ")  # preset, model, date
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
    assert not any(n.endswith(":scratch") for n in children)  # `vitflow deploy --set` turned the baseline off
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


def _flow_run_count(api: str, deployment: dict[str, Any]) -> int:
    body = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    return len(api_post(f"{api}/flow_runs/filter", body))


def test_the_form_refuses_zero_pretraining_steps_before_a_run_starts(served_stack, ui_run, page):
    from playwright.sync_api import expect

    deployment = ui_run["deployment"]
    runs_before = _flow_run_count(served_stack.api, deployment)
    open_custom_run(page, served_stack, deployment)
    form_field(page, PRETRAIN_STEPS).fill("0")
    page.get_by_role("button", name="Submit").click()
    refused = page.get_by_text("Validation failed for field 'spec.pretrain.steps'").first
    expect(refused).to_be_visible()
    assert "0 is less than or equal to the minimum of 0" in refused.inner_text()
    form_field(page, PRETRAIN_STEPS).scroll_into_view_if_needed()
    shot(page, "prefect-benchmark-form-refused")
    assert "/run" in page.url  # still on the form
    assert _flow_run_count(served_stack.api, deployment) == runs_before  # no flow run was created


@pytest.mark.parametrize(("path", "value"), [("steps", 0), ("lr", -1e-3)])
def test_the_api_refuses_a_spec_out_of_range_before_a_run_starts(served_stack, ui_run, path, value):
    deployment = ui_run["deployment"]
    spec = json.loads(json.dumps(deployment["parameters"]["spec"]))
    spec["pretrain"][path] = value
    runs_before = _flow_run_count(served_stack.api, deployment)
    url = f"{served_stack.api}/deployments/{deployment['id']}/create_flow_run"
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_post(url, {"parameters": {"spec": spec}})
    # enforce_parameter_schema: Prefect checks the form's schema and answers 409 (its code for parameters refused)
    assert refused.value.code == 409
    assert f"Validation failed for field 'spec.pretrain.{path}'" in refused.value.read().decode()
    assert _flow_run_count(served_stack.api, deployment) == runs_before


def _pretrain_runs(tracking: str, flow_run_id: str) -> list[Any]:
    return [r for r in _flow_runs_mlflow(tracking, flow_run_id) if r.info.run_name.startswith("pretrain")]


def test_cancel_kills_the_mlflow_runs_and_retry_continues_the_same_parent(served_stack, ui_run):
    """Cancel a running benchmark (a long pre-training): its MLflow runs end KILLED; Retry (what the UI's Retry
    button sends) runs the same flow run again, under the same parent MLflow run and the same pre-training run."""
    api = served_stack.api
    deployment = ui_run["deployment"]
    spec = json.loads(json.dumps(deployment["parameters"]["spec"]))  # a typed spec, as the form sends it
    spec["pretrain"].update(steps=100_000, warmup_steps=10)
    flow_run = api_post(f"{api}/deployments/{deployment['id']}/create_flow_run", {"parameters": {"spec": spec}})

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
    (pretrain,) = _pretrain_runs(served_stack.mlflow, flow_run["id"])

    _set_state(api, flow_run["id"], {"type": "SCHEDULED", "name": "AwaitingRetry"})
    _wait(running_pretrain, "the retried pre-training running", timeout=240)
    parents = [
        r for r in _flow_runs_mlflow(served_stack.mlflow, flow_run["id"]) if r.data.tags["vitflow.stage"] == "flow"
    ]
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and parents[0].info.status == "RUNNING"
    # the retried pre-training logs on under its own earlier run: one loss curve across both attempts
    assert [r.info.run_id for r in _pretrain_runs(served_stack.mlflow, flow_run["id"])] == [pretrain.info.run_id]
    _set_state(api, flow_run["id"], {"type": "CANCELLING"})
    wait_for_flow_run(api, {"id": {"any_": [flow_run["id"]]}})
