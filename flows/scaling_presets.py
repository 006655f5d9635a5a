"""Presets of the scaling flow: each a function returning a :class:`~flows.scaling_spec.ScalingSpec`.

``scaling`` is the paper's data-scaling study at CPU scale (offline, minutes), ``scaling-i21k`` the real-data
version on ImageNet-21k, ``bit-vs-vit`` the paper's Table 2 comparison (a ViT and a BiT of matched compute, one
upstream size, fine-tuned and few-shot) as one run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.presets import I21K, _file_dataset, _paper_transfer, demo, synthetic_suite
from flows.scaling_spec import FULL, ScalingPlotSpec, ScalingSpec
from flows.specs import BenchmarkSpec, ComputeSpec, DatasetSpec, FewshotSpec, FinetuneSpec, ModelSpec, PretrainSpec
from vit.overrides import apply_overrides

BIT_VS_VIT_MODELS = ("vit_micro_4", "bit_micro")  # 21.8 and 21.4 MFLOPs per 32 px image: matched compute
SCALING_TASKS = ("synth/natural_objects", "synth/natural_fine", "synth/structured_count")


def _cpu_base(experiment: str) -> BenchmarkSpec:
    """The demo's recipe on the synthetic upstream set at 32 px (100 classes x 100 images, so the nested subsets
    are of one known size on every machine), no from-scratch baseline, few-shot on three synthetic tasks."""
    spec = demo()
    benchmarks = [b for b in synthetic_suite() if b.name in SCALING_TASKS]
    transfer = spec.transfer.model_copy(
        update={
            "benchmarks": benchmarks,
            "finetune": FinetuneSpec(image_size=32, batch_size=32, steps=50, warmup_steps=5, sweep=False),
            "fewshot": FewshotSpec(shots=[1, 5, 10], seeds=[0, 1, 2]),
            "from_scratch_baseline": False,
        }
    )
    upstream = DatasetSpec(
        name="synthetic-upstream",
        source="synthetic-upstream:",
        options={"classes": 100, "per_class": 100, "size": 32},
    )
    pretrain = spec.pretrain.model_copy(
        update={
            "dataset": upstream,
            "image_size": 32,
            "train_transform": "pretrain",
            "eval_split": None,
            "steps": 200,
            "batch_size": 64,
            "warmup_steps": 20,
        }
    )
    compute = spec.compute.model_copy(update={"pretrain_threads": None})  # its arms pre-train two at a time
    return spec.model_copy(
        update={
            "experiment": experiment,
            "transfer": transfer,
            "pretrain": pretrain,
            "analysis": spec.analysis,
            "compute": compute,
        }
    )


def scaling() -> ScalingSpec:
    """The paper's Fig. 4/5 study at CPU scale (a few minutes on 2 cores): a micro ViT and a micro BiT of matched
    compute pre-trained 200 steps on 1,000, 3,000 and all 10,000 images of the synthetic upstream set (nested
    subsets), 1/5/10-shot on three synthetic tasks; Figure 4 and 5 of the 5-shot accuracy."""
    return ScalingSpec(
        base=_cpu_base("scaling"),
        models=list(BIT_VS_VIT_MODELS),
        upstream_sizes=[1000, 3000, FULL],
        plot=ScalingPlotSpec(setting="fewshot", shots=5),
    )


def scaling_i21k() -> ScalingSpec:
    """The paper's Fig. 3-5 study on real data: ViT-B/32, B/16, L/16 and BiT R50x1, R101x3 pre-trained with the
    Table 3 recipe (Adam, batch 4096, 224 px, 90 epochs of the whole set for every size) on nested subsets of
    ImageNet-21k (`$VITFLOW_DATA/imagenet21k`, an imagefolder: 1.4M, 4.3M and all 14.2M images), 5- and 10-shot
    on ImageNet, CIFAR-10/100, Pets and Flowers; the figures plot the 5-shot mean."""
    transfer = _paper_transfer().model_copy(update={"fewshot": FewshotSpec(shots=[5, 10], seeds=[0, 1, 2])})
    base = BenchmarkSpec(
        experiment="scaling-i21k",
        model=ModelSpec(name="vit_b_16"),
        pretrain=PretrainSpec(
            dataset=_file_dataset(*I21K), image_size=224, batch_size=4096, epochs=90, lr=1e-3, dropout=0.1
        ),
        transfer=transfer,
        compute=ComputeSpec(device="cuda", precision="bf16", num_workers=8),
    )
    return ScalingSpec(
        base=base,
        models=["vit_b_32", "vit_b_16", "vit_l_16", "bit_r50x1", "bit_r101x3"],
        upstream_sizes=[1_420_000, 4_260_000, FULL],
        plot=ScalingPlotSpec(setting="fewshot", shots=5),
    )


def bit_vs_vit() -> ScalingSpec:
    """The paper's Table 2 comparison at CPU scale, as one run: a micro ViT and a micro BiT ResNet of matched
    compute pre-trained the same way on the whole synthetic upstream set (the paper trains its ResNets with the
    ViTs' Adam recipe, §4.1), then fine-tuned (Table 4 for the ViT, the BiT-HyperRule for the BiT) and few-shot on
    the same tasks: the results table and report put them side by side. For the paper's scale, set e.g.
    `models=[vit_b_16,bit_r50x3]` and a real upstream set."""
    return ScalingSpec(
        base=_cpu_base("bit-vs-vit"),
        models=list(BIT_VS_VIT_MODELS),
        upstream_sizes=[FULL],
        finetune=True,
        plot=ScalingPlotSpec(setting="finetune"),
    )


SCALING_PRESETS: dict[str, Callable[[], ScalingSpec]] = {
    "scaling": scaling,
    "scaling-i21k": scaling_i21k,
    "bit-vs-vit": bit_vs_vit,
}


def build_scaling_spec(preset: str, overrides: list[str] | dict[str, Any] | None = None) -> ScalingSpec:
    """A scaling preset with ``path.to.field=value`` overrides (e.g. ``upstream_sizes=[500,full]`` or
    ``base.pretrain.steps=100``), validated as a whole."""
    if preset not in SCALING_PRESETS:
        raise ValueError(f"unknown scaling preset {preset!r}; presets: {', '.join(SCALING_PRESETS)}")
    preset_data = SCALING_PRESETS[preset]().model_dump(mode="json")
    return ScalingSpec.model_validate(apply_overrides(preset_data, overrides or {}))
