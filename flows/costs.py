"""What a benchmark spec will cost before it runs: every training stage the benchmark flow would launch (pre-training,
then per benchmark the learning-rate sweep and the final fine-tune per seed), its steps and images, its training
FLOPs (``vit.model.flops_per_image``: forward from the architecture, training = 3 x forward) and the accelerator
hours at a stated model-FLOPs utilisation on a named GPU, with the paper's TPUv3-core-days beside the runs the
paper reports (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Table 2).

Not counted: few-shot feature extraction and evaluation passes (forward only, over the test and few-shot sets),
and data preparation. Epoch-based pre-training needs the dataset's size: the known sizes are below; for another
dataset give ``pretrain.steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from flows import plan
from flows.specs import BenchmarkSpec
from vit.configs import model_config
from vit.engine.trainer import GPU_PEAK_BF16

# Training images of the public pre-training sets (image-net.org: the fall 2011 ImageNet-21k release, the
# ILSVRC-2012 training set).
DATASET_IMAGES = {"imagenet21k": 14_197_122, "imagenet": 1_281_167}
# Table 2 of the paper: TPUv3-core-days of pre-training, keyed by (model, pre-training dataset).
PAPER_TPUV3_CORE_DAYS = {("vit_h_14", "jft300m"): 2_500, ("vit_l_16", "jft300m"): 680, ("vit_l_16", "imagenet21k"): 230}
DEFAULT_GPU, DEFAULT_MFU = "H100", 0.45


@dataclass(frozen=True)
class StageCost:
    """One training run the benchmark flow launches; ``steps`` is None when it cannot be known before preparation."""

    name: str  # the MLflow child run's name
    image_size: int
    batch_size: int
    steps: int | None
    flops_per_image: float  # training FLOPs (forward + backward)

    @property
    def images(self) -> int | None:
        return None if self.steps is None else self.steps * self.batch_size

    @property
    def flops(self) -> float | None:
        return None if self.images is None else self.images * self.flops_per_image


@dataclass(frozen=True)
class CostPlan:
    experiment: str
    model: str
    precision: str
    gpu: str
    mfu: float
    stages: list[StageCost]
    paper_core_days: float | None  # Table 2's pre-training cost, when the paper reports this run
    pretrains: bool

    @property
    def peak_flops(self) -> float:
        """Dense peak per GPU at the run's precision (fp32 runs as TF32: half the bf16 peak)."""
        peak = GPU_PEAK_BF16[self.gpu]
        return peak / 2 if self.precision == "fp32" else peak

    def gpu_hours(self, flops: float) -> float:
        return flops / (self.peak_flops * self.mfu) / 3600

    @property
    def total_flops(self) -> float:
        return sum(s.flops or 0.0 for s in self.stages)


def training_flops(model: str, image_size: int) -> float:
    from vit.model import flops_per_image  # torch: imported only when a plan is made

    cfg = model_config(model)
    return flops_per_image(replace(cfg, image_size=(image_size, image_size)), training=True)


def pretrain_stage(spec: BenchmarkSpec) -> StageCost:
    p = spec.pretrain
    assert p is not None
    images = DATASET_IMAGES.get(p.dataset.name)
    steps = p.steps if p.steps is not None else (math.ceil(p.epochs * images / p.batch_size) if images else None)
    return StageCost(
        f"pretrain:{spec.model.name}", p.image_size, p.batch_size, steps, training_flops(spec.model.name, p.image_size)
    )


def finetune_stages(spec: BenchmarkSpec) -> list[StageCost]:
    """The sweep runs (first seed) and the final runs (every seed) of every benchmark and model, as
    ``flows.benchmark.transfer`` launches them and named as their MLflow runs."""
    models = ["pretrained", "scratch"] if spec.transfer.from_scratch_baseline else ["pretrained"]
    stages = []
    for bench in (b for b in spec.transfer.benchmarks if b.finetune):
        recipe = plan.finetune_recipe(spec, bench)
        flops = training_flops(spec.model.name, recipe.image_size)
        for label in models:
            suffix = "" if label == "pretrained" else f":{label}"
            sweep = plan.sweep_lrs(spec, recipe)
            final_lr = "best" if sweep else f"{recipe.lrs[0]:g}"  # the sweep's winner is known only after it
            runs = [f"finetune:{bench.name}:lr={lr:g}{suffix}" for lr in sweep]
            runs += [
                f"finetune:{bench.name}:lr={final_lr}{suffix}:seed={seed}" for seed in spec.transfer.finetune.seeds
            ]
            stages += [StageCost(run, recipe.image_size, recipe.batch_size, recipe.steps, flops) for run in runs]
    return stages


def cost_plan(spec: BenchmarkSpec, gpu: str = DEFAULT_GPU, mfu: float = DEFAULT_MFU) -> CostPlan:
    if gpu not in GPU_PEAK_BF16:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPU_PEAK_BF16)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    stages = [pretrain_stage(spec)] if spec.pretrain else []
    stages += finetune_stages(spec)
    key = (spec.model.name, spec.pretrain.dataset.name) if spec.pretrain else None
    return CostPlan(
        spec.experiment,
        spec.model.name,
        spec.compute.precision,
        gpu,
        mfu,
        stages,
        PAPER_TPUV3_CORE_DAYS.get(key) if key else None,
        spec.pretrain is not None,
    )


def _count(value: float | None, fmt: str = ",.0f") -> str:
    return "?" if value is None else format(value, fmt)


def render(cost: CostPlan) -> str:
    """The plan as a fixed-width table with a total and the paper's figure."""
    hours = f"{cost.gpu}-hours"
    head = ["stage", "px", "batch", "steps", "images", "GFLOP/img", "PFLOP", hours]
    rows = [
        [
            s.name,
            str(s.image_size),
            str(s.batch_size),
            _count(s.steps),
            _count(s.images),
            f"{s.flops_per_image / 1e9:,.1f}",
            _count(None if s.flops is None else s.flops / 1e15),
            _count(None if s.flops is None else cost.gpu_hours(s.flops), ",.1f"),
        ]
        for s in cost.stages
    ]
    total = cost.total_flops
    rows.append(["total", "", "", "", "", "", f"{total / 1e15:,.0f}", f"{cost.gpu_hours(total):,.1f}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"Plan of {cost.experiment}: {len(cost.stages)} training stages of {cost.model}, estimated at "
        f"{cost.mfu:.0%} MFU on {cost.gpu} ({cost.peak_flops / 1e12:,.0f} TFLOP/s dense {cost.precision} peak)",
        "",
    ]
    for r in [head, *rows]:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]))
    if any(s.steps is None for s in cost.stages):
        lines.append("? : epochs over a dataset of unknown size; set pretrain.steps to plan it")
    if cost.paper_core_days is not None:
        lines.append(
            f"paper (Table 2): pre-training took {cost.paper_core_days / 1000:g}k TPUv3-core-days "
            f"({cost.paper_core_days * 24 / 2:,.0f} TPUv3-chip-hours)"
        )
    elif cost.pretrains:
        lines.append("paper (Table 2): no TPUv3-core-days for this model and dataset (it reports L/16 and H/14)")
    lines.append("not counted: few-shot and evaluation passes (forward only), data preparation")
    return "\n".join(lines)
