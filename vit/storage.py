"""One storage layer for every read and write of artifacts: local paths / ``file://`` URIs and ``s3://``.

S3 goes through boto3, so any S3-compatible server works; the endpoint comes from ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``) exactly as boto3 reads it. Transient faults (connection refused, timeouts, 5xx, throttling)
are retried with exponential backoff for up to ``VITFLOW_S3_RETRY_SECONDS`` (default 180 s), which rides out a
storage server restart. Writes are atomic: a local file appears under its name only once complete
(write-to-temp + rename), an S3 object only once its (multipart) upload has completed.

Remote files needed locally (checkpoints over ``https://`` or ``s3://``) are fetched once into a cache
(``VITFLOW_CACHE``, default ``~/.cache/vitflow``).

:func:`exclusive` gives one writer per output (a dataset, a pipeline stage) among concurrent runs: a local lock
file held with ``flock`` (the kernel drops it when its holder dies), or an S3 lock object created with a
conditional put and kept alive by a heartbeat (taken over once its holder is dead or silent for ``LOCK_TTL``).
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
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * 1024 * 1024
LOCK_TTL = 120.0  # seconds: an S3 lock whose heartbeat is older than this is stale (its holder is gone)
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
# S3 client and retries

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client for the current environment (endpoint and credentials), cached per environment."""
    key = (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"} if key[0] else None,
            )
            client = boto3.session.Session().client("s3", region_name=key[2] or "us-east-1", config=config)
            _clients[key] = client
        return client


def _retry_seconds() -> float:
    return float(os.environ.get("VITFLOW_S3_RETRY_SECONDS", "180"))


