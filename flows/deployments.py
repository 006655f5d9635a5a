"""The deployments, declared once: ``vitflow deploy`` serves them, ``infra/prefect.yaml`` declares the same for work
pools (a test proves the two agree)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow

from flows.benchmark import benchmark, prepare_datasets
from flows.jobs import fewshot_stage, train_stage
from flows.presets import PRESET_TAG, PRESETS
from flows.specs import BenchmarkSpec
from flows.transfer_eval import transfer_eval

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"


@dataclass(frozen=True)
class DeploymentDef:
    name: str
    flow: Flow
    entrypoint: str  # path:function, as prefect.yaml writes it
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    tags: tuple[str, ...] = ("vitflow",)


def preset_definitions(
    presets: Mapping[str, BenchmarkSpec] | None = None,
) -> list[DeploymentDef]:
    """A ``benchmark`` and a ``prepare-datasets`` deployment per preset, named after it (``benchmark/demo``), whose
    default ``spec`` is the preset's whole spec: the UI's Custom run opens a typed form filled with its values.
    ``presets`` replaces the preset's specs (``vitflow deploy --set``); default: :data:`flows.presets.PRESETS`."""
    specs = dict(presets or {name: build() for name, build in PRESETS.items()})
    out = []
    for flow, path, what in (
        (benchmark, "flows/benchmark.py:benchmark", "The whole protocol (prepare, pre-train, transfer, aggregate)"),
        (
            prepare_datasets,
            "flows/benchmark.py:prepare_datasets",
            "Prepare (validate, shard, fingerprint) the datasets",
        ),
    ):
        for name, spec in specs.items():
            doc = " ".join((PRESETS[name].__doc__ or "").split())
            out.append(
                DeploymentDef(
                    name,
                    flow,
                    path,
                    f"{what} of the {name} preset. {doc}",
                    {"spec": spec.form_values()},
                    tags=("vitflow", f"{PRESET_TAG}{name}"),
                )
            )
    return out  # fmt: skip


def definitions(
    nightly_model: str | None = None,
    nightly_cron: str | None = None,
    presets: Mapping[str, BenchmarkSpec] | None = None,
) -> list[DeploymentDef]:
    """Every deployment of vitflow. The nightly evaluation's model reference and schedule come from the arguments,
    ``VITFLOW_NIGHTLY_MODEL`` / ``VITFLOW_NIGHTLY_CRON``, or the defaults (02:00 UTC, the demo's candidate)."""
    model = nightly_model or os.environ.get("VITFLOW_NIGHTLY_MODEL", "models:/demo-vit_micro_4@candidate")
    cron = nightly_cron or os.environ.get("VITFLOW_NIGHTLY_CRON", NIGHTLY_CRON)
    return [
        *preset_definitions(presets),
        DeploymentDef(
            "transfer-eval-nightly", transfer_eval, "flows/transfer_eval.py:transfer_eval",
            "Nightly transfer evaluation of a model reference against the @champion's evaluation; fails when a "
            "metric drops beyond the threshold and the seeds' spread.",
            {"model": model, "suite": "fewshot-nightly", "threshold": 1.0,
             "baseline": {"kind": "alias", "alias": "champion", "last": 7}},
            cron=cron, tags=("vitflow", "nightly"),
        ),
        DeploymentDef(
            "train-stage", train_stage, "flows/jobs.py:train_stage",
            "One training stage, dispatched by the benchmark flow with dispatch=deployments.",
        ),
        DeploymentDef(
            "fewshot-stage", fewshot_stage, "flows/jobs.py:fewshot_stage",
            "One few-shot evaluation, dispatched by the benchmark flow with dispatch=deployments.",
        ),
    ]  # fmt: skip


def runner_deployments(defs: list[DeploymentDef] | None = None, work_pool: str | None = None) -> list:
    """``RunnerDeployment``s for ``prefect.serve`` (no work pool) or ``deploy`` onto ``work_pool``. On a work pool
    the entrypoints are module paths (``flows.benchmark.benchmark``): a worker imports them from the installed
    package (the image of infra/Dockerfile), so no code storage or pull step is needed."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    entrypoint_type = EntrypointType.MODULE_PATH if work_pool else EntrypointType.FILE_PATH
    out = []
    for d in defs or definitions():
        schedules = [Cron(d.cron, timezone=NIGHTLY_TIMEZONE)] if d.cron else None
        out.append(
            d.flow.to_deployment(
                name=d.name,
                description=d.description,
                parameters=d.parameters or None,
                schedules=schedules,
                tags=list(d.tags),
                work_pool_name=work_pool,
                entrypoint_type=entrypoint_type,
            )
        )
    return out


def serve(
    limit: int | None = None,
    on_start: Callable[[list[str]], None] | None = None,
    defs: list[DeploymentDef] | None = None,
) -> None:
    """Serve every deployment (or ``defs``) from this process until interrupted (runs execute here as
    subprocesses)."""
    from prefect import serve as prefect_serve

    deployments = runner_deployments(defs)
    if on_start is not None:
        on_start([f"{d.flow_name}/{d.name}" for d in deployments])
    prefect_serve(*deployments, limit=limit)
