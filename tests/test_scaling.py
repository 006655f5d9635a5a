"""The scaling flow end to end on tiny synthetic data (Prefect's test harness, SQLite MLflow, a local artifact root):
a parent run with a metric per (model, size), a table of every arm, Figures 4 and 5 in the report, a cached re-run
that trains only an added size, and bit-vs-vit as one run with both models side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

TINY = [
    "base.pretrain.steps=8",
    "base.pretrain.batch_size=16",
    "base.pretrain.warmup_steps=2",
    "base.pretrain.dataset.options.classes=8",
    "base.pretrain.dataset.options.per_class=25",
    "base.transfer.fewshot.shots=[1,2]",
    "base.transfer.fewshot.seeds=[0]",
    "plot.shots=2",
    "base.transfer.finetune.steps=4",
    "base.transfer.finetune.batch_size=16",
    "base.compute.max_parallel=1",
]
TASKS = ("synth/natural_objects", "synth/structured_count")


def tiny_spec(preset: str, root, extra=(), tasks=TASKS):
    from flows.scaling_presets import build_scaling_spec

    spec = build_scaling_spec(
        preset,
        [
            *TINY,
            f"base.artifact_root={root / 'artifacts'}",
            f"base.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *extra,
        ],
    )
    benches = [
        b.model_copy(update={"dataset": b.dataset.model_copy(update={"options": {"size": 32, "test": 40}})})
        for b in spec.base.transfer.benchmarks
        if b.name in tasks
    ]
    base = spec.base.model_copy(update={"transfer": spec.base.transfer.model_copy(update={"benchmarks": benches})})
    return spec.model_copy(update={"base": base})


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("scaling")


def _children(client: MlflowClient, parent_id: str, stage: str):
    run = client.get_run(parent_id)
    query = f"tags.mlflow.parentRunId = '{parent_id}' and tags.`vitflow.stage` = '{stage}'"
    return client.search_runs([run.info.experiment_id], query, max_results=500)


def test_nested_subsets_lie_inside_each_other_and_are_seeded():
    from vit.data.dataset import nested_subset

    small, large = nested_subset(200, 50, seed=3), nested_subset(200, 120, seed=3)
    assert len(set(small.tolist())) == 50 and set(small.tolist()) <= set(large.tolist())
    assert (np.diff(large) > 0).all() and not np.array_equal(small, nested_subset(200, 50, seed=4))


def test_scaling_spec_refuses_what_the_study_cannot_run(tmp_path):
    from flows.scaling_presets import build_scaling_spec

    for overrides, message in [
        (["upstream_sizes=[100,100]"], "each size once"),
        (["plot.shots=3"], "plot.shots 3"),
        (["plot.setting=finetune"], "finetune=true"),
        (["base.transfer.from_scratch_baseline=true"], "from_scratch_baseline"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_scaling_spec("scaling", overrides)
    assert build_scaling_spec("scaling", ["upstream_sizes=[full,500]"]).upstream_sizes == [500, "full"]


def test_scaling_flow_tables_plots_and_retrains_only_an_added_size(harness, root):
    from flows.scaling import scaling

    first = scaling(spec=tiny_spec("scaling", root, ["upstream_sizes=[full]"]))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(r.info.run_name for r in _children(client, first.run_id, "pretrain")) == [
        "pretrain:bit_micro",
        "pretrain:vit_micro_4",
    ]

    summary = scaling(spec=tiny_spec("scaling", root, ["upstream_sizes=[50,full]"]))
    trained = {r.info.run_name: r.data.tags["vitflow.cached"] for r in _children(client, summary.run_id, "pretrain")}
    assert trained == {
        "pretrain:vit_micro_4": "true",
        "pretrain:bit_micro": "true",
        "pretrain:vit_micro_4:n=50": "false",
        "pretrain:bit_micro:n=50": "false",
    }
    metrics = client.get_run(summary.run_id).data.metrics
    for model in ("vit_micro_4", "bit_micro"):
        for images in (50, 200):
            assert f"{model}/{images}/pretrain/exaflops" in metrics
            for bench in (*TASKS, "mean"):
                assert 0 <= metrics[f"{model}/{images}/{bench}/2shot/top1"] <= 100
    flops = {m: metrics[f"{m}/200/pretrain/exaflops"] for m in ("vit_micro_4", "bit_micro")}
    assert metrics["vit_micro_4/50/pretrain/exaflops"] == flops["vit_micro_4"]  # same steps for every size
    assert abs(flops["vit_micro_4"] / flops["bit_micro"] - 1) < 0.05  # matched compute

    folder = root / "artifacts" / "runs" / summary.run_id
    table = pd.read_csv(folder / "scaling.csv")
    assert list(table.columns) == ["model", "upstream_images", "pretrain_exaflops", "benchmark", "setting", "top1"]
    assert len(table) == 2 * 2 * (len(TASKS) + 1) * 2  # models x sizes x (benchmarks + mean) x shots
    html = (folder / "report.html").read_text()
    for figure in ("Figure 4", "Figure 5"):
        (plot,) = (folder / "plots").glob(f"{figure.replace(' ', '_')}*.png")
        assert plot.read_bytes().startswith(b"\x89PNG")
        assert f'alt="{figure}' in html
    assert "Scaling study" in html and "vit_micro_4 · 50 images" in html
    markdown = (folder / "report.md").read_text()  # SQLite: no MLflow UI to link to, the places as plain text
    assert f"| MLflow run | {summary.run_id} |" in markdown and f"| artifacts | {folder} |" in markdown
    assert f"<td>{summary.run_id}</td>" in html and f"<td>{folder}</td>" in html
    assert "](http" not in markdown and "href=" not in html


def test_bit_vs_vit_is_one_run_with_both_models_side_by_side(harness, root):
    from flows.scaling import scaling

    summary = scaling(spec=tiny_spec("bit-vs-vit", root, tasks=TASKS[:1]))
    folder = root / "artifacts" / "runs" / summary.run_id
    table = pd.read_csv(folder / "scaling.csv")
    assert set(table["model"]) == {"vit_micro_4", "bit_micro"} and set(table["upstream_images"]) == {200}
    finetuned = table[table["setting"] == "finetune"].pivot(index="benchmark", columns="model", values="top1")
    assert finetuned.notna().all().all() and list(finetuned.index) == [TASKS[0]]
    markdown = (folder / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if "ViT-micro/4" in line and "BiT-micro" in line)
    assert "(synthetic-upstream)" in header  # the paper-shaped fine-tuning table: a column per model


def test_cli_lists_the_scaling_presets_and_plans_every_arm():
    from typer.testing import CliRunner

    from flows.cli import app

    listed = CliRunner().invoke(app, ["presets"])
    assert listed.exit_code == 0 and all(f"\n{p} " in listed.output for p in ("scaling", "scaling-i21k", "bit-vs-vit"))
    planned = CliRunner().invoke(app, ["run", "scaling", "--dry-run", "--set", "upstream_sizes=[500,full]"])
    assert planned.exit_code == 0, planned.output
    for arm in (
        "pretrain:vit_micro_4:n=500",
        "pretrain:vit_micro_4 ",
        "pretrain:bit_micro:n=500",
        "pretrain:bit_micro ",
    ):
        assert arm in planned.output
    refused = CliRunner().invoke(app, ["run", "scaling", "--set", "plot.shots=4"])
    assert refused.exit_code == 2 and "plot.shots 4" in refused.output


def test_a_cancelled_study_ends_its_open_mlflow_runs_killed(tmp_path):
    from types import SimpleNamespace

    from flows.scaling import mark_arms_killed

    spec = tiny_spec("scaling", tmp_path)
    client = MlflowClient(spec.base.tracking_uri)
    experiment = client.create_experiment(spec.base.experiment, artifact_location=str(tmp_path / "mlruns"))
    tags = {"prefect.flow_run_id": "fr-1"}
    open_run, done = (client.create_run(experiment, tags=tags).info.run_id for _ in range(2))
    client.set_terminated(done, "FINISHED")
    mark_arms_killed(None, SimpleNamespace(id="fr-1", parameters={"spec": spec.model_dump(mode="json")}), None)
    assert [client.get_run(r).info.status for r in (open_run, done)] == ["KILLED", "FINISHED"]


def test_sizes_become_nested_subsets_of_the_prepared_split_or_are_refused():
    from flows.scaling import subsets
    from flows.scaling_presets import build_scaling_spec
    from tasks.stages import DatasetRef

    upstream = DatasetRef(name="up", uri="file:///up", fingerprint="f", num_classes=2, splits={"train": 1000})
    spec = build_scaling_spec("scaling", ["upstream_sizes=[100,1000,full]"])
    assert subsets(spec, upstream) == [100, None]  # the whole split's size is the whole split, trained once
    with pytest.raises(ValueError, match="more than the 500 training images of up"):
        subsets(spec, upstream.model_copy(update={"splits": {"train": 500}}))


def test_the_cpu_study_pre_trains_two_arms_at_once_on_one_thread_each():
    """The demo pre-trains alone on both cores; the study's arms pre-train ``max_parallel`` at a time, so each keeps
    one thread (two arms on two threads each would oversubscribe a 2-core machine)."""
    from flows import plan
    from flows.scaling_presets import build_scaling_spec

    for preset in ("scaling", "bit-vs-vit"):
        base = build_scaling_spec(preset).base
        assert (base.compute.max_parallel, plan.launch(base, pretrain=True).threads) == (2, 1)
