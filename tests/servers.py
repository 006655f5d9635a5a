"""Real servers for the operations tests: a `prefect server`, an `mlflow server`, and the deployments served by
`vitflow deploy`, on loopback ports chosen at runtime. Every process starts in its own process group and the whole
group is stopped when its context exits, so nothing outlives the tests.

The served stack (``served_stack``) is shared by the UI and nightly tests: a test module that needs it declares
``pytest_plugins = ["tests.servers"]``, which registers this module once, so the stack starts once per session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVED_BUCKET = "ops-test"
UI_EXPERIMENT = "ui-test"
UI_BENCH = "synth/natural_objects"
# The served demo deployment's defaults (`vitflow deploy --set demo:...`): the demo preset made tiny (a small
# synthetic upstream set, one synthetic VTAB task, a few fine-tuning steps), whatever data demo() itself names.
# Pre-training is long enough (150 tiny steps) for its progress artifact to be seen moving.
SERVED_DEMO = {
    "experiment": UI_EXPERIMENT,
    "pretrain.dataset": {
        "name": "synthetic-upstream",
        "source": "synthetic-upstream:",
        "options": {"classes": 10, "per_class": 20, "size": 32},
    },
    "pretrain.image_size": 32,
    "pretrain.steps": 150,
    "pretrain.batch_size": 16,
    "pretrain.warmup_steps": 4,
    "transfer.benchmarks": [
        {
            "name": UI_BENCH,
            "protocol": "vtab",
            "dataset": {
                "name": "synth-natural_objects",
                "source": "synthetic-vtab:natural_objects",
                "options": {"size": 32, "test": 60},
            },
        }
    ],
    "transfer.finetune.image_size": 32,
    "transfer.finetune.steps": 6,
    "transfer.finetune.batch_size": 16,
    "transfer.finetune.lrs": [0.01],
    "transfer.finetune.seeds": [0],
    "transfer.finetune.sweep": False,
    "transfer.fewshot.shots": [1, 5],
    "transfer.fewshot.seeds": [0],
    "transfer.from_scratch_baseline": False,
    "analysis.enabled": False,
    "compute.device": "cpu",
    "compute.max_parallel": 2,
}
# Server loops the tests never need (schedules, late runs, ...): off, to spare the CI's two cores. The triggers
# service stays on: it evaluates automations (the nightly's failure notification) and runs their actions.
IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "DB_VACUUM")
NOTIFY_BLOCK = "custom-webhook/vitflow-nightly-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    ready: Callable[[], bool], what: str, watch: Sequence[tuple[subprocess.Popen, Path]], timeout: float = 180
) -> None:
    """Poll ``ready`` until it holds; fail with the logs if a watched process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if any(proc.poll() is not None for proc, _ in watch) or time.monotonic() > deadline:
            logs = "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for _, log in watch)
            raise RuntimeError(f"{what} did not become ready:\n{logs}")
        time.sleep(0.5)


