"""Rebuild the report of a past flow run from MLflow (its tags) and the artifact store (results and plots)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient

from vit import storage


def rebuild_report(tracking_uri: str, run_id: str, output: Path) -> dict[str, Path]:
    from vit.report import write_report
    from vit.results import read_results

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids
        raise ValueError(f"run {run_id!r} not found in {tracking_uri}: {e}") from None
    results_uri = run.data.tags.get("vitflow.results_uri")
    if not results_uri:
        raise ValueError(f"run {run_id} has no results (tag vitflow.results_uri): not a finished vitflow flow run")
    folder = results_uri.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = read_results(storage.download(results_uri, Path(tmp) / "results.parquet"))
        plots = {
            Path(uri).stem.replace("_", " "): storage.read_bytes(uri)
            for uri in storage.list_files(storage.join(folder, "plots"))
            if uri.endswith(".png")
        }
    meta = {
        "MLflow run": run_id,
        "experiment": run.info.experiment_id,
        "artifacts": folder,
        **{
            k.removeprefix("vitflow."): v
            for k, v in run.data.tags.items()
            if k in ("vitflow.spec_hash", "vitflow.git_commit", "vitflow.preset", "vitflow.model_ref")
        },
    }
    paths = write_report(
        output, results, plots, title=f"vitflow — {run.data.tags.get('mlflow.runName', run_id)}", meta=meta
    )
    return {"markdown": paths["markdown"], "html": paths["html"]}