_PERMANENT_CODES = {
    "NoSuchBucket": "bucket does not exist: create it first (e.g. `aws s3 mb s3://{bucket}`) or fix the URI",
    "AccessDenied": "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
    "InvalidAccessKeyId": "unknown access key: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "signature mismatch: check AWS_SECRET_ACCESS_KEY",
    "NoSuchKey": "object does not exist",
    "404": "object does not exist",
    "403": "access denied: check credentials and the bucket policy",
}


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    if isinstance(exc, EndpointConnectionError | ConnectionClosedError | ConnectTimeoutError | ReadTimeoutError):
        return True
    if isinstance(exc, ResponseStreamingError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
    return False


def _describe(exc: BaseException, uri: str) -> StorageError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else ""
        hint = _PERMANENT_CODES.get(code, str(exc))
        return StorageError(f"{uri}: {hint.format(bucket=bucket)}")
    return StorageError(f"{uri}: {exc}")


def with_retries(fn: Callable[[], T], uri: str, what: str = "storage operation") -> T:
    """Run ``fn`` retrying transient S3 faults with jittered exponential backoff until the deadline."""
    deadline = time.monotonic() + _retry_seconds()
    delay = 0.5
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _is_transient(exc):
                raise _describe(exc, uri) from exc
            if time.monotonic() + delay > deadline:
                raise StorageError(f"{what} on {uri} still failing after {_retry_seconds():.0f}s: {exc}") from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)


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
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = _transfer_config()
        with_retries(lambda: s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=config), uri, "upload")
    else:
        _atomic_local_write(local_path(uri), lambda f: f.write(data))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return with_retries(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(), uri, "download")
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
    if is_s3(uri):
        bucket, key = split_s3(uri)
        config = _transfer_config()
        with_retries(lambda: s3_client().upload_file(str(src), bucket, key, Config=config), uri, "upload")
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
            with_retries(lambda: s3_client().download_file(bucket, key, str(tmp)), uri, "download")
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

        return with_retries(head, uri, "stat")
    return local_path(uri).exists()


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return with_retries(lambda: s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"], uri, "stat")
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

        return sorted(with_retries(listing, prefix, "list"))
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

        return sorted(with_retries(listing, prefix, "list"))
    root = local_path(prefix)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with_retries(lambda: s3_client().delete_object(Bucket=bucket, Key=key), uri, "delete")
    else:
        local_path(uri).unlink(missing_ok=True)


def delete_prefix(prefix: str) -> None:
    if is_s3(prefix):
        for uri in list_files(prefix):
            delete(uri)
    else:
        shutil.rmtree(local_path(prefix), ignore_errors=True)


def open_stream(uri: str) -> BinaryIO:
    """A readable binary stream (S3 objects are streamed, not downloaded first)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return with_retries(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"], uri, "download")
    if is_http(uri):
        return open(fetch(uri), "rb")
    try:
        return open(local_path(uri), "rb")
    except FileNotFoundError:
        raise StorageError(f"{uri}: file does not exist") from None


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

    with_retries(create, uri, "create bucket")


def check_writable(root: str) -> None:
    """Fail fast, before long work, when the artifact root cannot be written (missing bucket, denied access)."""
    probe = join(root, f".vitflow-write-probe-{os.getpid()}-{random.randrange(1 << 30)}")
    write_bytes(probe, b"ok")
    delete(probe)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("VITFLOW_CACHE", Path.home() / ".cache" / "vitflow"))


def fetch(uri: str | os.PathLike) -> Path:
    """A local path for ``uri``: local files as they are; ``s3://`` and ``http(s)://`` downloaded once to the cache.

    An S3 object is cached under its URI and ETag, so an object rewritten in place (a bucket reused, a file
    replaced by hand) is downloaded again rather than served stale; https checkpoints are immutable releases.
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
        version = with_retries(lambda: s3_client().head_object(Bucket=bucket, Key=key)["ETag"], s, "stat")
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
    """``length`` bytes of a file or object starting at ``offset`` (S3: one ranged GET, retried)."""
    if length <= 0:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        byte_range = f"bytes={offset}-{offset + length - 1}"
        return with_retries(
            lambda: s3_client().get_object(Bucket=bucket, Key=key, Range=byte_range)["Body"].read(), uri, "download"
        )
    try:
        with open(local_path(uri), "rb") as f:
            f.seek(offset)
            return f.read(length)
    except FileNotFoundError:
        raise StorageError(f"{uri}: file does not exist") from None


class _S3ObjectStream:
    """A forward-only read of an S3 object from an offset. After a transient fault mid-stream (a dropped
    connection half-way through a shard) it reopens at the byte where it stopped, so a long read survives."""

    def __init__(self, uri: str, offset: int) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos = offset
        self._body = None

    def read(self, n: int = -1) -> bytes:
        def attempt() -> bytes:
            if self._body is None:
                response = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-")
                self._body = response["Body"]
            try:
                return self._body.read(None if n < 0 else n)
            except Exception:
                self._body = None  # the retry reopens at self.pos
                raise

        data = with_retries(attempt, self.uri, "download")
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self._body is not None:
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
    dead holder, so a local lock is never stale."""
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
    """``fn`` (a conditional S3 request) retried on transient faults; None when its condition failed."""

    def attempt() -> tuple[T | None]:
        try:
            return (fn(),)
        except Exception as exc:
            if _precondition_failed(exc):
                return (None,)
            raise

    return with_retries(attempt, uri, "lock")[0]


def _s3_lock_is_stale(uri: str, ttl: float) -> str | None:
    """The ETag of the lock object at ``uri`` when its holder is dead (same host, no such pid) or silent for
    ``ttl`` seconds (by the server's clock: its Date header against the object's LastModified), else None."""
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

    found = with_retries(read, uri, "lock")
    if found is None:
        return None
    owner, etag, age = found
    dead = owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", 0)))
    return etag if dead or age > ttl else None


def _try_s3_lock(uri: str, ttl: float) -> Lock | None:
    """Create the lock object if absent (``If-None-Match: *``) or replace a stale one (``If-Match`` its ETag);
    a heartbeat rewrites it every ``ttl / 4`` s while held. None while a live holder has it."""
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

    def heartbeat() -> None:
        while not stop.wait(ttl / 4):
            try:
                new = _conditional(lambda: put(IfMatch=held["etag"]), uri)
            except StorageError as exc:  # the store is down: the next beat tries again
                log.warning("lock heartbeat on %s failed: %s", uri, exc)
                continue
            if new is None:
                log.warning("lost the lock %s: another run took it over", uri)
                return
            held["etag"] = new

    beat = threading.Thread(target=heartbeat, name=f"lock-heartbeat {key}", daemon=True)
    beat.start()

    def release() -> None:
        stop.set()
        beat.join()
        with contextlib.suppress(StorageError):
            _conditional(lambda: s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=held["etag"]), uri)

    return Lock(uri, release)


def exclusive(
    lock_uri: str,
    done: Callable[[], bool],
    ttl: float = LOCK_TTL,
    poll: float = 1.0,
    on_wait: Callable[[], None] = lambda: None,
) -> Lock | None:
    """One writer per output. Returns None as soon as ``done()`` holds (the output exists: reuse it); otherwise
    waits until the lock at ``lock_uri`` is free, takes it, and returns it held, with ``done()`` checked once more
    under it. ``on_wait`` is called once if it has to wait for another holder."""
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
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)
