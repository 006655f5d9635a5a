"""The benchmark flow's scheduling under simulated stage durations (``bench/pipeline.py --simulate``): the real flow,
Prefect and MLflow, with each stage's work replaced by a sleep. Speed is measured by the bench, not here; this test
keeps the simulation runnable as the presets change."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import pipeline_sim  # noqa: E402


def test_the_simulated_flow_runs_every_stage_and_takes_at_least_its_critical_path(monkeypatch, tmp_path):
    scale = 1 / 8  # the bench's durations, shortened: the chain of sleeps is still the critical path
    monkeypatch.setattr(pipeline_sim, "PREPARE", {k: v * scale for k, v in pipeline_sim.PREPARE.items()})
    monkeypatch.setattr(pipeline_sim, "PREPARE_DEFAULT", pipeline_sim.PREPARE_DEFAULT * scale)
    monkeypatch.setattr(pipeline_sim, "PRETRAIN", pipeline_sim.PRETRAIN * scale)
    monkeypatch.setattr(pipeline_sim, "AGGREGATE", pipeline_sim.AGGREGATE * scale)
    monkeypatch.setattr(
        pipeline_sim, "BENCHMARKS", {k: tuple(d * scale for d in v) for k, v in pipeline_sim.BENCHMARKS.items()}
    )
    result = pipeline_sim.simulate(tmp_path, monkeypatch.setattr)  # the stages' real work is back after the test
    assert result["critical"] == pipeline_sim.critical_path() > 0
    assert result["makespan"] >= result["critical"]  # every stage slept: nothing on the chain was skipped
    assert result["stages"] == pipeline_sim.stage_count()
