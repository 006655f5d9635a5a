"""Prefect task: the scaling study's aggregation — one table of every (model, upstream size) arm's transfer results,
the paper's Figure 4 (accuracy vs pre-training set size) and Figure 5 (accuracy vs pre-training compute), the report.

Outputs go to ``<artifact root>/runs/<parent run id>/`` (results.parquet/csv, scaling.csv, report.md/html, plots/),
to the ``aggregate`` MLflow run, and to the parent run: the tables and report, and one metric per cell of the table
named ``<model>/<images>/<benchmark>/<setting>/top1`` (percent; ``<benchmark>`` ``mean`` is the mean over the
benchmarks) beside ``<model>/<images>/pretrain/exaflops``.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from pydantic import Field

from tasks.aggregate import PARENT_FILES, result_records, upload_outputs
from tasks.common import TrackingContext, run_logger, start_stage_run
from tasks.stages import RunSummary, TransferResults, Typed
from tasks.tracking import RunRef, Tracker
from vit import storage

TABLE_COLUMNS = ("model", "upstream_images", "pretrain_exaflops", "benchmark", "setting", "top1")
# x axis -> (figure, what the x axis is, a line per): Fig. 4 a line per model over data sizes; Fig. 5 a line per data
# size over the models' compute (every size of a model trains the same steps, so its compute is the model's).
FIGURES = {
    "upstream_images": ("Figure 4", "pre-training set size", "model"),
    "pretrain_exaflops": ("Figure 5", "pre-training compute", "upstream_images"),
}


class ScalingArm(Typed):
    """One (model, upstream size) pair of the study: what it pre-trained on and what that cost."""

    model: str
    label: str = Field(description="the arm's model label in the transfer flow's stage and run names")
    pretrain: str = Field(description="the results table's pre-training data: the dataset, with the size if a subset")
    images: int = Field(description="upstream training images (the subset's size, or the whole split's)")
    exaflops: float = Field(description="pre-training compute: training FLOPs per image x images seen, / 1e18")


class ScalingAggregateStage(Typed):
    experiment: str
    artifact_root: str
    tracking: TrackingContext
    arms: list[ScalingArm]
    results: dict[str, TransferResults] = Field(description="model -> its transfer results, every arm's")
    setting: str = Field(description="fewshot or finetune: what the figures plot")
    shots: int = Field(description="the k of the k-shot accuracy plotted")
    panels: str = Field(description="average, each or both")


def tidy_results(run_id: str, stage: ScalingAggregateStage) -> pd.DataFrame:
    """The tidy results table of ``tasks.results`` (a row per seed), every arm's rows under its model and its
    pre-training data."""
    from tasks.results import RESULT_COLUMNS, results_frame

    records = []
    for arm in stage.arms:
        got = stage.results[arm.model]
        mine = TransferResults(
            finals=[r for r in got.finals if r.model == arm.label],
            fewshot=[r for r in got.fewshot if r.model == arm.label],
        )
        records += result_records(run_id, arm.model, arm.pretrain, mine)
    return results_frame(pd.DataFrame(records, columns=list(RESULT_COLUMNS)))


def scaling_table(df: pd.DataFrame, arms: list[ScalingArm]) -> pd.DataFrame:
    """Mean top-1 (%) over seeds per (model, upstream size, benchmark, setting), and the mean over the benchmarks
    as benchmark ``mean`` (where there are several)."""
    from tasks.results import setting_name

    by_arm = {(a.model, a.pretrain): a for a in arms}
    top1 = df[df["metric"] == "top1"]
    arm_of = [by_arm[m, p] for m, p in zip(top1["model"], top1["pretrain"], strict=True)]
    rows = top1.assign(
        upstream_images=[a.images for a in arm_of],
        pretrain_exaflops=[a.exaflops for a in arm_of],
        setting=[setting_name(s, p) for s, p in zip(top1["shots"], top1["pretrain"], strict=True)],
    )
    keys = ["model", "upstream_images", "pretrain_exaflops", "benchmark", "setting"]
    table = rows.groupby(keys, sort=False)["value"].mean().rename("top1").reset_index()
    if table["benchmark"].nunique() > 1:
        means = table.groupby(keys[:3] + ["setting"], sort=False)["top1"].mean().reset_index()
        table = pd.concat([table, means.assign(benchmark="mean")[list(TABLE_COLUMNS)]], ignore_index=True)
    return table[list(TABLE_COLUMNS)].sort_values(["model", "upstream_images", "benchmark", "setting"], kind="stable")


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The parent run's metrics: ``<model>/<images>/<benchmark>/<setting>/top1`` and the arms' exaFLOPs."""
    metrics = {
        f"{r.model}/{r.upstream_images}/{r.benchmark}/{r.setting}/top1": float(r.top1)
        for r in table.itertuples(index=False)
    }
    for r in table.drop_duplicates(["model", "upstream_images"]).itertuples(index=False):
        metrics[f"{r.model}/{r.upstream_images}/pretrain/exaflops"] = float(r.pretrain_exaflops)
    return metrics


