"""``vitflow run scaling|scaling-i21k|bit-vs-vit``: the scaling study's presets run the scaling flow, with the same
``--set`` overrides and ``--dry-run`` cost plan as the benchmark presets."""

from __future__ import annotations

from flows.commands import print_plan, run_flow, validated


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
    from flows.scaling_presets import build_scaling_spec

    spec = validated(lambda: build_scaling_spec(preset, overrides or []), check_inputs=not dry_run)
    if dry_run:
        return print_plan(spec, cost_plan, gpu, mfu)

    def start():
        from flows.scaling import scaling

        return scaling(spec=spec)

    run_flow("scaling", preset, spec.base, start)
