"""Find flow runs in MLflow, load their result tables from the artifact store, compare them side by side.

This is what ``vitflow compare`` prints and what the nightly transfer evaluation uses to flag regressions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from vit import storage

FLOW_STAGE = "flow"


def find_runs(
    tracking_uri: str,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
    last: int | None = None,
    finished_only: bool = True,
) -> list[str]:
    """Parent (flow) run ids, newest first, filtered by experiment and tags; ``last`` keeps the newest N."""
    client = MlflowClient(tracking_uri)
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
        experiment_ids = [exp.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    filters = [f"tags.`vitflow.stage` = '{FLOW_STAGE}'"]
    filters += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    if finished_only:
        filters.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        experiment_ids, " and ".join(filters), order_by=["attributes.start_time DESC"], max_results=last or 1000
    )
    return [r.info.run_id for r in runs if "vitflow.results_uri" in r.data.tags]


def run_results(tracking_uri: str, run_id: str, include_baselines: bool = False) -> pd.DataFrame:
    """The tidy results table a flow run wrote (found through its ``vitflow.results_uri`` tag)."""
    from vit.results import read_results

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids
        raise ValueError(f"run {run_id!r} not found in {tracking_uri}: {e}") from None
    uri = run.data.tags.get("vitflow.results_uri")
    if not uri:
        raise ValueError(f"run {run_id} has no results (tag vitflow.results_uri): not a finished vitflow flow run")
    with tempfile.TemporaryDirectory() as tmp:
        df = read_results(storage.download(uri, Path(tmp) / "results.parquet"))
    df["run"] = run_id
    return df if include_baselines else df[df["pretrain"] != "scratch"]


def compare(
    tracking_uri: str, run_ids: Sequence[str], threshold: float = 1.0, baseline: str | None = None
) -> pd.DataFrame:
    """Metrics of the runs side by side (oldest first), deltas and a ``regressed`` flag (drops > threshold
    percentage points against ``baseline``, or against the run before)."""
    from vit.results import compare_runs

    if not run_ids:
        raise ValueError("no runs to compare")
    frames = [run_results(tracking_uri, r) for r in run_ids]
    return compare_runs(pd.concat(frames, ignore_index=True), list(run_ids), baseline, threshold)


def regressed_metrics(table: pd.DataFrame) -> list[str]:
    return [str(m) for m in table.index[table["regressed"]]]
