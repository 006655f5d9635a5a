"""The deployments, declared once: ``vitflow deploy`` serves them, ``infra/prefect.yaml`` declares the same for work
pools (a test proves the two agree)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow
from prefect.utilities.callables import ParameterSchema

from flows.benchmark import benchmark, prepare_datasets
from flows.jobs import fewshot_stage, train_stage
from flows.presets import PRESET_TAG, PRESETS
from flows.scaling import scaling
from flows.scaling_presets import SCALING_PRESETS
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
        *scaling_definitions(),
    ]  # fmt: skip


def scaling_definitions() -> list[DeploymentDef]:
    """A deployment of the scaling flow per scaling preset, the preset's whole spec the form's default."""
    return [
        DeploymentDef(
            name,
            scaling,
            "flows/scaling.py:scaling",
            f"Scaling flow, preset {name}: {build.__doc__.split(':')[0].strip()}.",
            {"spec": build().model_dump(mode="json")},
            tags=("vitflow", f"{PRESET_TAG}{name}"),
        )
        for name, build in SCALING_PRESETS.items()
    ]


def preset_form(d: DeploymentDef, schema: ParameterSchema) -> ParameterSchema:
    """The form of a preset's deployment: a pre-training section of its own when the preset pre-trains, none when
    it starts from ``init``, instead of the flow's "pre-training or None" (an ``anyOf``, whose errors Prefect
    reports as one line about the whole section, where a section of its own names the field:
    ``spec.pretrain.steps: 0 is less than or equal to the minimum of 0``). Other deployments keep the flow's."""
    spec = d.parameters.get("spec")
    if spec is None:
        return schema
    spec = spec.get("base", spec)  # a scaling study's benchmark spec is its base
    form = schema.model_copy(deep=True)
    fields = form.definitions["BenchmarkSpec"]["properties"]
    if "pretrain" in spec:
        pretrain = fields["pretrain"]
        (section,) = [o for o in pretrain.pop("anyOf") if "$ref" in o]
        pretrain.pop("default", None)
        pretrain.update(section)
    else:
        del fields["pretrain"]
    return form


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
        deployment = d.flow.to_deployment(
            name=d.name,
            description=d.description,
            parameters=d.parameters or None,
            schedules=schedules,
            tags=list(d.tags),
            work_pool_name=work_pool,
            entrypoint_type=entrypoint_type,
        )
        # Prefect derives a deployment's schema from its flow and offers no argument for another: set it here.
        deployment._parameter_openapi_schema = preset_form(d, deployment._parameter_openapi_schema)
        out.append(deployment)
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


PREFECT_YAML_HEADER = """\
# vitflow's deployments for work pools (Prefect 3 project file), written by `python -m flows.deployments` from
# flows/deployments.py's definitions(), which `vitflow deploy` serves without a work pool; tests/test_infra.py fails
# when the two drift apart (regenerate after changing a preset). Deploy from the repository root:
#
#   VITFLOW_WORK_POOL=vitflow-process prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
#   VITFLOW_WORK_POOL=vitflow-gpu     prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
#
# Work pools (docs/DEPLOY.md creates them):
#   vitflow-process  type process: `prefect worker start --pool vitflow-process` on a machine with the code
#                    (the docker-compose GPU worker, or local workers in a checkout)
#   vitflow-gpu      type kubernetes: infra/k8s/base-job-template.json runs each flow run as a GPU pod of the
#                    image built from infra/Dockerfile
#
# `{{ $VAR }}` in a deployment is read from the environment of `prefect deploy`; in a pull step, from the
# environment of the flow run (the worker's machine or pod), so the same deployment finds the code in a checkout
# and in the image (VITFLOW_CODE_DIR=/opt/vitflow there). A preset's deployments (benchmark/<preset>,
# prepare-datasets/<preset>) carry its whole spec as the default of the form; paths are relative to the worker's
# working directory unless VITFLOW_DATA was set when this file was written.
"""


def prefect_yaml(defs: list[DeploymentDef] | None = None) -> str:
    """infra/prefect.yaml: the deployments of :func:`definitions` on the work pool ``$VITFLOW_WORK_POOL``."""
    import prefect
    import yaml

    pool = {"name": "{{ $VITFLOW_WORK_POOL }}", "work_queue_name": "default", "job_variables": {}}
    project = {
        "name": "vitflow",
        "prefect-version": prefect.__version__,
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $VITFLOW_CODE_DIR }}"}}],
        "deployments": [
            {
                "name": d.name,
                "entrypoint": d.entrypoint,
                "description": d.description,
                "parameters": d.parameters,
                "tags": list(d.tags),
                "schedules": [{"cron": d.cron, "timezone": NIGHTLY_TIMEZONE}] if d.cron else [],
                "work_pool": pool,
            }
            for d in defs or definitions()
        ],
    }
    dumper = type("NoAliases", (yaml.SafeDumper,), {"ignore_aliases": lambda self, data: True})
    return (
        PREFECT_YAML_HEADER + "\n" + yaml.dump(project, Dumper=dumper, sort_keys=False, width=120, allow_unicode=True)
    )


if __name__ == "__main__":
    print(prefect_yaml(), end="")