def side_by_side(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: a row per (benchmark, setting), a column per arm (the paper's Table 2
    layout when there is one size, its Fig. 4 data when there are several)."""
    arms = table.assign(
        arm=[f"{m} · {n:,} images" for m, n in zip(table["model"], table["upstream_images"], strict=True)]
    )
    wide = arms.pivot_table(index=["benchmark", "setting"], columns="arm", values="top1", aggfunc="mean", sort=False)
    return wide.rename_axis(columns=None)


def figures(stage: ScalingAggregateStage, table: pd.DataFrame) -> dict[str, bytes]:
    from tasks.plots import plot_scaling

    setting = f"{stage.shots}shot" if stage.setting == "fewshot" else "finetune"
    out = {}
    for x, (figure, what, series) in FIGURES.items():
        title = f"{figure}: {setting} top-1 vs {what}"
        out[f"{figure} - {setting} vs {what}"] = plot_scaling(table, x, setting, stage.panels, series, title=title)
    return out


def _publish(stage: ScalingAggregateStage, tracker: Tracker, run: RunRef, run_id: str) -> RunSummary:
    """The tables, the report and its figures to ``<root>/runs/<run id>/`` and MLflow; the metrics to both runs."""
    from tasks.report import ReportedRun, report_header, write_report
    from tasks.results import to_markdown, write_results

    target = storage.join(stage.artifact_root, "runs", run_id)
    parent_id = stage.tracking.parent_run_id
    df = tidy_results(run_id, stage)
    table = scaling_table(df, stage.arms)
    metrics = table_metrics(table)
    for target_run in [run] + ([tracker.existing_run(parent_id, "parent")] if parent_id else []):
        tracker.log_metrics(target_run, metrics)
    wide = side_by_side(table)
    note = "Top-1 (%), mean over seeds; `mean` is the mean over the benchmarks. Pre-training compute: " + ", ".join(
        f"{a.model} on {a.images:,} images {a.exaflops:.3g} exaFLOPs" for a in stage.arms
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_results(df, out)
        table.to_csv(out / "scaling.csv", index=False)
        ctx = stage.tracking
        meta = report_header(ctx.tracking_uri, [ReportedRun(ctx.experiment_id, run_id, target)], stage.experiment)
        sections = {"Scaling study (paper Figures 4 and 5, Table 2)": (wide, note)}
        write_report(out, df, figures(stage, table), f"vitflow — {stage.experiment}", meta, sections)
        upload_outputs(out, target, tracker, run, parent_id, (*PARENT_FILES, "scaling.csv"))
    run_logger().info("scaling study %s: %d arms, %d table rows", stage.experiment, len(stage.arms), len(table))
    return RunSummary(
        results_uri=storage.join(target, "results.parquet"),
        report_uri=storage.join(target, "report.html"),
        headline=metrics,
        table=to_markdown(wide),
        run_id=run_id,
        table_rows=table.round(4).to_dict("records"),
    )


@task(name="aggregate-scaling", task_run_name="aggregate {stage.experiment}", cache_policy=NONE)
def scaling_aggregate_task(stage: ScalingAggregateStage) -> RunSummary:
    """Every arm's results in one table, Figures 4 and 5, the report: to the artifact store, MLflow and Prefect."""
    tracker, run = start_stage_run(stage.tracking, "aggregate", "aggregate")
    try:
        summary = _publish(stage, tracker, run, stage.tracking.parent_run_id or uuid.uuid4().hex)
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return summary
