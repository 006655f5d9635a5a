"""``vitflow run scaling|scaling-i21k|bit-vs-vit``: the scaling study's presets run the scaling flow, with the same
``--set`` overrides and ``--dry-run`` cost plan as the benchmark presets."""

from __future__ import annotations

import os

from flows import prefect_server
from flows.commands import _check_artifact_root, _validation_message, _where_to_look, fail, print_plan
from vit.engine.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED


def scaling_spec(preset: str, overrides: list[str] | None, check_inputs: bool = True):
    from flows.scaling_presets import build_scaling_spec

    try:
        spec = build_scaling_spec(preset, overrides or [])
        if check_inputs:
            spec.base.check_inputs()
        return spec
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise fail(_validation_message(e), EXIT_BAD_INPUT) from None


def cost_plan(spec, gpu: str, mfu: float):
    """Every training stage of the study: each arm's pre-training (epochs counted over the whole upstream set, as
    the flow does; unknown for a dataset of unknown size) and each model's fine-tunes per arm."""
    from dataclasses import replace

    from flows import costs
    from flows.scaling import pretrain_steps
    from flows.scaling_spec import FULL

    p = spec.base.pretrain
    full = costs.DATASET_IMAGES.get(p.dataset.name)
    steps = pretrain_steps(spec, full)
    stages = []
    for model in spec.models:
        flops = costs.training_flops(model, p.image_size)
        model_spec = spec.model_spec(model)
        for size in spec.upstream_sizes:
            suffix = "" if size == FULL else f":n={size}"
            stages.append(costs.StageCost(f"pretrain:{model}{suffix}", p.image_size, p.batch_size, steps, flops))
            label = f"{model}-" + ("full" if size == FULL else f"n{size}")
            stages += [replace(s, name=f"{s.name}:{label}") for s in costs.finetune_stages(model_spec)]
    plan = costs.cost_plan(spec.base, gpu, mfu)
    return replace(plan, model=", ".join(spec.models), stages=stages, paper_core_days=None, pretrains=False)


def run_scaling(preset: str, overrides: list[str] | None, dry_run: bool, gpu: str, mfu: float) -> None:
    spec = scaling_spec(preset, overrides, check_inputs=not dry_run)
    if dry_run:
        return print_plan(spec, cost_plan, gpu, mfu)
    _check_artifact_root(spec.base.resolved_artifact_root())
    server = prefect_server.start_if_needed()
    from prefect import tags

    from flows.benchmark import preload_imports
    from flows.presets import PRESET_TAG
    from flows.scaling import scaling

    try:
        if server is not None:
            preload_imports(spec.base)
            server.wait_until_healthy(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120)))
        with tags(f"{PRESET_TAG}{preset}"):  # the flow run records the preset its study came from
            summary = scaling(spec=spec)
    except Exception as e:
        raise fail(f"scaling {preset!r} failed: {e}", EXIT_FAILED) from None
    _where_to_look(summary, spec.base.resolved_tracking_uri())
