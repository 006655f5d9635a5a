"""``vitflow run``'s early Prefect server (flows/prefect_server.py): a real temporary server that answers, is used
through ``PREFECT_API_URL``, and is gone when the command ends; a configured API is left alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil

SCRIPT = textwrap.dedent(
    """
    import os, urllib.request
    from flows import prefect_server
    server = prefect_server.start_if_needed()
    if server is None:
        print("none")
    else:
        server.wait_until_healthy(120)
        from prefect.client.orchestration import get_client  # the API Prefect's own client now uses
        with get_client(sync_client=True) as client:
            assert client.api_url.host == "127.0.0.1" and client.api_healthcheck() is None
        print(server.process.pid, os.environ["PREFECT_API_URL"])
    """
)


def run(tmp_path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environment.update(VITFLOW_HOME=str(tmp_path), **env)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_temporary_server_answers_and_stops_with_the_command(tmp_path):
    pid, url = run(tmp_path).split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "prefect" / "prefect.db").exists()  # Prefect's home inside VITFLOW_HOME, as before


def test_a_configured_api_is_left_alone(tmp_path):
    assert run(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api") == "none"
