"""Prefect task: prepare one dataset into the artifact store (skipped when its fingerprint is already there)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import TrackingContext, run_logger, start_stage_run
from tasks.tracking import RunRef, Tracker


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Storage hiccups are retried; bad input (missing files, too many corrupt samples) is not."""
    from vit.data import DataError

    try:
        state.result()
    except DataError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return False


def dataset_ref(uri: str) -> dict[str, Any]:
    """The small, JSON-able description of a prepared dataset that flows pass between tasks."""
    from vit.data import open_dataset

    ds = open_dataset(uri)
    return {
        "name": ds.name,
        "uri": ds.uri,
        "fingerprint": ds.fingerprint,
        "num_classes": ds.num_classes,
        "splits": {split: ds.count(split) for split in ds.splits},
        "vtab_group": ds.info.get("vtab_group"),
    }


def log_dataset_input(tracker: Tracker, run: RunRef, ref: dict[str, Any], context: str) -> None:
    tracker.log_dataset(run, ref["name"], ref["uri"], ref["fingerprint"], context, {"splits": ref["splits"]})


@task(
    name="prepare-dataset",
    task_run_name="prepare:{name}",
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_condition_fn=_retry_unless_bad_input,
    cache_policy=NONE,
)
def prepare_dataset_task(
    name: str,
    source: str,
    options: dict[str, Any],
    max_corrupt_fraction: float,
    artifact_root: str,
    tracking: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    from vit.data import prepare_dataset

    logger = run_logger()
    tracker, run = start_stage_run(
        TrackingContext(**tracking),
        f"prepare:{name}",
        "prepare",
        params={"source": source, "max_corrupt_fraction": max_corrupt_fraction, **options},
    )
    try:
        uri = prepare_dataset(
            source, name, artifact_root, max_corrupt_fraction=max_corrupt_fraction, seed=seed, progress=False, **options
        )
        ref = dataset_ref(uri)
        tracker.set_tags(run, {"vitflow.dataset_uri": uri, "vitflow.fingerprint": ref["fingerprint"]})
        tracker.log_metrics(run, {f"count/{split}": n for split, n in ref["splits"].items()})
        log_dataset_input(tracker, run, ref, "prepared")
        logger.info("dataset %s ready: %s (%s)", name, uri, ", ".join(f"{k} {v}" for k, v in ref["splits"].items()))
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return ref