def api_post(url: str, body: dict[str, Any]) -> Any:
    """POST JSON to a Prefect API endpoint (``.../filter``) and return the decoded answer."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for_flow_run(
    api: str, flow_run_filter: dict[str, Any], timeout: float = 300, terminal: bool = True
) -> dict[str, Any]:
    """The first flow run matching ``flow_run_filter`` once it reaches a terminal state (``terminal=False``: once
    it exists)."""
    start = time.monotonic()
    while True:
        runs = api_post(f"{api}/flow_runs/filter", {"flow_runs": flow_run_filter})
        if runs and (runs[0]["state_type"] in TERMINAL or not terminal):
            return runs[0]
        elapsed = time.monotonic() - start
        assert runs or elapsed < 30, f"no flow run matches {flow_run_filter}"
        assert elapsed < timeout, f"flow run {flow_run_filter} did not finish within {timeout:.0f} s"
        time.sleep(1)


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run ``argv`` in a new process group (output to ``log``); SIGTERM the group on exit, SIGKILL if it lingers."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect process with its own home and download cache (a cache shared with other runs
    would hand it files of an earlier test's objects at the same S3 URIs), the client of ``api_url``."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "VITFLOW_CACHE": str(home / "cache"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the moto S3 server (boto3 reads the endpoint from the environment)."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def servers(home: Path) -> Iterator[tuple[str, str]]:
    """`prefect server start` (SQLite) and `mlflow server` (SQLite, artifacts served from ``home``), started side by
    side; yields (Prefect API URL, MLflow URL). The Prefect UI is at the API's address without ``/api``."""
    for sub in ("prefect", "mlflow"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    prefect_port, mlflow_port = free_port(), free_port()
    api, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    prefect_vars = {
        **prefect_env(home / "prefect"),
        "PREFECT_UI_API_URL": api,  # the browser's API address (the UI's default is port 4200)
        **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in IDLE_SERVICES},
    }
    prefect_argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_argv = [
        str(BIN / "mlflow"),
        "server",
        *("--backend-store-uri", f"sqlite:///{home}/mlflow/mlflow.db"),
        *("--artifacts-destination", str(home / "mlflow" / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"),
    ]
    mlflow_vars = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    prefect_log, mlflow_log = home / "prefect" / "server.log", home / "mlflow" / "server.log"
    with (
        background(prefect_argv, prefect_vars, prefect_log) as prefect_proc,
        background(mlflow_argv, mlflow_vars, mlflow_log) as mlflow_proc,
    ):
        watch = [(prefect_proc, prefect_log), (mlflow_proc, mlflow_log)]
        wait_until(lambda: http_ok(f"{api}/health") and http_ok(f"{mlflow_url}/health"), "servers", watch)
        yield api, mlflow_url


class WebhookListener:
    """A local HTTP server (``http.server``) that records the JSON bodies POSTed to it: the receiving end of a
    notification block."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 120) -> list[dict[str, Any]]:
        """The bodies received, once there are ``count`` (the automation acts asynchronously)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return list(self.received)


def save_notify_block(api: str, url: str) -> None:
    """The notification block a user configures: a custom webhook (private URLs such as loopback are allowed)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    block = CustomWebhookNotificationBlock(
        name="vitflow nightly", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    )
    with temporary_settings(updates={PREFECT_API_URL: api}):
        block.save(NOTIFY_BLOCK.split("/")[1], overwrite=True)


@dataclass(frozen=True)
class ServedStack:
    api: str  # Prefect API
    ui: str  # Prefect UI
    mlflow: str
    s3: dict[str, str]  # the S3 environment the served runs use
    artifact_root: str
    serve_log: Path
    webhook: WebhookListener  # receives the notifications of the automations `vitflow deploy` created


def served_deployments(api: str) -> list[str]:
    """The names of the deployments on the server, sorted (``benchmark/demo`` and ``prepare-datasets/demo`` are
    both ``demo``)."""
    try:
        return sorted(d["name"] for d in api_post(f"{api}/deployments/filter", {}))
    except OSError:
        return []


def deploy_argv() -> list[str]:
    """`vitflow deploy` with the served demo deployment's defaults (``SERVED_DEMO``)."""
    sets = [f"demo:{path}={json.dumps(value)}" for path, value in SERVED_DEMO.items()]
    return [str(BIN / "vitflow"), "deploy", *(arg for item in sets for arg in ("--set", item))]


@pytest.fixture(scope="session")
def served_stack(tmp_path_factory, moto_endpoint) -> Iterator[ServedStack]:
    """Prefect server + MLflow server + `vitflow deploy` serving every deployment; artifacts in S3 (moto)."""
    from flows.deployments import definitions
    from vit import storage

    home = tmp_path_factory.mktemp("served-stack")
    s3 = s3_env(moto_endpoint)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.items():
            mp.setenv(key, value)
        storage.ensure_bucket(f"s3://{SERVED_BUCKET}")
    root = f"s3://{SERVED_BUCKET}/vitflow"
    with servers(home) as (api, mlflow_url):
        webhook = WebhookListener()
        save_notify_block(api, webhook.url)
        env = {
            **prefect_env(home / "client", api),
            **s3,
            "MLFLOW_TRACKING_URI": mlflow_url,
            "VITFLOW_ARTIFACT_ROOT": root,
            "VITFLOW_HOME": str(home / "vitflow"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "VITFLOW_NOTIFY_BLOCK": NOTIFY_BLOCK,
        }
        log = home / "serve.log"
        expected = sorted(d.name for d in definitions())
        with background(deploy_argv(), env, log, cwd=REPO) as proc:
            wait_until(lambda: served_deployments(api) == expected, "vitflow deploy", [(proc, log)])
            yield ServedStack(api, api.removesuffix("/api"), mlflow_url, s3, root, log, webhook)
        webhook.server.shutdown()
