"""What every stage task shares: where its output lives (content-addressed), who may write it (one run at a
time), its MLflow run, its logger."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vit
from tasks.settings import vitflow_home
from tasks.tracking import RunRef, Tracker, git_commit
from vit import storage

# Bump a stage's version when its outputs' meaning changes: old outputs then stop being reused.
STAGE_VERSIONS = {"init": 1, "pretrain": 2, "finetune": 2, "fewshot": 2, "plots": 1}
DONE_FILE = "_done.json"


@dataclass(frozen=True)
class TrackingContext:
    """Where a stage logs: passed explicitly to each task (MLflow's active run is per thread)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    tags: dict[str, str]


def stage_hash(kind: str, key: dict[str, Any]) -> str:
    payload = json.dumps({**key, "stage": kind, "stage_version": STAGE_VERSIONS[kind]}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unnamed"


def stage_uri(artifact_root: str, kind: str, name: str, key: dict[str, Any]) -> str:
    """``<root>/stages/<kind>/<name>/<hash>``: a pure function of the stage, its inputs and its code version."""
    return storage.join(artifact_root, "stages", kind, slug(name), stage_hash(kind, key))


def read_done(uri: str) -> dict[str, Any] | None:
    done = storage.join(uri, DONE_FILE)
    return json.loads(storage.read_text(done)) if storage.exists(done) else None


def write_done(uri: str, result: dict[str, Any]) -> None:
    storage.write_text(storage.join(uri, DONE_FILE), json.dumps(result, indent=2, default=str))


@contextlib.contextmanager
def claim_stage(uri: str) -> Iterator[dict[str, Any] | None]:
    """The stage's recorded result when it is finished, else None while this run holds the stage's lock
    (``<stage>.lock``, released on exit) and does the work. A second run of the same stage at the same time waits
    until the first one writes ``_done.json`` and then gets its result, so two runs never interleave their output
    (checkpoints included); if the holder fails or dies, the waiter takes the lock and does the work itself.

    The storage lock rather than Prefect's concurrency limits, with or without a server: runs share the artifact
    store but not always a Prefect server (each `vitflow run` without ``PREFECT_API_URL`` has its own temporary
    one), and the S3 lock fences the writes of the training process the task starts, which a slot cannot."""
    logger = run_logger()
    lock = storage.exclusive(
        f"{uri}.lock",
        lambda: storage.exists(storage.join(uri, DONE_FILE)),
        on_wait=lambda: logger.info("another run is working on %s; waiting to reuse its result", uri),
    )
    if lock is None:
        yield read_done(uri)
        return
    with lock:
        yield None


def local_workdir(uri: str) -> Path:
    """A local folder for a stage's working files: the stage folder itself when the store is local."""
    if not storage.is_s3(uri):
        return storage.local_path(uri)
    return vitflow_home() / "work" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run (shown in the UI), the standard logger elsewhere."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a Prefect run
        return logging.getLogger("vitflow")


def _continued_stage_run(tracker: Tracker, ctx: TrackingContext, name: str) -> RunRef | None:
    """The stage's own MLflow run from an earlier attempt of the same flow run (a Retry, or a task retry after a
    crash), which ended KILLED or FAILED: the resumed training logs on under it, so a stage has one loss curve."""
    flow_run_id = ctx.tags.get("prefect.flow_run_id")
    if not flow_run_id or ctx.parent_run_id is None:
        return None
    query = (
        f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`mlflow.parentRunId` = '{ctx.parent_run_id}' "
        f"and attributes.run_name = '{name}' and attributes.status != 'FINISHED' and attributes.status != 'RUNNING'"
    )
    return tracker.continue_run(ctx.experiment_id, query, name)


def start_stage_run(
    ctx: TrackingContext,
    name: str,
    stage: str,
    extra_tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[Tracker, RunRef]:
    tracker = Tracker(ctx.tracking_uri)
    parent = tracker.existing_run(ctx.parent_run_id, "parent") if ctx.parent_run_id else None
    tags = {
        **ctx.tags,
        "vitflow.stage": stage,
        "vitflow.version": vit.__version__,
        "vitflow.git_commit": git_commit(),
        **{k: str(v) for k, v in (extra_tags or {}).items()},
    }
    run = _continued_stage_run(tracker, ctx, name) or tracker.start_run(ctx.experiment_id, name, parent, tags)
    if params:
        tracker.log_params(run, params)
    return tracker, run
