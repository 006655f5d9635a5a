"""Shared test setup: offline, isolated homes, small thread counts (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from prefect.logging.configuration import ensure_logging_setup  # noqa: E402

# Prefect sets up its logging once per process, and its console handler keeps the sys.stderr of that moment. Set
# up first inside a CliRunner test, it would keep the runner's temporary stream, closed after that test, and every
# later test logging through Prefect would fail with "I/O operation on closed file".
ensure_logging_setup()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own VITFLOW_HOME and cache, so nothing leaks between tests or into the repo."""
    monkeypatch.setenv("VITFLOW_HOME", str(tmp_path / "vitflow-home"))
    monkeypatch.setenv("VITFLOW_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API server (moto) on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch, request):
    """Point boto3 at the moto server and create a fresh bucket; yields ``s3://<bucket>``."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from vit import storage

    bucket = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    storage.ensure_bucket(f"s3://{bucket}")
    return f"s3://{bucket}"
