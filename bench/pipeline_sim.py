"""The benchmark flow's scheduling, with simulated stage durations: its makespan against the critical path.

The real flow runs (Prefect's test server, MLflow on SQLite, a local artifact store, every task, cache policy and
MLflow run as in production) with the stages' *work* replaced by sleeps of known length: dataset preparation,
the training loop of pre-training and each fine-tune, few-shot evaluation and the report. The benchmarks' sweeps
and final runs take different times, so a flow that waited for every sweep before starting any final run, or for
every dataset before pre-training, would show it. The critical path is computed from the same durations over the
flow's dependency graph (pre-training needs its dataset; a benchmark's sweep needs pre-training and its dataset;
its final runs need its sweep; aggregation needs everything), with unlimited parallelism
(``compute.max_parallel`` is set above the number of concurrent stages). Overhead per stage = (makespan - critical
path) / stages.

    python bench/pipeline.py --simulate [--no-write]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOAL_RATIO = 1.1
S = 4.0  # seconds per unit of simulated work: stages seconds long, as short stages of a CPU demo are
PREPARE = {"synthetic-upstream": 3 * S}  # every other dataset: PREPARE_DEFAULT
PREPARE_DEFAULT = 1 * S
PRETRAIN = 8 * S
# per benchmark: (one sweep run, one final run, few-shot)
BENCHMARKS = {"synth/natural_objects": (1 * S, 6 * S, 1.5 * S), "synth/structured_count": (5 * S, 2 * S, 1.5 * S)}
AGGREGATE = 1 * S
SETS = [
    "transfer.finetune.lrs=[0.01,0.03]",
    "transfer.finetune.sweep=true",
    "transfer.finetune.seeds=[0]",
    "transfer.fewshot.seeds=[0]",
    "analysis.enabled=false",
    "compute.max_parallel=32",
    "experiment=simulated",
]


def critical_path() -> float:
    """The longest chain of the flow's dependency graph, with the simulated durations."""
    upstream = PREPARE["synthetic-upstream"] + PRETRAIN
    ends = []
    for sweep, final, fewshot in BENCHMARKS.values():
        start = max(upstream, PREPARE_DEFAULT)
        ends.append(start + max(sweep + final, fewshot))
    return max(ends) + AGGREGATE


def stage_count() -> int:
    """Stages with simulated work: datasets, pre-training, per benchmark and model 2 sweeps + 1 final + few-shot."""
    return 1 + len(BENCHMARKS) + 1 + len(BENCHMARKS) * 2 * 4 + 1


def _patch(assign: Callable[[object, str, object], None]) -> None:
    """Replace the stages' work by sleeps; everything around it (Prefect, MLflow, storage, caching) stays real.
    ``assign(module, name, value)`` does each replacement (``setattr``, or a test's ``monkeypatch.setattr``)."""
    import tasks.aggregate
    import tasks.fewshot
    import tasks.prepare
    import tasks.train
    import vit.data
    from tasks.stages import DatasetRef, FewshotResult, TrainResult
    from vit import storage

    def prepare_dataset(source: str, name: str, root: str, **_: Any) -> str:
        time.sleep(PREPARE.get(name, PREPARE_DEFAULT))
        return f"{root}/datasets/{name}/simulated"

    def dataset_ref(uri: str) -> DatasetRef:
        name = uri.rstrip("/").split("/")[-2]
        splits = {"train": 100, "test": 10, "train800": 80, "val200": 20, "train800val200": 100}
        return DatasetRef(name=name, uri=uri, fingerprint=name, num_classes=10, splits=splits)

    def run_stage(stage, tracker, run) -> TrainResult:
        bench = stage.tags.get("vitflow.benchmark")
        final = stage.tags.get("vitflow.phase") == "final"
        time.sleep(PRETRAIN if bench is None else BENCHMARKS[bench][1 if final else 0])
        metrics = {"test/top1": 0.5} if final else {"val/top1": 0.5 + 0.1 * stage.config.optim.lr}
        uri = f"{stage.uri}/model.safetensors"
        return TrainResult(
            kind=stage.kind, name=stage.name, stage_uri=stage.uri, model_uri=uri, metrics=metrics, step=1
        )

    def evaluate(stage) -> FewshotResult:
        time.sleep(BENCHMARKS[stage.benchmark][2])
        records = [{"shots": k, "seed": s, "accuracy": 0.5} for k in stage.shots for s in stage.seeds]
        return FewshotResult(benchmark=stage.benchmark, records=records, mean={str(k): 0.5 for k in stage.shots})

    def publish(stage, df, headline, target: str, *_: Any) -> None:
        time.sleep(AGGREGATE)
        storage.write_text(storage.join(target, "report.md"), "# simulated\n")  # what the flow run's page shows

    assign(vit.data, "prepare_dataset", prepare_dataset)
    assign(tasks.prepare, "dataset_ref", dataset_ref)
    assign(tasks.train, "_run_stage", run_stage)
    assign(tasks.fewshot, "_evaluate", evaluate)
    assign(tasks.aggregate, "_publish", publish)


