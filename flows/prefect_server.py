"""Prefect's temporary server for a flow run from the command line, started before anything heavy is imported.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself, when the flow first needs its API: after
this process has imported torch, MLflow and the flows, and after importing Prefect's server application here too
(seconds) only to spawn it. ``vitflow run`` instead spawns the same server (the ASGI app Prefect's temporary server
runs, UI off) as its first act and points ``PREFECT_API_URL`` at it, so it boots while those imports happen. It
stops when the command ends, and dies with it.

Hand-made because Prefect has no public call that starts its temporary server without importing the server app in
the caller; the two ``PREFECT__SERVER_*`` variables are the ones Prefect's own ``SubprocessASGIServer`` sets (pinned
by the ``prefect<4`` requirement, checked by ``tests/test_prefect_server.py``).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.stack import HOST, StackError, http_ok
from tasks.prefork import die_with_parent


class TemporaryServer:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
        self.api_url = f"http://{HOST}:{self.port}/api"
        app = ["--factory", "prefect.server.api.server:create_app", "--lifespan", "on", "--log-level", "error"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *app, "--host", HOST, "--port", str(self.port)],
            env=env,
            preexec_fn=die_with_parent,
        )
        atexit.register(self.stop)

    def wait_until_healthy(self, timeout: float) -> None:
        """Block until the API answers; raise RuntimeError if the server exits or does not answer in time."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode}")
            try:
                http_ok(f"{self.api_url}/health")
                return
            except (OSError, StackError):  # not answering yet, or not 200 yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Prefect's temporary server did not answer on {self.api_url} in {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_if_needed() -> TemporaryServer | None:
    """Start a temporary server and export ``PREFECT_API_URL`` unless one is configured (``vitflow up``'s stack, a
    Prefect profile's API, or Prefect Cloud). Call before Prefect is imported; then ``wait_until_healthy``."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_PROFILE") or "prefect" in sys.modules:
        return None
    profiles = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "profiles.toml"
    if profiles.exists() and "PREFECT_API_URL" in profiles.read_text():
        return None
    server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ.setdefault("PREFECT_UI_URL", "")  # no UI: no "View at" links that stop working with the command
    print(
        f"Starting Prefect's temporary server on {server.api_url} (set PREFECT_API_URL to use a lasting one)",
        file=sys.stderr,
    )
    return server
