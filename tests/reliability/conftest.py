"""Real components for the fault tests: a tiny prepared dataset, engine configs, a SeaweedFS S3 server that can be
stopped and started again on its data, and an `mlflow server` that can be killed and restarted on its port."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows import stack

ENGINE = [sys.executable, "-m", "vit.engine"]
BIN = Path(sys.executable).parent


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (below the ephemeral range)."""
    for base in range(20000 + os.getpid() % 5000, 32000, 17):
        if all(stack.port_is_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError("no free ports")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A prepared synthetic dataset (4 classes, 16 px) on local disk, shared by the training tests."""
    from vit.data import prepare_dataset

    root = tmp_path_factory.mktemp("tiny-data")
    return prepare_dataset(
        "synthetic-upstream:", "tiny", str(root), progress=False, classes=4, per_class=16, test_per_class=2, size=16
    )


def train_config(dataset: str, checkpoint_dir: str, steps: int = 40, every: int = 3, keep: int = 2) -> dict[str, Any]:
    """A deterministic CPU run of a 2-block micro ViT: a few seconds of training."""
    return {
        "model": {"name": "vit_micro_4", "image_size": 16, "overrides": {"depth": 2}},
        "data": {"dataset": dataset},
        "optim": {"name": "adam", "lr": 3e-3, "warmup_steps": 2, "decay": "cosine"},
        "checkpoint": {"dir": checkpoint_dir, "every_steps": every, "every_minutes": None, "keep": keep},
        "batch_size": 8,
        "steps": steps,
        "log_every": 1,
        "deterministic": True,
        "seed": 0,
        "peak_flops": 1e12,  # skip measuring the CPU's matmul throughput
    }


def launch_engine(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m vit.engine`` on ``config``; its events go to ``workdir/events.jsonl`` (appended across runs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    argv = [*ENGINE, str(path), "--metrics", str(workdir / "events.jsonl"), "--no-progress"]
    log = (workdir / "engine.log").open("a")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def events(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wait_for(condition, what: str, timeout: float = 120, interval: float = 0.02, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited first with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


class SeaweedFS:
    """`weed mini` as `vitflow up` runs it (flows/stack.py): S3 signatures checked against random keys, data in
    ``home``, so a stop and a start is an outage, not a wipe."""

    def __init__(self, home: Path) -> None:
        self.home = home
        base = free_ports(12)
        self.ports = stack.StackPorts(prefect=base + 10, mlflow=base + 11, s3=base)
        self.keys = ("reliability", secrets.token_hex(16))
        self.service = stack.build_services(home, self.ports, self.keys, "unused")["seaweedfs"]
        self.endpoint = f"http://{stack.HOST}:{self.ports.s3}"
        self.pid: int | None = None
        for folder in ("logs", "run", "seaweedfs"):
            (stack.stack_dir(home) / folder).mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.keys[0],
            "AWS_SECRET_ACCESS_KEY": self.keys[1],
            "AWS_DEFAULT_REGION": stack.REGION,
        }

    def start(self, buckets: tuple[str, ...] = ("data",)) -> None:
        self.pid = stack.start(self.service, self.home)
        probe = {"seaweedfs": lambda: stack.ensure_buckets(self.ports, self.keys, buckets)}
        stack.wait_healthy(self.home, {"seaweedfs": self.service}, probe, {"seaweedfs": self.pid}, timeout=60)

    def stop(self) -> None:
        if self.pid is not None:
            stack.stop_groups([self.pid], timeout=10)
            self.pid = None

    def client(self):
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5, s3={"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.keys[0],
            aws_secret_access_key=self.keys[1],
            region_name=stack.REGION,
            config=config,
        )


@pytest.fixture
def seaweedfs(tmp_path, monkeypatch) -> Iterator[SeaweedFS]:
    """A running SeaweedFS with a bucket ``data``; boto3 (and so vit.storage) points at it."""
    server = SeaweedFS(tmp_path / "weed-home")
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()


class MlflowServer:
    """`mlflow server` on a fixed port and SQLite file, so it can be killed and started again in place."""

    def __init__(self, home: Path) -> None:
        self.home = home
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [
            str(BIN / "mlflow"),
            "server",
            *("--backend-store-uri", f"sqlite:///{self.home}/mlflow.db"),
            *("--artifacts-destination", str(self.home / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = (self.home / "server.log").open("a")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, "mlflow server", timeout=120, interval=0.3, proc=self.proc)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole server (gunicorn/uvicorn workers included): an outage, not a shutdown."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[MlflowServer]:
    home = tmp_path / "mlflow-server"
    home.mkdir()
    server = MlflowServer(home)
    server.start()
    try:
        yield server
    finally:
        server.kill()
