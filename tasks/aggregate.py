"""Prefect task: every result of a flow run in one tidy table, the paper-shaped report, the analysis figures.

Outputs go to ``<artifact root>/runs/<parent run id>/`` (results.parquet/csv, report.md/html, plots/), to the
``aggregate`` MLflow run and the parent run, and to the Prefect UI (a table, the report, links).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from tasks.common import (
    TrackingContext,
    read_done,
    run_logger,
    stage_uri,
    start_stage_run,
    write_done,
)
from tasks.report import ReportedRun, mlflow_run_url, mlflow_ui, report_header, write_report
from tasks.results import SCRATCH
from tasks.stages import AggregateStage, RunSummary, TransferResults
from tasks.tracking import RunRef, Tracker
from vit import storage


def result_records(run_id: str, model: str, pretrain: str, results: TransferResults) -> list[dict[str, Any]]:
    """Tidy rows (accuracies in percent) from the transfer flow's outputs; sweep runs are kept apart (per lr)."""
    rows = []
    for r in results.finals:
        source = SCRATCH if r.model == SCRATCH else pretrain
        base = {"run": run_id, "model": model, "pretrain": source, "split": "test", "metric": "top1", "seed": r.seed}
        rows.append({**base, "benchmark": r.benchmark, "value": 100 * r.result.metrics["test/top1"]})
        if "test/real_top1" in r.result.metrics:
            rows.append({**base, "benchmark": "imagenet_real", "value": 100 * r.result.metrics["test/real_top1"]})
    for f in results.fewshot:
        source = SCRATCH if f.model == SCRATCH else pretrain
        base = {"run": run_id, "model": model, "pretrain": source, "benchmark": f.benchmark, "split": "test"}
        rows += [
            {**base, "metric": "top1", "value": 100 * rec.accuracy, "seed": rec.seed, "shots": rec.shots}
            for rec in f.result.records
        ]
    return rows


def log_results_to_parent(
    tracker: Tracker, ctx: TrackingContext, df: pd.DataFrame, groups: dict[str, str | None]
) -> dict[str, float]:
    """Every result on the flow's parent run under one name (``tasks.results.metric_name``, percent), so MLflow's
    compare view and charts show several runs' accuracies side by side without opening children; few-shot
    accuracy also as a curve over shots (step = shots); the paper's number for a cell as tag ``paper/<name>``.
    Returns the metrics (the flow's headline)."""
    from tasks.results import fewshot_curves, paper_cells, run_metrics

    metrics = run_metrics(df, groups)
    if ctx.parent_run_id:
        parent = tracker.existing_run(ctx.parent_run_id, "parent")
        tracker.log_metrics(parent, metrics)
        for name, points in fewshot_curves(df).items():
            for shots, value in points.items():
                tracker.log_metrics(parent, {name: value}, step=shots)
        if paper := paper_cells(df):
            tracker.set_tags(parent, {f"paper/{name}": cell for name, cell in paper.items()})
    return metrics


def training_curves(stage_uris: dict[str, str]) -> pd.DataFrame:
    """Tidy (stage, group, variant, step, metric, value) rows from the stages' event logs: pre-training's loss,
    learning rate and accuracy; each fine-tune's loss and accuracy, its pre-trained and from-scratch runs as two
    lines of one panel (their learning-rate schedule is the same, and in MLflow)."""
    rows = []
    for stage, uri in stage_uris.items():
        events = storage.join(uri, "events.jsonl")  # written there by a local stage, uploaded by an S3 one
        if not storage.exists(events):
            continue
        if stage == "pretrain":
            group, variant, metrics = "pre-training", "pre-training", ("train/loss", "train/lr", "val/top1")
        else:
            group = stage.removeprefix("finetune:").removesuffix(":scratch")
            variant = "from scratch" if stage.endswith(":scratch") else "pre-trained"
            metrics = ("train/loss", "val/top1")
        for line in storage.read_bytes(events).decode().splitlines():
            event = json.loads(line)
            if event.get("event") in ("metrics", "eval"):
                rows += [
                    {"stage": stage, "group": group, "variant": variant, "step": event["step"], "metric": k, "value": v}
                    for k, v in event.items()
                    if k in metrics
                ]
    return pd.DataFrame(rows, columns=["stage", "group", "variant", "step", "metric", "value"])


