"""Find flow runs in MLflow, load their result tables from the artifact store, compare them side by side.

This is what ``vitflow compare`` prints and what the nightly transfer evaluation uses to flag regressions.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from mlflow import MlflowClient
from pydantic import BaseModel, Field

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
    from tasks.results import read_results

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
    from tasks.results import compare_runs

    if not run_ids:
        raise ValueError("no runs to compare")
    frames = [run_results(tracking_uri, r) for r in run_ids]
    return compare_runs(pd.concat(frames, ignore_index=True), list(run_ids), baseline, threshold)


def regressed_metrics(table: pd.DataFrame) -> list[str]:
    return [str(m) for m in table.index[table["regressed"]]]


class BaselineChoice(BaseModel):
    """What a nightly evaluation is compared with: the reviewed model (the version a registry alias points at,
    moved by ``vitflow promote``), or the best of the newest evaluations of the same reference."""

    kind: Literal["alias", "best-of-last"] = Field(
        "alias",
        title="Baseline",
        description="alias: the evaluation of the aliased version; best-of-last: the best "
        "(highest mean accuracy) of the last N evaluations of the same reference and suite.",
    )
    alias: str = Field("champion", title="Baseline alias", description="Alias of the same registered model.")
    last: int = Field(7, ge=1, le=100, title="Evaluations", description="N for best-of-last.")


@dataclass(frozen=True)
class Evaluation:
    """One nightly run: the reference, the registry version it resolved to, and what the previous evaluation of the
    same reference and suite resolved to (so a moved alias is said, not silent)."""

    ref: str
    suite: str
    run_id: str
    name: str | None = None  # registered model
    version: str | None = None
    previous_run: str | None = None
    previous_version: str | None = None

    @property
    def alias_moved(self) -> bool:
        return self.previous_run is not None and self.previous_version != self.version

    def sentence(self) -> str:
        what = f"{self.ref} (version {self.version} of {self.name})" if self.version else self.ref
        if self.previous_run is None:
            return f"Evaluated {what}: the first evaluation of this reference on {self.suite}."
        if not self.alias_moved:
            return f"Evaluated {what}: the same version as the last evaluation (run {self.previous_run})."
        return (
            f"Evaluated {what}: the reference moved from version {self.previous_version} since the last evaluation "
            f"(run {self.previous_run})."
        )


@dataclass(frozen=True)
class Baseline:
    run_id: str | None
    label: str  # what the run is, for people
    missing: str = ""  # why there is none, and what to do about it


@dataclass(frozen=True)
class Verdict:
    evaluation: Evaluation
    baseline: Baseline
    threshold: float
    table: pd.DataFrame

    @property
    def regressions(self) -> list[str]:
        return regressed_metrics(self.table)

    def message(self) -> str:
        e, n = self.evaluation, len(self.regressions)
        if self.baseline.run_id is None:
            return f"{e.sentence()} Not compared: {self.baseline.missing}"
        if not n:
            return (
                f"{e.sentence()} No metric dropped beyond {self.threshold} points and the seeds' spread against "
                f"{self.baseline.label}."
            )
        return (
            f"{e.sentence()} {n} metric(s) dropped by more than {self.threshold} points and the seeds' spread "
            f"against {self.baseline.label}: {', '.join(self.regressions)}"
        )

    def rows(self) -> list[dict[str, object]]:
        """The comparison as table rows, regressed metrics first."""
        base, run = self.baseline.run_id, self.evaluation.run_id
        rows = [
            {
                "metric": name,
                "baseline": _rounded(r.get(base)) if base else None,
                "candidate": _rounded(r[run]),
                "delta": _rounded(r.get(f"Δ {run}")),
                "spread": _rounded(r["spread"]),
                "regressed": "REGRESSED" if r["regressed"] else "",
            }
            for name, r in self.table.iterrows()
        ]
        return sorted(rows, key=lambda row: row["regressed"] == "")

    def tags(self) -> dict[str, str]:
        return {
            "vitflow.regression": str(bool(self.regressions)).lower(),
            "vitflow.regressed": ", ".join(self.regressions),
            "vitflow.baseline_run": self.baseline.run_id or "",
            "vitflow.alias_moved": str(self.evaluation.alias_moved).lower(),
        }


def _rounded(value: object) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 2)


def evaluation(
    tracking_uri: str, experiment: str, ref_tags: Mapping[str, str], resolved: Mapping[str, str], run_id: str
) -> Evaluation:
    """What run ``run_id`` evaluated, beside what the previous evaluation of the same reference evaluated."""
    earlier = [r for r in find_runs(tracking_uri, experiment, ref_tags, last=3, finished_only=False) if r != run_id]
    previous = MlflowClient(tracking_uri).get_run(earlier[0]).data.tags if earlier else {}
    return Evaluation(
        ref_tags["vitflow.model_ref"], ref_tags["vitflow.suite"], run_id, resolved.get("registered_model"),
        resolved.get("model_version"), earlier[0] if earlier else None, previous.get("vitflow.model_version"),
    )  # fmt: skip


def find_baseline(tracking_uri: str, experiment: str, e: Evaluation, choice: BaselineChoice) -> Baseline:
    """The evaluation run ``choice`` names, or why there is none yet (and what to do)."""
    from tasks.registry_ops import alias_version

    if choice.kind == "best-of-last":
        tags = {"vitflow.model_ref": e.ref, "vitflow.suite": e.suite}
        earlier = find_runs(tracking_uri, experiment, tags, last=choice.last + 1)
        ids = [r for r in earlier if r != e.run_id][: choice.last]
        if not ids:
            return Baseline(None, "", f"no earlier finished evaluation of {e.ref} on {e.suite}: this is the first.")
        best = max(ids, key=lambda r: run_results(tracking_uri, r)["value"].mean())
        return Baseline(best, f"the best of the last {len(ids)} evaluations (run {best})")
    if e.name is None:
        return Baseline(
            None, "", f"{e.ref} is not a registry reference, so it has no @{choice.alias}: use best-of-last."
        )
    where = f"models:/{e.name}@{choice.alias}"
    version = alias_version(MlflowClient(tracking_uri), e.name, choice.alias)
    if version is None:
        return Baseline(
            None,
            "",
            f"no version of {e.name} has the alias @{choice.alias} yet: after a review, "
            f"`vitflow promote models:/{e.name}/{e.version} --alias {choice.alias}` makes it the baseline.",
        )
    tags = {"vitflow.registered_model": e.name, "vitflow.model_version": version, "vitflow.suite": e.suite}
    runs = [r for r in find_runs(tracking_uri, experiment, tags, finished_only=False) if r != e.run_id]
    if not runs:
        return Baseline(
            None,
            "",
            f"{where} (version {version}) has no evaluation on {e.suite} yet: "
            f"`vitflow transfer {where} --suite {e.suite}` makes one.",
        )
    return Baseline(runs[0], f"{where} (version {version}, run {runs[0]})")


def judge(tracking_uri: str, experiment: str, e: Evaluation, choice: BaselineChoice, threshold: float) -> Verdict:
    """Compare evaluation ``e`` with the baseline ``choice`` names (only ``e``'s numbers when there is none)."""
    baseline = find_baseline(tracking_uri, experiment, e, choice)
    runs = [baseline.run_id, e.run_id] if baseline.run_id else [e.run_id]
    return Verdict(e, baseline, threshold, compare(tracking_uri, runs, threshold, baseline.run_id))


def publish_verdict(verdict: Verdict) -> None:
    """The comparison as a Prefect table artifact (regressed rows first) and the verdict as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(verdict.rows(), key="nightly-comparison", description=verdict.message())
    create_markdown_artifact(f"# Nightly transfer evaluation\n\n{verdict.message()}\n", key="nightly-summary")
