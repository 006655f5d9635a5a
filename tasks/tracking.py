"""MLflow tracking that never fails a run: explicit ids, and a queue that outlives an MLflow outage.

Every MLflow call of a stage (runs, params, metrics, dataset inputs, artifacts, logged models, registered versions)
is one JSON-able :class:`Op` sent through :class:`Tracker`. When the server cannot be reached, the operation is
queued (with a copy of any file it sends, and runs and models created while the server is down get their real id
when it returns) and retried at the next call; what is still pending when a run ends is written to
``$VITFLOW_HOME/mlflow-pending/`` and replayed by :func:`sync_pending` the next time vitflow talks to that server.
Every operation is idempotent, so a replay that stops half way and runs again creates nothing twice: runs and logged
models carry a ``vitflow.local_id`` tag and are looked up by it first, a model version by its model id, and MLflow
itself drops repeated metrics and dataset inputs. The active run is thread-local in MLflow, so runs are always
addressed by id.

Written by hand because MLflow's own async logging (``synchronous=False``) only batches metrics, params and tags of
runs that already exist, in memory: it queues no run creation, artifact, model or registration, and drops what fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.settings import vitflow_home

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # our queue retries; don't block a stage for minutes
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")

log = logging.getLogger("vitflow.tracking")
SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")
LOCAL_ID_TAG = "vitflow.local_id"
RETRY_SECONDS = 2.0  # how long calls queue without trying MLflow after it failed (a hung server costs a timeout)


@dataclass
class RunRef:
    """A run that may not exist on the server yet (created while MLflow was down)."""

    name: str
    id: str | None = None
    local_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    refused: bool = False  # MLflow refused to create it: what refers to it is dropped too, never retried


class ModelRef(RunRef):
    """A logged model that may not exist on the server yet."""


@dataclass
class Op:
    """One MLflow call: ``Tracker._send_<name>(**args)``; runs and models appear in ``args`` by their local id, and
    ``files`` are copies of local files that the call reads (made when it was queued)."""

    name: str
    args: dict[str, Any]
    files: list[str] = field(default_factory=list)


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


def _new_spool() -> Path:
    """Where a tracker copies the files of queued operations; a saved queue is ``<spool>.jsonl`` beside it."""
    return _pending_dir() / f"{int(time.time())}-{uuid.uuid4().hex[:8]}"


def flush_seconds() -> float:
    """How long the end of a run waits for MLflow to come back before saving what is pending."""
    return float(os.environ.get("VITFLOW_MLFLOW_FLUSH_SECONDS", "30"))


class Tracker:
    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self._pending: list[Op] = []
        self._refs: dict[str, RunRef] = {}
        self._lock = threading.RLock()
        self._spool = _new_spool()
        self._retry_at = 0.0  # while MLflow is down, calls queue without trying it until then

    # -- the queue ------------------------------------------------------------------------------------------------

    def _call(self, op_name: str, **args: Any) -> Any:
        op = Op(op_name, args)
        with self._lock:
            if time.monotonic() >= self._retry_at and self.flush():
                try:
                    return self._send(op, replay=False)
                except Exception as e:  # noqa: BLE001 - any failure to reach MLflow is queued, never raised
                    log.warning("MLflow unreachable (%s: %s); queued %s for later", type(e).__name__, e, op_name)
                    self._retry_at = time.monotonic() + RETRY_SECONDS
            self._enqueue(op)
            return None

    def _send(self, op: Op, replay: bool) -> Any:
        """Send ``op``; raises while MLflow is unreachable, logs and drops an operation MLflow refuses."""
        try:
            return getattr(self, f"_send_{op.name}")(replay=replay, **op.args)
        except Exception as e:
            if _is_outage(e):
                raise
            log.error("MLflow refused %s (%s: %s); dropped it", op.name, type(e).__name__, e)
            created = {"create_run": "run", "log_model": "model"}.get(op.name)
            if created:
                self._refs[op.args[created]].refused = True
            return None

    def _enqueue(self, op: Op) -> None:
        """Queue ``op``, with its own copy of a file it sends (the caller may delete the original)."""
        if "path" in op.args:
            source = Path(op.args["path"])
            copy = self._spool / f"{len(self._pending)}-{uuid.uuid4().hex[:6]}" / source.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, copy) if source.is_dir() else shutil.copy2(source, copy)
            op = Op(op.name, {**op.args, "path": str(copy)}, [str(copy.parent)])
        self._pending.append(op)

    def flush(self) -> bool:
        """Replay queued operations in order; True when nothing is left pending."""
        with self._lock:
            while self._pending:
                try:
                    self._send(self._pending[0], replay=True)
                except Exception:  # noqa: BLE001 - still down: keep the queue, and let calls queue for a while
                    self._retry_at = time.monotonic() + RETRY_SECONDS
                    return False
                for copy in self._pending.pop(0).files:
                    shutil.rmtree(copy, ignore_errors=True)
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
            path = self._spool.with_suffix(".jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            refs = {k: {"kind": type(r).__name__, "name": r.name, "id": r.id} for k, r in self._refs.items()}
            lines = [{"tracking_uri": self.tracking_uri, "refs": refs}, *(asdict(op) for op in self._pending)]
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
            log.warning("MLflow still unreachable: %d operations saved to %s", len(self._pending), path)
            self._pending.clear()
            self._spool = _new_spool()  # the saved file owns the copies made so far
            return path

    def finish(self, run: RunRef, status: str = "FINISHED") -> None:
        """The one way a run ends, for stages and flows alike: end it, wait for MLflow to take what is queued, and
        save what it cannot take yet (synced by a later run)."""
        self.end_run(run, status)
        if not self.wait_flush(flush_seconds()):
            self.persist_pending()

    def _id(self, local_id: str | None) -> str | None:
        if local_id is None:
            return None
        ref = self._refs[local_id]
        if ref.refused:
            raise Refused(f"MLflow refused to create {ref.name}")
        if ref.id is None:
            raise LookupError(f"{ref.name} does not exist in MLflow yet")
        return ref.id

    # -- what a stage logs ----------------------------------------------------------------------------------------

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
        self._refs[ref.local_id] = ref
        return ref

    def continue_run(self, experiment_id: str, filter_string: str, name: str = "run") -> RunRef | None:
        """The run matching ``filter_string`` that an earlier attempt left (a Retry runs the same flow run again),
        set running again so it goes on with the same curves; None when there is none or MLflow cannot say."""
        try:
            found = self.client.search_runs([experiment_id], filter_string, max_results=1)
            if not found:
                return None
            self.client.update_run(found[0].info.run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - MLflow unreachable: a new run, queued like any other call
            log.warning("could not look up the run of an earlier attempt (%s); starting a new one", e)
            return None
        log.info("continuing MLflow run %s (%s) of an earlier attempt", found[0].info.run_id, name)
        return self.existing_run(found[0].info.run_id, name)

    def start_run(
        self, experiment_id: str, name: str, parent: RunRef | None = None, tags: Mapping[str, str] | None = None
    ) -> RunRef:
        ref = RunRef(name)
        self._refs[ref.local_id] = ref
        parent_id = parent.local_id if parent is not None else None
        self._call("create_run", run=ref.local_id, experiment_id=experiment_id, tags=dict(tags or {}), parent=parent_id)
        return ref

    def log_params(self, run: RunRef, params: Mapping[str, Any]) -> None:
        items = {k: str(v)[:6000] for k, v in params.items()}
        keys = list(items)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", run=run.local_id, params={k: items[k] for k in keys[i : i + 100]})

    def log_metrics(
        self, run: RunRef, metrics: Mapping[str, float], step: int | None = None, model: ModelRef | None = None
    ) -> None:
        """Metrics at ``step``; with ``model``, linked to the logged model they measure."""
        now = int(time.time() * 1000)
        items = [{"key": k, "value": float(v), "timestamp": now, "step": step or 0} for k, v in metrics.items()]
        items = [m for m in items if _finite_number(m["value"])]
        if items:
            self._call("log_batch", run=run.local_id, metrics=items, model=model.local_id if model else None)

    def set_tags(self, run: RunRef, tags: Mapping[str, Any]) -> None:
        self._call("log_batch", run=run.local_id, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, run: RunRef, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run=run.local_id, path=str(local_path), artifact_path=artifact_path)

    def log_text(self, run: RunRef, text: str, artifact_file: str) -> None:
        self._call("log_text", run=run.local_id, text=text, artifact_file=artifact_file)

    def log_dataset(
        self, run: RunRef, name: str, uri: str, digest: str, context: str, profile: Mapping[str, Any]
    ) -> None:
        dataset = {
            "name": name,
            "digest": digest[:36],
            "source_type": "vitflow",
            "source": json.dumps({"uri": uri}),
            "profile": json.dumps(dict(profile)),
        }
        self._call("log_inputs", run=run.local_id, datasets=[{"dataset": dataset, "context": context}])

    def log_model(
        self,
        run: RunRef,
        experiment_id: str,
        local_dir: str | Path,
        name: str,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> ModelRef:
        """Log the MLflow Model saved in ``local_dir`` as an MLflow 3 logged model, an output of ``run``."""
        ref = ModelRef(name)
        self._refs[ref.local_id] = ref
        args = {"experiment_id": experiment_id, "run": run.local_id, "name": name, "tags": dict(tags or {})}
        self._call("log_model", model=ref.local_id, path=str(local_dir), step=step, **args)
        return ref

    def register_model(
        self, name: str, model: ModelRef, alias: str | None, run: RunRef | None = None, tags: Mapping[str, str] = {}
    ) -> str | None:
        """A new version of registered model ``name`` pointing at ``model``; ``alias`` (when given) moves to it.
        Returns the version, or None while MLflow is unreachable (the registration is queued)."""
        run_id = run.local_id if run else None
        return self._call("register", name=name, model=model.local_id, alias=alias, run=run_id, tags=dict(tags))

    def end_run(self, run: RunRef, status: str = "FINISHED") -> None:
        self._call("set_terminated", run=run.local_id, status=status)

    # -- how each operation reaches MLflow (idempotent: a replay may send it again) ----------------------------------

    def _send_create_run(
        self, replay: bool, run: str, experiment_id: str, tags: dict[str, str], parent: str | None
    ) -> str:
        ref = self._refs[run]
        if ref.id is None:
            tags = {**tags, LOCAL_ID_TAG: run, **({"mlflow.parentRunId": self._id(parent)} if parent else {})}
            query = f"tags.`{LOCAL_ID_TAG}` = '{run}'"
            found = replay and self.client.search_runs([experiment_id], query, max_results=1)
            ref.id = (
                found[0].info.run_id
                if found
                else self.client.create_run(experiment_id, tags=tags, run_name=ref.name).info.run_id
            )
        return ref.id

    def _send_log_batch(
        self,
        replay: bool,
        run: str,
        metrics: list[dict[str, Any]] = (),
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        model: str | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        model_id = self._id(model)
        self.client.log_batch(
            self._id(run),
            metrics=[Metric(**m, model_id=model_id) for m in metrics],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    def _send_log_inputs(self, replay: bool, run: str, datasets: list[dict[str, Any]]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(Dataset(**d["dataset"]), [InputTag("mlflow.data.context", d["context"])]) for d in datasets
        ]
        self.client.log_inputs(self._id(run), datasets=inputs)

    def _send_log_artifact(self, replay: bool, run: str, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(self._id(run), path, artifact_path)

    def _send_log_text(self, replay: bool, run: str, text: str, artifact_file: str) -> None:
        self.client.log_text(self._id(run), text, artifact_file)

    def _send_set_terminated(self, replay: bool, run: str, status: str) -> None:
        self.client.set_terminated(self._id(run), status)

    def _send_log_model(
        self, replay: bool, model: str, experiment_id: str, run: str, name: str, path: str, tags: dict, step: int
    ) -> str:
        """What ``mlflow.<flavor>.log_model`` does, by id (it logs to the fluent API's active run)."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        ref, run_id = self._refs[model], self._id(run)
        if ref.id is None:
            query = f"tags.`{LOCAL_ID_TAG}` = '{model}'"
            found = self.client.search_logged_models([experiment_id], query, max_results=1)
            logged = (
                found[0]
                if found
                else self.client.create_logged_model(experiment_id, name, run_id, {**tags, LOCAL_ID_TAG: model})
            )
            ref.id = logged.model_id
        if ref.id not in {o.model_id for o in self.client.get_run(run_id).outputs.model_outputs}:
            self.client.log_outputs(run_id, [LoggedModelOutput(ref.id, step)])
        mlmodel = Model.load(path)
        mlmodel.model_id, mlmodel.run_id = ref.id, run_id
        mlmodel.save(str(Path(path) / "MLmodel"))
        self.client.log_model_artifacts(ref.id, path)
        self.client.finalize_logged_model(ref.id, "READY")
        return ref.id

    def _send_register(
        self, replay: bool, name: str, model: str, alias: str | None, run: str | None, tags: dict[str, str]
    ) -> str:
        from mlflow.exceptions import MlflowException

        model_id = self._id(model)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="vitflow ViT checkpoints")
        versions = self.client.search_model_versions(f"name = '{name}'")
        found = [v for v in versions if v.tags.get(LOCAL_ID_TAG) == model]
        if found:
            version = found[0]
        else:  # not models:/<id>: MLflow's SQL registry resolves that through the global tracking URI
            source = self.client.get_logged_model(model_id).artifact_location
            tags = {**tags, LOCAL_ID_TAG: model}
            version = self.client.create_model_version(name, source, self._id(run), tags, model_id=model_id)
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)


REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}


class Refused(Exception):
    """An operation on a run or model that MLflow refused to create."""


def _is_outage(e: Exception) -> bool:
    """True unless MLflow answered and refused the request (sending it again cannot help)."""
    from mlflow.exceptions import MlflowException

    return not (isinstance(e, Refused) or isinstance(e, MlflowException) and e.error_code in REFUSALS)


def _finite_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def sync_pending(tracking_uri: str, on_message: Callable[[str], None] = log.info) -> int:
    """Replay operations saved while MLflow was unreachable; returns how many were sent. A file is removed only
    once all of it went through; replaying it again after an interruption repeats nothing."""
    directory = _pending_dir()
    if not directory.is_dir():
        return 0
    sent, tracker, kinds = 0, Tracker(tracking_uri), {"RunRef": RunRef, "ModelRef": ModelRef}
    for path in sorted(directory.glob("*.jsonl")):  # oldest first: a later file may use a run an earlier one made
        header, *ops = [json.loads(line) for line in path.read_text().splitlines() if line]
        if header.get("tracking_uri") != tracking_uri:
            continue
        for key, ref in header["refs"].items():
            if tracker._refs.get(key) is None or tracker._refs[key].id is None:
                tracker._refs[key] = kinds[ref["kind"]](ref["name"], ref["id"], key)
        try:
            for op in ops:
                tracker._send(Op(**op), replay=True)
                sent += 1
        except Exception as e:  # noqa: BLE001 - still unreachable: keep the file for next time
            on_message(f"MLflow pending file {path} not synced yet: {e}")
            continue
        path.unlink()
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)
        on_message(f"synced {len(ops)} MLflow operations from {path}")
    return sent


def forward_events(tracker: Tracker, run: RunRef, events: Iterable[dict[str, Any]]) -> None:
    """Send training events (``vit.engine`` JSON lines) to a run: metrics with their step, checkpoint tags."""
    for event in events:
        kind, step = event.get("event"), int(event.get("step", 0))
        if kind in ("metrics", "eval"):
            metrics = {k: v for k, v in event.items() if "/" in k}
            tracker.log_metrics(run, metrics, step)
        elif kind == "checkpoint":
            tracker.set_tags(run, {"vitflow.last_checkpoint": event.get("uri", ""), "vitflow.last_step": step})