def analysis_figures(
    model_uri: str, dataset_uri: str, split: str, image_size: int, num_images: int
) -> dict[str, bytes]:
    """The paper's Fig. 6/7 pictures for a model: attention distance, rollout, position similarity, filters."""
    import torch

    from tasks import plots
    from vit import analysis, load_pretrained
    from vit.data import build_transform, open_dataset

    model = load_pretrained(model_uri).eval()
    if model.cfg.image_size != (image_size, image_size):
        model.set_image_size(image_size)
    ds = open_dataset(dataset_uri)
    loader = ds.loader(split, max(num_images, 32), build_transform("eval", image_size), shuffle=False, repeat=False)
    images = next(iter(loader))[0]
    figures = {
        "attention distance": plots.plot_attention_distance(
            analysis.model_attention_distance(model, images), image_size=image_size
        ),
        "position embedding similarity": plots.plot_position_similarity(
            analysis.position_embedding_similarity(model.pos_embed.detach(), model.grid_size, model.num_prefix_tokens)
        ),
        "embedding filters": plots.plot_embedding_filters(
            analysis.embedding_filter_pca(
                model.patch_embed.proj.weight.detach(), k=min(28, model.patch_embed.proj.weight.shape[0])
            )
        ),
    }
    shown = images[:num_images]
    with torch.no_grad():
        maps = analysis.attention_rollout(model.attention_maps(shown), model.grid_size, model.num_prefix_tokens)
    figures["attention rollout"] = plots.plot_rollout_overlays(list(shown), maps)
    return figures


def make_plots(stage: AggregateStage, df: pd.DataFrame) -> dict[str, bytes]:
    """Every figure of the report: training curves, the learning-rate sweep, few-shot accuracy and, when analysis
    is on, the paper's Fig. 6/7 pictures."""
    from tasks.plots import plot_fewshot, plot_lr_sweep, plot_training_curves

    plots: dict[str, bytes] = {}
    results = stage.results
    stages = {
        f"finetune:{r.benchmark}" + ("" if r.model != SCRATCH else ":scratch"): r.result.stage_uri
        for r in results.finals
        if r.seed == stage.curve_seed
    }
    if stage.pretrained is not None:
        stages = {"pretrain": stage.pretrained.stage_uri, **stages}
    curves = training_curves(stages)
    if not curves.empty:
        plots["training curves"] = plot_training_curves(curves)
    if results.sweeps:
        sweep = pd.DataFrame(
            [
                {"benchmark": r.benchmark, "lr": r.lr, "accuracy": r.result.metrics["val/top1"]}
                for r in results.sweeps
                if r.model != SCRATCH
            ]
        )
        plots["learning-rate sweep"] = plot_lr_sweep(sweep)
    few = df[df["shots"].notna()]
    if not few.empty:
        few = few.assign(
            dataset=few["benchmark"],
            variant=few["pretrain"].map(lambda p: "from scratch" if p == SCRATCH else "pre-trained"),
            accuracy=few["value"] / 100,
        )
        plots["few-shot accuracy"] = plot_fewshot(few[["dataset", "variant", "shots", "seed", "accuracy"]])
    if (target := stage.analysis) is not None:
        plots.update(
            analysis_figures(target.model_uri, target.dataset_uri, target.split, target.image_size, target.num_images)
        )
    return plots


def cached_plots(stage: AggregateStage, df: pd.DataFrame) -> dict[str, bytes]:
    """:func:`make_plots`, drawn once per distinct input: the figures are a stage of their own, keyed by the
    results (without the run id), the stages whose curves they show and the analysed model, so an unchanged
    re-run reads them back instead of running the model and matplotlib again."""
    results = stage.results
    key = {
        "results": hashlib.sha256(df.drop(columns="run").to_csv(index=False).encode()).hexdigest(),
        "stages": sorted(r.result.stage_uri for r in results.finals + results.sweeps),
        "pretrained": stage.pretrained.stage_uri if stage.pretrained else None,
        "analysis": stage.analysis.model_dump() if stage.analysis else None,
    }
    uri = stage_uri(stage.artifact_root, "plots", stage.experiment, key)
    done = read_done(uri)
    if done is not None:
        return {name: storage.read_bytes(storage.join(uri, file)) for name, file in done["files"].items()}
    plots = make_plots(stage, df)
    files = {name: name.replace(" ", "_") + ".png" for name in plots}
    for name, file in files.items():
        storage.write_bytes(storage.join(uri, file), plots[name])
    write_done(uri, {"files": files})
    return plots


