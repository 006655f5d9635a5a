"""MLflow tracking that never kills training: explicit run ids, and a queue that outlives an MLflow outage.

Every call goes through :class:`Tracker`. When the tracking server cannot be reached, the operation is queued (runs
created while it is down get their real id when it returns) and retried at the next call; what is still pending when
a stage ends is written to ``$VITFLOW_HOME/mlflow-pending/`` and replayed by :func:`sync_pending` the next time
vitflow talks to that server. The active run is thread-local in MLflow, so runs are always addressed by id.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.settings import vitflow_home

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # our queue retries; don't block a stage for minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

log = logging.getLogger("vitflow.tracking")
SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")


@dataclass
class RunRef:
    """A run that may not exist on the server yet (created while MLflow was down)."""

    name: str
    id: str | None = None
    local_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested spec -> ``{"pretrain.lr": "0.001", ...}``, secrets redacted, values cut to MLflow's 6000 chars."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[name] = "***" if any(m in name.lower() for m in SECRET_MARKERS) else text[:6000]
    return out


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pending_dir() -> Path:
    return vitflow_home() / "mlflow-pending"


class Tracker:
    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self._pending: list[tuple[str, tuple, dict]] = []
        self._runs: dict[str, RunRef] = {}
        self._lock = threading.RLock()

    # -- the queue ------------------------------------------------------------------------------------------------

    def _do(self, op: str, args: tuple, kwargs: dict) -> Any:
        if op == "create_run":
            local_id, experiment_id, tags, name = args
            parent = tags.get("mlflow.parentRunId")
            if parent in self._runs:  # the parent was itself created late: use its real id
                tags = {**tags, "mlflow.parentRunId": self._runs[parent].id}
            run = self.client.create_run(experiment_id, tags=tags, run_name=name)
            self._runs.setdefault(local_id, RunRef(name, local_id=local_id)).id = run.info.run_id
            return run.info.run_id
        args = tuple(self._runs[a.local_id].id if isinstance(a, RunRef) else a for a in args)
        return getattr(self.client, op)(*args, **kwargs)

    def _call(self, op: str, *args, **kwargs) -> Any:
        with self._lock:
            if self._pending:
                self.flush()
            if self._pending or any(isinstance(a, RunRef) and self._runs[a.local_id].id is None for a in args):
                self._pending.append((op, args, kwargs))
                return None
            try:
                return self._do(op, args, kwargs)
            except Exception as e:  # noqa: BLE001 - any failure to reach MLflow is queued, never raised
                log.warning("MLflow unreachable (%s: %s); queued %s for later", type(e).__name__, e, op)
                self._pending.append((op, args, kwargs))
                return None

    def flush(self) -> bool:
        """Replay queued operations in order; True when nothing is left pending."""
        with self._lock:
            while self._pending:
                op, args, kwargs = self._pending[0]
                try:
                    self._do(op, args, kwargs)
                except Exception:  # noqa: BLE001 - still down: keep the queue
                    return False
                self._pending.pop(0)
            return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def wait_flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    def persist_pending(self) -> Path | None:
        """Write what could not be sent to a local file that :func:`sync_pending` replays later."""
        with self._lock:
            if not self._pending:
                return None
            path = _pending_dir() / f"{int(time.time())}-{uuid.uuid4().hex[:8]}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"tracking_uri": self.tracking_uri}) + "\n")
                for op, args, kwargs in self._pending:
                    f.write(
                        json.dumps(
                            {"op": op, "args": [_encode(a) for a in args], "kwargs": kwargs}, default=_encode_entity
                        )
                        + "\n"
                    )
            log.warning("MLflow still unreachable: %d operations saved to %s", len(self._pending), path)
            self._pending.clear()
            return path

    # -- runs -----------------------------------------------------------------------------------------------------

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location, {"mlflow.experimentKind": "custom_model_development"}
            )
        except Exception:  # noqa: BLE001 - created concurrently by another flow run
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def existing_run(self, run_id: str, name: str = "run") -> RunRef:
        """A handle on a run that already exists on the server (e.g. the flow's parent run)."""
        ref = RunRef(name, run_id)
        self._runs[ref.local_id] = ref
        return ref

    def start_run(
        self, experiment_id: str, name: str, parent: RunRef | None = None, tags: Mapping[str, str] | None = None
    ) -> RunRef:
        ref = RunRef(name)
        self._runs[ref.local_id] = ref
        all_tags = dict(tags or {})
        if parent is not None:  # a local id is swapped for the real one when the parent exists
            all_tags["mlflow.parentRunId"] = parent.id or parent.local_id
        self._call("create_run", ref.local_id, experiment_id, all_tags, name)
        return ref

    def log_params(self, run: RunRef, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", run, params=items[i : i + 100])

    def log_metrics(self, run: RunRef, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _finite_number(v)]
        if items:
            self._call("log_batch", run, metrics=items)

    def set_tags(self, run: RunRef, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("log_batch", run, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run: RunRef, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run, str(local_path), artifact_path)

    def log_text(self, run: RunRef, text: str, artifact_file: str) -> None:
        self._call("log_text", run, text, artifact_file)

    def log_dataset(
        self, run: RunRef, name: str, uri: str, digest: str, context: str, profile: Mapping[str, Any]
    ) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="vitflow",
            source=json.dumps({"uri": uri}),
            profile=json.dumps(dict(profile)),
        )
        self._call("log_inputs", run, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def end_run(self, run: RunRef, status: str = "FINISHED") -> None:
        self._call("set_terminated", run, status)


def _finite_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def _encode(value: Any) -> Any:
    return {"__run__": value.local_id, "name": value.name, "id": value.id} if isinstance(value, RunRef) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__run__" in value:
        return RunRef(value["name"], value["id"], value["__run__"])
    return value


def _encode_entity(obj: Any) -> Any:
    if hasattr(obj, "to_dictionary"):
        return {"__entity__": type(obj).__name__, **obj.to_dictionary()}
    if hasattr(obj, "__dict__"):
        return {"__entity__": type(obj).__name__, **{k.lstrip("_"): v for k, v in vars(obj).items()}}
    return str(obj)


def sync_pending(tracking_uri: str, on_message: Callable[[str], None] = log.info) -> int:
    """Replay operations saved while MLflow was unreachable; returns how many were sent."""
    directory = _pending_dir()
    if not directory.is_dir():
        return 0
    sent = 0
    for path in sorted(directory.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if not lines or json.loads(lines[0]).get("tracking_uri") != tracking_uri:
            continue
        tracker = Tracker(tracking_uri)
        try:
            for line in lines[1:]:
                entry = json.loads(line)
                args = tuple(_decode(a) for a in entry["args"])
                for ref in args:
                    if isinstance(ref, RunRef):
                        tracker._runs.setdefault(ref.local_id, ref)
                tracker._do(entry["op"], args, _decode_kwargs(entry["kwargs"]))
                sent += 1
        except Exception as e:  # noqa: BLE001 - still unreachable: keep the file for next time
            on_message(f"MLflow pending file {path} not synced yet: {e}")
            continue
        path.unlink()
        on_message(f"synced {len(lines) - 1} MLflow operations from {path}")
    return sent


def _decode_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag

    def entity(d: Any) -> Any:
        if not isinstance(d, dict) or "__entity__" not in d:
            return d
        kind = d.pop("__entity__")
        if kind == "Metric":
            return Metric(d["key"], d["value"], d["timestamp"], d["step"])
        if kind == "Param":
            return Param(d["key"], d["value"])
        if kind == "RunTag":
            return RunTag(d["key"], d["value"])
        raise ValueError(f"cannot replay {kind}")

    return {k: [entity(x) for x in v] if isinstance(v, list) else entity(v) for k, v in kwargs.items()}


def forward_events(tracker: Tracker, run: RunRef, events: Iterable[dict[str, Any]]) -> None:
    """Send training events (``vit.engine`` JSON lines) to a run: metrics with their step, checkpoint tags."""
    for event in events:
        kind, step = event.get("event"), int(event.get("step", 0))
        if kind in ("metrics", "eval"):
            metrics = {k: v for k, v in event.items() if "/" in k}
            tracker.log_metrics(run, metrics, step)
        elif kind == "checkpoint":
            tracker.set_tags(run, {"vitflow.last_checkpoint": event.get("uri", ""), "vitflow.last_step": step})
