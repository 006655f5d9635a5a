"""One storage layer for every read and write of artifacts: local paths / ``file://`` URIs and ``s3://``.

S3 goes through boto3, so any S3-compatible server works; the endpoint comes from ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``) exactly as boto3 reads it. Transient faults (connection refused, timeouts, 5xx, throttling)
are retried by botocore itself, the one retry layer (:func:`s3_client`), for up to ``S3_RETRY_WINDOW`` (300 s),
which rides out a storage server restart; what still fails is a StorageError naming the endpoint, the bucket and
what to check. :func:`check_writable` refuses a misconfigured root within seconds (one attempt). Writes are
atomic: a local file appears under its name only once complete (write-to-temp + rename), an S3 object only once
its (multipart) upload has completed.

Remote files needed locally (checkpoints over ``https://`` or ``s3://``) are fetched once into a cache
(``VITFLOW_CACHE``, default ``~/.cache/vitflow``).

:func:`exclusive` gives one writer per output (a dataset, a pipeline stage) among concurrent runs: a local lock
file held with ``flock`` (the kernel drops it when its holder dies), or an S3 lock object created with a
conditional put and kept alive by a heartbeat (taken over once its holder is dead or silent for ``lock_ttl()``),
with a fence: every write under the output's prefix, in the holder and in the processes it starts, first checks
that the lock is still its own (:func:`check_fences`), so a holder that lost its lock stops writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
log = logging.getLogger("vitflow.storage")


class StorageError(RuntimeError):
    """A storage operation failed for a reason retrying will not fix (missing bucket, denied, disk full, ...)."""


# --------------------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def is_http(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(("http://", "https://"))


def local_path(uri: str | os.PathLike) -> Path:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    s = str(uri)
    if s.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(s).path))
    if "://" in s:
        raise StorageError(f"not a local path: {s}")
    return Path(s)


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3://bucket/key URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a local path or URI with '/'."""
    out = str(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def validate_uri(uri: str) -> str:
    """Refuse URIs this layer cannot address (unknown scheme, s3 without a bucket) with a clear message."""
    s = str(uri)
    if not s:
        raise StorageError("empty storage URI")
    if "://" in s:
        scheme = s.split("://", 1)[0]
        if scheme not in ("file", "s3", "http", "https"):
            raise StorageError(f"unsupported URI scheme {scheme!r} in {s!r}: use a local path, file://, or s3://")
        if scheme == "s3":
            split_s3(s)
    return s


# --------------------------------------------------------------------------------------------------------------
# S3 client: botocore does the retrying, this layer only names what failed

S3_ATTEMPTS = 9  # botocore "legacy" retries: jittered backoff rand * 2^i s, at most 1 + 2 + ... + 128 = 255 s
S3_CONNECT_TIMEOUT = 5.0
S3_RETRY_WINDOW = (2 ** (S3_ATTEMPTS - 1) - 1) + S3_ATTEMPTS * S3_CONNECT_TIMEOUT  # worst case of one call: 300 s

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def endpoint() -> str:
    """The S3 endpoint boto3 uses (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def s3_client(attempts: int = S3_ATTEMPTS):
    """A boto3 S3 client for the current environment (endpoint and credentials), cached per environment.

    The one retry layer for S3: botocore's "legacy" mode retries connection errors, timeouts, 5xx and throttling
    with exponential backoff (``S3_ATTEMPTS`` attempts, a ``S3_RETRY_WINDOW`` of 300 s at worst, which rides out
    a storage server restart); it has no shared retry quota, so many parallel calls during an outage all keep
    retrying ("standard" mode gives up once its quota is spent). ``attempts=1``: one try, for start-up checks."""
    key = (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        attempts,
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": attempts - 1, "mode": "legacy"},  # legacy counts retries, not attempts
                connect_timeout=S3_CONNECT_TIMEOUT,
                read_timeout=60,
                s3={"addressing_style": "path"} if key[0] else None,
            )
            client = boto3.session.Session().client("s3", region_name=key[1] or "us-east-1", config=config)
            _clients[key] = client
        return client


_PERMANENT_CODES = {
    "NoSuchBucket": "bucket does not exist: {bucket!r} at {endpoint}; create it (`aws s3 mb s3://{bucket}`) or fix "
    "the URI",
    "AccessDenied": "{endpoint} denied access to bucket {bucket!r}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
    "and the bucket policy",
    "InvalidAccessKeyId": "{endpoint} does not know the access key of AWS_ACCESS_KEY_ID (bucket {bucket!r})",
    "SignatureDoesNotMatch": "{endpoint} refused the signature for bucket {bucket!r}: check AWS_SECRET_ACCESS_KEY",
    "NoSuchKey": "object does not exist",
    "404": "object does not exist",
    "403": "{endpoint} denied access to bucket {bucket!r}: check the credentials and the bucket policy",
}


def _describe(exc: BaseException, uri: str) -> StorageError:
    """A StorageError naming what failed, where, and what to check."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint()}: check AWS_ENDPOINT_URL_S3 ({exc})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else ""
        hint = _PERMANENT_CODES.get(code, f"{exc} (endpoint {{endpoint}})")
        return StorageError(f"{uri}: {hint.format(bucket=bucket, endpoint=endpoint())}")
    return StorageError(f"{uri}: {exc}")


def _s3(fn: Callable[[], T], uri: str) -> T:
    """``fn`` (boto3 calls, retried by botocore itself) with its final failure turned into a StorageError."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise _describe(exc, uri) from exc


# --------------------------------------------------------------------------------------------------------------
# Operations


def _atomic_local_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"no space left writing {path}: free space on {path.parent} or move the root") from exc
        raise StorageError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _transfer_config():
    """Multipart above 64 MiB: S3 shows the object only once the upload is completed, never a partial one."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object atomically."""
    check_fences(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = _transfer_config()
        _s3(lambda: s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=config), uri)
    else:
        _atomic_local_write(local_path(uri), lambda f: f.write(data))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        with _S3ObjectStream(uri, 0) as stream:
            return stream.read()
    if is_http(uri):
        return fetch(uri).read_bytes()
    path = local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: file does not exist") from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (S3: multipart above 64 MiB, completed or not at all)."""
    src = Path(local)
    check_fences(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = _transfer_config()
        _s3(lambda: s3_client().upload_file(str(src), bucket, key, Config=config), uri)
    else:
        dst = local_path(uri)
        if dst.resolve() == src.resolve():
            return

        def copy(f: BinaryIO) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        _atomic_local_write(dst, copy)


def download(uri: str, local: str | os.PathLike) -> Path:
    """Copy ``uri`` to a local file atomically and return its path."""
    dst = Path(local)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        try:
            _s3(lambda: s3_client().download_file(bucket, key, str(tmp)), uri)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return dst
    if is_http(uri):
        shutil.copyfile(fetch(uri), dst)
        return dst
    upload(local_path(uri), str(dst))
    return dst


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

        return _s3(head, uri)
    return local_path(uri).exists()


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3(lambda: s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"], uri)
    return local_path(uri).stat().st_size


def list_files(prefix: str) -> list[str]:
    """Every file (object) under a directory-like prefix, as full URIs, sorted."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def listing() -> list[str]:
            out = []
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
            return out

        return sorted(_s3(listing, prefix))
    root = local_path(prefix)
    if not root.is_dir():
        return []
    base = str(prefix).rstrip("/")
    return sorted(f"{base}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file())


def list_dirs(prefix: str) -> list[str]:
    """Immediate sub-directory names (common prefixes on S3) under ``prefix``."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def listing() -> list[str]:
            names = []
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
            for page in pages:
                names.extend(p["Prefix"][len(key) :].rstrip("/") for p in page.get("CommonPrefixes", []))
            return names

        return sorted(_s3(listing, prefix))
    root = local_path(prefix)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def delete(uri: str) -> None:
    check_fences(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _s3(lambda: s3_client().delete_object(Bucket=bucket, Key=key), uri)
    else:
        local_path(uri).unlink(missing_ok=True)


def delete_prefix(prefix: str) -> None:
    check_fences(prefix)
    if is_s3(prefix):
        for uri in list_files(prefix):
            delete(uri)
    else:
        shutil.rmtree(local_path(prefix), ignore_errors=True)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it does not exist (used by local stacks and tests)."""
    if not is_s3(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)
        return
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(uri)

    def create() -> None:
        try:
            s3_client().head_bucket(Bucket=bucket)
        except ClientError:
            s3_client().create_bucket(Bucket=bucket)

    _s3(create, uri)


def check_writable(root: str) -> None:
    """Refuse, within seconds, an artifact root that cannot be written (unreachable endpoint, unknown bucket, bad
    credentials): one attempt, no retries, since a configuration error is not transient."""
    probe = join(root, f".vitflow-write-probe-{os.getpid()}-{random.randrange(1 << 30)}")
    if not is_s3(probe):
        write_bytes(probe, b"ok")
        delete(probe)
        return
    bucket, key = split_s3(probe)
    client = s3_client(attempts=1)
    _s3(lambda: client.put_object(Bucket=bucket, Key=key, Body=b"ok"), root)
    _s3(lambda: client.delete_object(Bucket=bucket, Key=key), root)


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("VITFLOW_CACHE", Path.home() / ".cache" / "vitflow"))


def fetch(uri: str | os.PathLike) -> Path:
    """A local path for ``uri``: local files as they are; ``s3://`` and ``http(s)://`` downloaded once to the cache.

    An S3 object is cached under its URI and ETag, so an object rewritten in place (a bucket reused, a file
    replaced by hand) is downloaded again rather than served stale; https checkpoints are immutable releases.
    By hand: fsspec's file cache would need s3fs (aiobotocore, a second S3 client with its own retries and
    credentials) for what is one HEAD and one download on the boto3 client.
    """
    s = validate_uri(str(uri))
    if not (is_s3(s) or is_http(s)):
        path = local_path(s)
        if not path.exists():
            raise StorageError(f"{s}: file does not exist")
        return path
    version = ""
    if is_s3(s):
        bucket, key = split_s3(s)
        version = _s3(lambda: s3_client().head_object(Bucket=bucket, Key=key)["ETag"], s)
    digest = hashlib.sha256(f"{s}\n{version}".encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlparse(s).path).name or "download"
    target = cache_dir() / digest / name
    if target.exists():
        return target
    if is_s3(s):
        return download(s, target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(f: BinaryIO) -> None:
        with urllib.request.urlopen(s, timeout=60) as response:  # noqa: S310 - user-supplied checkpoint URL
            shutil.copyfileobj(response, f, 1 << 20)

    _atomic_local_write(target, write)
    return target


# --------------------------------------------------------------------------------------------------------------
# Ranged, resumable and moving operations (dataset shards)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a file or object starting at ``offset`` (S3: one ranged GET)."""
    if length <= 0:
        return b""
    if is_s3(uri):
        with _S3ObjectStream(uri, offset, offset + length) as stream:
            return stream.read()
    try:
        with open(local_path(uri), "rb") as f:
            f.seek(offset)
            return f.read(length)
    except FileNotFoundError:
        raise StorageError(f"{uri}: file does not exist") from None


class _S3ObjectStream:
    """A forward-only read of bytes ``[offset, end)`` of an S3 object. Written by hand because botocore retries
    requests but not the read of a body already streaming: after a fault mid-stream (a dropped connection half-way
    through a shard) it reopens at the byte where it stopped, so a long read survives a server restart."""

    REOPENS = 3

    def __init__(self, uri: str, offset: int, end: int | None = None) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos, self.end = offset, end
        self._body = None

    def _open(self):
        byte_range = f"bytes={self.pos}-{'' if self.end is None else self.end - 1}"
        get = lambda: s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=byte_range)  # noqa: E731
        return _s3(get, self.uri)["Body"]

    def read(self, n: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(self.REOPENS + 1):
            if self._body is None:
                self._body = self._open()
            try:
                data = self._body.read(None if n < 0 else n)
                break
            except (BotoCoreError, HTTPError, OSError) as exc:
                self.close()  # the next attempt reopens at self.pos
                if attempt == self.REOPENS:
                    raise StorageError(f"{self.uri}: reading stopped at byte {self.pos}: {exc}") from exc
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def __enter__(self) -> _S3ObjectStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream_at(uri: str, offset: int = 0) -> BinaryIO:
    """A readable binary stream positioned at ``offset``. S3 objects are streamed (not downloaded first) and the
    stream resumes by itself after transient faults; local files are seekable."""
    if is_s3(uri):
        return _S3ObjectStream(uri, offset)  # type: ignore[return-value]
    try:
        f = open(local_path(uri), "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise StorageError(f"{uri}: file does not exist") from None
    f.seek(offset)
    return f


def publish_file(local: str | os.PathLike, uri: str) -> None:
    """Move a finished local file to ``uri`` atomically: a rename when both are on one filesystem, else a copy
    (S3: an upload, multipart when large); the local file is gone afterwards."""
    src = Path(local)
    check_fences(uri)
    if not is_s3(uri):
        dst = local_path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StorageError(f"cannot move {src} to {dst}: {exc}") from exc
    upload(src, uri)
    src.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Locks: one writer per output among concurrent runs


class LockLost(StorageError):
    """This process's S3 lock was taken over (its heartbeat went silent for longer than the TTL): it must stop
    writing the output the lock guards."""


def lock_ttl() -> float:
    """Seconds without a heartbeat after which an S3 lock is stale: ``VITFLOW_LOCK_TTL``, default 600 s, which
    must exceed ``S3_RETRY_WINDOW`` (a holder whose heartbeat rides out an outage in botocore's retries keeps
    its lock)."""
    return float(os.environ.get("VITFLOW_LOCK_TTL", "600"))


@dataclass(frozen=True)
class Fence:
    """Writes under ``prefix`` are allowed only while the lock object ``lock`` still carries ``token``."""

    prefix: str
    lock: str
    token: str
    ttl: float


FENCES_VARIABLE = "VITFLOW_STORAGE_FENCES"  # the held fences, inherited by child processes (the training engine)
_fences: dict[str, Fence] = {}
_fences_lock = threading.Lock()


def _publish_fences() -> None:
    """Mirror this process's fences into its environment, so that the processes it starts (training) obey them."""
    if _fences:
        os.environ[FENCES_VARIABLE] = json.dumps([asdict(f) for f in _fences.values()])
    else:
        os.environ.pop(FENCES_VARIABLE, None)


def _active_fences() -> list[Fence]:
    with _fences_lock:
        inherited = [Fence(**f) for f in json.loads(os.environ.get(FENCES_VARIABLE) or "[]")]
        return list({f.prefix: f for f in [*inherited, *_fences.values()]}.values())


def check_fences(uri: str) -> None:
    """Fencing for the S3 lock: before a write under a locked prefix, the lock object must still name this
    holder and have a heartbeat younger than TTL/2; a write then cannot outlive the lock unless it takes longer
    than TTL/2. A stale heartbeat waits (for it to beat again, or for a takeover); a takeover raises LockLost.
    Only a write already in flight when its process froze can land after a takeover: S3 has no write conditional
    on another object."""
    target = str(uri).rstrip("/")
    for fence in _active_fences():
        if target == fence.prefix or target.startswith(fence.prefix + "/"):
            while True:
                owner, _, age = _read_lock(fence.lock) or ({}, "", 0.0)
                if owner.get("token") != fence.token:
                    raise LockLost(f"{fence.lock} was taken over by another run: stopped before writing {uri}")
                if age < fence.ttl / 2:
                    break
                time.sleep(min(1.0, fence.ttl / 20))


class Lock:
    """A held lock (see :func:`exclusive`); releasing it lets the next waiter in. A context manager."""

    def __init__(self, uri: str, release: Callable[[], None]) -> None:
        self.uri = uri
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner() -> dict[str, object]:
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_local_lock(path: Path) -> Lock | None:
    """``flock`` on ``path``; None while another process or thread holds it. The kernel releases the lock of a
    dead holder and never takes it from a live (even a frozen) one, so a local lock is never stale and needs no
    fencing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # the previous holder removed it after we opened it: lock the new file instead
        same = False
    if not same:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_owner()).encode())  # who holds it, for people looking at the folder

    def release() -> None:
        Path(path).unlink(missing_ok=True)  # before unlocking: a waiter that locked the old file retries
        os.close(fd)

    return Lock(str(path), release)


def _precondition_failed(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _conditional(fn: Callable[[], T], uri: str) -> T | None:
    """``fn`` (a conditional S3 request); None when its condition failed."""
    from botocore.exceptions import ClientError

    try:
        return fn()
    except ClientError as exc:
        if _precondition_failed(exc):
            return None
        raise _describe(exc, uri) from exc
    except Exception as exc:
        raise _describe(exc, uri) from exc


def _read_lock(uri: str) -> tuple[dict, str, float] | None:
    """(owner, ETag, age in seconds by the server's clock: its Date header against LastModified) of the lock
    object at ``uri``; None when there is none."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)

    def read() -> tuple[dict, str, float] | None:
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
        body = response["Body"].read()
        date = response["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        try:
            owner = json.loads(body)
        except ValueError:
            owner = {}
        return owner, response["ETag"], now - response["LastModified"].timestamp()

    return _s3(read, uri)


def _s3_lock_is_stale(uri: str, ttl: float) -> str | None:
    """The ETag of the lock object at ``uri`` when its holder is dead (same host, no such pid) or silent for
    ``ttl`` seconds, else None."""
    found = _read_lock(uri)
    if found is None:
        return None
    owner, etag, age = found
    dead = owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", 0)))
    return etag if dead or age > ttl else None


def _try_s3_lock(uri: str, ttl: float) -> Lock | None:
    """Create the lock object if absent (``If-None-Match: *``) or replace a stale one (``If-Match`` its ETag);
    a heartbeat rewrites it every ``ttl / 10`` s while held, and the fence (:func:`check_fences`) guards every
    write under the output's prefix. None while a live holder has it."""
    bucket, key = split_s3(uri)
    owner = _owner()

    def put(**condition: str) -> str:
        body = json.dumps({**owner, "beat": time.time()}).encode()
        return s3_client().put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    etag = _conditional(lambda: put(IfNoneMatch="*"), uri)
    if etag is None:
        stale = _s3_lock_is_stale(uri, ttl)
        if stale is None:
            return None
        etag = _conditional(lambda: put(IfMatch=stale), uri)
        if etag is None:  # another waiter took it over first
            return None
        log.warning("took over the stale lock %s", uri)
    held = {"etag": etag}
    stop = threading.Event()
    fence = Fence(uri.removesuffix(".lock"), uri, str(owner["token"]), ttl)
    with _fences_lock:
        _fences[fence.prefix] = fence
        _publish_fences()

    def heartbeat() -> None:
        while not stop.wait(ttl / 10):
            try:
                new = _conditional(lambda: put(IfMatch=held["etag"]), uri)
            except StorageError as exc:  # the store is still down after botocore's retries: the next beat tries
                log.warning("lock heartbeat on %s failed: %s", uri, exc)
                continue
            if new is None:
                log.warning("lost the lock %s: another run took it over; its writes there are refused", uri)
                return
            held["etag"] = new

    beat = threading.Thread(target=heartbeat, name=f"lock-heartbeat {key}", daemon=True)
    beat.start()

    def release() -> None:
        stop.set()
        beat.join()
        with _fences_lock:
            _fences.pop(fence.prefix, None)
            _publish_fences()
        with contextlib.suppress(StorageError):
            _conditional(lambda: s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=held["etag"]), uri)

    return Lock(uri, release)


def exclusive(
    lock_uri: str,
    done: Callable[[], bool],
    ttl: float | None = None,
    poll: float = 1.0,
    on_wait: Callable[[], None] = lambda: None,
) -> Lock | None:
    """One writer per output (``lock_uri`` is ``<output>.lock``). Returns None as soon as ``done()`` holds (the
    output exists: reuse it); otherwise waits until the lock is free, takes it, and returns it held, with
    ``done()`` checked once more under it. ``on_wait`` is called once if it has to wait for another holder.
    ``ttl`` defaults to :func:`lock_ttl`."""
    ttl = lock_ttl() if ttl is None else ttl
    waited = False
    while True:
        if done():
            return None
        lock = _try_s3_lock(lock_uri, ttl) if is_s3(lock_uri) else _try_local_lock(local_path(lock_uri))
        if lock is not None:
            if done():
                lock.release()
                return None
            return lock
        if not waited:
            on_wait()
            waited = True
        time.sleep(poll)


def _forget_clients() -> None:
    """A boto3 client (and its connection pool) must not cross a fork, e.g. into DataLoader workers: each child
    process builds its own."""
    global _clients_lock, _fences_lock
    _clients.clear()
    _clients_lock = threading.Lock()
    _fences_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)