@task(name="aggregate", task_run_name="aggregate {stage.experiment}", cache_policy=NONE)
def aggregate_task(stage: AggregateStage) -> RunSummary:
    """Every result in one table, the report and its figures: to the artifact store, MLflow and the Prefect UI."""
    from tasks.results import RESULT_COLUMNS, results_frame, to_markdown

    logger = run_logger()
    ctx = stage.tracking
    tracker, run = start_stage_run(ctx, "aggregate", "aggregate")
    run_id = ctx.parent_run_id or uuid.uuid4().hex
    target = storage.join(stage.artifact_root, "runs", run_id)
    try:
        records = result_records(run_id, stage.model_name, stage.pretrain_name, stage.results)
        df = results_frame(pd.DataFrame(records, columns=list(RESULT_COLUMNS)))
        headline = log_results_to_parent(tracker, ctx, df, stage.groups)
        upstream = _upstream_top1(stage, tracker)
        headline.update(upstream)
        _publish(stage, df, headline, target, tracker, run, run_id)
        tracker.log_metrics(run, headline)
        summary = _summary_table(df)
        table = to_markdown(summary, index=False)  # printed by the CLI; the rows are the run page's table
        if upstream:
            top1 = upstream[UPSTREAM_METRIC]
            table += f"\n\nupstream: {stage.pretrain_name}, held-out top-1 {top1:.2f} (the pre-trained model)"
        logger.info("results of %s: %d rows (the flow run's `results-table` artifact)", stage.experiment, len(df))
    except BaseException:
        tracker.finish(run, "FAILED")
        raise
    tracker.finish(run)
    return RunSummary(
        results_uri=storage.join(target, "results.parquet"),
        report_uri=storage.join(target, "report.html"),
        headline=headline,
        table=table,
        run_id=run_id,
        table_rows=summary.round(2).fillna("").to_dict("records"),
    )


PARENT_FILES = ("results.parquet", "results.csv", "report.md", "report.html")


