"""Rebuild the report of past flow runs from MLflow (their tags) and the artifact store (results and plots)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from vit import storage

_META_TAGS = ("vitflow.spec_hash", "vitflow.git_commit", "vitflow.preset", "vitflow.model_ref")


def _run_outputs(tracking_uri: str, run_id: str, tmp: Path) -> tuple[Run, pd.DataFrame, dict[str, bytes]]:
    """(MLflow run, results table, plots by name) of one finished flow run."""
    from tasks.results import read_results

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids
        raise ValueError(f"run {run_id!r} not found in {tracking_uri}: {e}") from None
    results_uri = run.data.tags.get("vitflow.results_uri")
    if not results_uri:
        raise ValueError(f"run {run_id} has no results (tag vitflow.results_uri): not a finished vitflow flow run")
    folder = results_uri.rsplit("/", 1)[0]
    results = read_results(storage.download(results_uri, tmp / f"{run_id}.parquet"))
    plots = {
        Path(uri).stem.replace("_", " "): storage.read_bytes(uri)
        for uri in storage.list_files(storage.join(folder, "plots"))
        if uri.endswith(".png")
    }
    return run, results, plots


def rebuild_report(tracking_uri: str, run_ids: str | Sequence[str], output: Path) -> dict[str, Path]:
    """The report of one run, or of several runs merged (e.g. the ViT and the BiT runs of the ``bit-vs-vit``
    preset): their results form one table, so the paper-style tables show each model as a column of its own."""
    from tasks.report import ReportedRun, report_header, write_report

    ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    with tempfile.TemporaryDirectory() as tmp:
        outputs = [_run_outputs(tracking_uri, run_id, Path(tmp)) for run_id in ids]
    runs = [run for run, _, _ in outputs]
    several = len(outputs) > 1
    models = [str(res["model"].iloc[0]) if several and len(res) else "" for _, res, _ in outputs]
    plots = {
        f"{model} {name}".strip(): png
        for model, (_, _, run_plots) in zip(models, outputs, strict=True)
        for name, png in run_plots.items()
    }
    client = MlflowClient(tracking_uri)
    meta = report_header(
        tracking_uri,
        [
            ReportedRun(r.info.experiment_id, r.info.run_id, r.data.tags["vitflow.results_uri"].rsplit("/", 1)[0])
            for r in runs
        ],
        ", ".join(client.get_experiment(e).name for e in dict.fromkeys(r.info.experiment_id for r in runs)),
        {k.removeprefix("vitflow."): v for k, v in runs[0].data.tags.items() if k in _META_TAGS},
    )
    names = " vs ".join(
        r.data.tags.get("mlflow.runName", r.info.run_id) + (f" ({model})" if model else "")
        for r, model in zip(runs, models, strict=True)
    )
    results = pd.concat([results for _, results, _ in outputs], ignore_index=True)
    paths = write_report(output, results, plots, title=f"vitflow — {names}", meta=meta)
    return {"markdown": paths["markdown"], "html": paths["html"]}