def simulate(home: Path, assign: Callable[[object, str, object], None] = setattr) -> dict[str, float]:
    """One simulated benchmark flow run in ``home``: its makespan, the critical path, the overhead per stage."""
    os.environ.update(VITFLOW_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    from prefect.testing.utilities import prefect_test_harness

    from flows.benchmark import benchmark
    from flows.presets import build_spec, synthetic_suite
    from flows.specs import DatasetSpec

    _patch(assign)
    spec = build_spec("demo", [*SETS, f"artifact_root={home / 'artifacts'}", f"tracking_uri=sqlite:///{home}/ml.db"])
    # The demo's recipe on datasets named as above, whatever data the demo reads on this machine.
    upstream = DatasetSpec(name="synthetic-upstream", source="synthetic-upstream:")
    benches = [b for b in synthetic_suite() if b.name in BENCHMARKS]
    spec = spec.model_copy(
        update={
            "pretrain": spec.pretrain.model_copy(update={"dataset": upstream}),
            "transfer": spec.transfer.model_copy(update={"benchmarks": benches}),
        }
    )
    assert [b.name for b in benches] == list(BENCHMARKS), "the simulated benchmarks are missing from the suite"
    from tasks.tracking import Tracker

    Tracker(spec.resolved_tracking_uri()).experiment_id(spec.experiment)  # MLflow's new database is not the flow's
    with prefect_test_harness(server_startup_timeout=180):
        start = time.time()
        benchmark(spec=spec)
        makespan = time.time() - start
    critical = critical_path()
    return {
        "makespan": makespan,
        "critical": critical,
        "ratio": makespan / critical,
        "overhead_per_stage": (makespan - critical) / stage_count(),
        "stages": stage_count(),
    }


def report(result: dict[str, float]) -> str:
    met = result["ratio"] <= GOAL_RATIO
    return (
        "## Pipeline scheduling, simulated stage durations (`python bench/pipeline.py --simulate`)\n\n"
        + (__doc__ or "").split("\n\n")[1].replace("\n", " ")
        + "\n\n| makespan s | critical path s | makespan / critical path | stages | overhead per stage s |\n"
        "|---|---|---|---|---|\n"
        f"| {result['makespan']:.1f} | {result['critical']:.1f} | {result['ratio']:.2f} | {int(result['stages'])} | "
        f"{result['overhead_per_stage']:.2f} |\n\n"
        f"Goal: makespan at most {GOAL_RATIO}x the critical path: {result['ratio']:.2f}x "
        + ("(met)." if met else "(not met).")
    )


def main(write: bool) -> None:
    from bench.common import machine_line, save_results, update_section, write_summary

    with tempfile.TemporaryDirectory(prefix="vitflow-bench-sim-") as home:
        result = simulate(Path(home))
    body = report(result) + f"\n\nMachine: {machine_line()}\n"
    print(body)
    if write:
        update_section("pipeline-simulated", body)
        figure = f"{result['ratio']:.2f}x the critical path, {result['overhead_per_stage']:.2f} s overhead per stage"
        save_results(
            "pipeline-simulated",
            {"pipeline-simulated": {"figure": figure, "met": result["ratio"] <= GOAL_RATIO, "note": ""}},
            result,
        )
        write_summary()