def _publish(
    stage: AggregateStage,
    df: pd.DataFrame,
    headline: dict[str, float],
    target: str,
    tracker: Tracker,
    run: RunRef,
    run_id: str,
) -> None:
    """Write the results, report, plots and headline to ``target`` and the aggregate run (the tables and report
    also to the parent run)."""
    from tasks.results import write_results

    plots = cached_plots(stage, df)
    ctx = stage.tracking
    meta = report_header(
        ctx.tracking_uri,
        [ReportedRun(ctx.experiment_id, run_id, target)],
        stage.experiment,
        {"model": stage.model_name, "pre-training data": stage.pretrain_name},
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_results(df, out)
        write_report(out, df, plots, title=f"vitflow — {stage.experiment}", meta=meta)
        (out / "headline.json").write_text(json.dumps(headline, indent=2))
        upload_outputs(out, target, tracker, run, stage.tracking.parent_run_id)


def upload_outputs(
    out: Path, target: str, tracker: Tracker, run: RunRef, parent_id: str | None, parent_files=PARENT_FILES
) -> None:
    """Every file under ``out`` to ``target`` and the aggregate run; the tables and report (``parent_files``)
    also to the parent run."""
    parent_run = tracker.existing_run(parent_id, "parent") if parent_id else None
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        storage.upload(path, storage.join(target, rel))
        tracker.log_artifact(run, path, str(Path(rel).parent) if "/" in rel else None)
        if parent_run is not None and path.name in parent_files:
            tracker.log_artifact(parent_run, path, None)


UPSTREAM_METRIC = "upstream/top1"


def _upstream_top1(stage: AggregateStage, tracker: Tracker) -> dict[str, float]:
    """The pre-trained model's top-1 (%) on the upstream set's held-out split (``pretrain.eval_split``), also on
    the parent run: how well pre-training learnt, next to how well it transfers. Empty when not measured."""
    top1 = stage.pretrained.metrics.get("val/top1") if stage.pretrained else None
    if top1 is None:
        return {}
    metric = {UPSTREAM_METRIC: 100 * top1}
    if stage.tracking.parent_run_id:
        tracker.log_metrics(tracker.existing_run(stage.tracking.parent_run_id, "parent"), metric)
    return metric


def _summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Benchmark x setting mean accuracy (%): what the CLI prints at the end of a run. A cell is the parent run's
    MLflow metric ``<benchmark>/<setting>/top1``. Columns read left to right: the pre-trained model's fine-tune then
    its shots in increasing order, then the from-scratch baseline the same way."""
    from tasks.results import setting_name

    if df.empty:
        return pd.DataFrame({"benchmark": []})
    labels, order = [], {}
    for pretrain, shots in zip(df["pretrain"], df["shots"], strict=True):
        labels.append(setting_name(shots, pretrain))
        order[labels[-1]] = (pretrain == SCRATCH, -1 if pd.isna(shots) else int(shots))
    df = df.assign(setting=labels)
    table = df.pivot_table(index="benchmark", columns="setting", values="value", aggfunc="mean")
    return table[sorted(table.columns, key=order.__getitem__)].reset_index().rename_axis(columns=None)


def _inline_plots(markdown: str, folder: str) -> str:
    """The report's markdown with its ``plots/<name>.png`` links replaced by ``data:`` URIs: a Prefect markdown
    artifact is shown by a browser that cannot read the artifact store, so the images travel inside it."""

    def embed(match: re.Match[str]) -> str:
        png = storage.read_bytes(storage.join(folder, match.group(2)))
        return f"{match.group(1)}(data:image/png;base64,{base64.b64encode(png).decode('ascii')})"

    return re.sub(r"(!\[[^\]]*\])\((plots/[^)\s]+\.png)\)", embed, markdown)


def _links_markdown(summary: RunSummary, ctx: TrackingContext, tracker: Tracker) -> str:
    """The parent run, every stage run and the report, as links a browser opens (MLflow's UI and its artifact
    endpoint), or, with a SQLite tracking store, where they are and how to open them."""
    if (ui := mlflow_ui(ctx.tracking_uri)) is None:
        return (
            f"MLflow tracks to `{ctx.tracking_uri}`, a file with no UI server: run "
            f"`mlflow ui --backend-store-uri {ctx.tracking_uri}` and open run `{summary.run_id}`.\n\n"
            f"Report: `{summary.report_uri}`\n"
        )
    children = tracker.client.search_runs(
        [ctx.experiment_id], f"tags.`mlflow.parentRunId` = '{summary.run_id}'", max_results=1000
    )
    report = f"{ui}/get-artifact?path=report.html&run_uuid={summary.run_id}"
    lines = [
        f"- [MLflow parent run]({mlflow_run_url(ctx.tracking_uri, ctx.experiment_id, summary.run_id)})",
        f"- [report (HTML, through MLflow)]({report})",
        *sorted(
            f"- [{r.info.run_name}]({mlflow_run_url(ctx.tracking_uri, ctx.experiment_id, r.info.run_id)})"
            for r in children
        ),
    ]
    return "\n".join(lines) + "\n"


def publish_run_page(summary: RunSummary, ctx: TrackingContext) -> None:
    """The flow run's page in the Prefect UI: the results table, the report with its plots inline and links to
    the MLflow runs and the report. Called from the parent flow, so the artifacts are on the run a user opens."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    create_table_artifact(
        summary.table_rows, key="results-table", description="Top-1 accuracy (%): MLflow's `<benchmark>/<setting>/top1`"
    )
    folder = summary.report_uri.rsplit("/", 1)[0]
    markdown = storage.read_bytes(storage.join(folder, "report.md")).decode()
    create_markdown_artifact(_inline_plots(markdown, folder), key="report", description="vitflow report")
    tracker = Tracker(ctx.tracking_uri)
    create_markdown_artifact(_links_markdown(summary, ctx, tracker), key="links", description="MLflow runs, report")
    if url := mlflow_run_url(ctx.tracking_uri, ctx.experiment_id, summary.run_id):
        create_link_artifact(url, key="mlflow-run", link_text="MLflow parent run")
