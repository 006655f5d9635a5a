"""The typed spec of the paper's scaling study (Figures 3-5, Table 6): models x nested upstream subsets.

A :class:`ScalingSpec` is a base :class:`~flows.specs.BenchmarkSpec` (its pre-training, transfer suite and compute)
plus the models to compare and the upstream sizes to pre-train each on. Every (model, size) pair is an *arm*: the
base spec with that model and ``pretrain.train_subset``, validated as a whole spec, so every rule of a benchmark run
holds for each arm and its errors name the field.

Pre-training length: every size trains for the same number of steps (``pretrain.steps``, or ``pretrain.epochs``
counted over the *whole* upstream split), so the figures vary the data, not the compute per model: the paper's
Figure 4 uses the same hyper-parameters for every subset of JFT-300M (§4.3).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from flows.specs import BenchmarkSpec, Spec
from vit.configs import list_models, resolve_model_name

FULL = "full"
UpstreamSize = Annotated[int, Field(gt=0)] | Literal["full"]


class ScalingPlotSpec(Spec):
    """What Figures 4 and 5 plot on their y axis."""

    setting: Literal["fewshot", "finetune"] = Field(
        "fewshot", description="few-shot linear accuracy (the paper's Fig. 4) or fine-tuned accuracy (Fig. 3, 5)"
    )
    shots: int = Field(5, gt=0, description="the k of the k-shot accuracy plotted (one of transfer.fewshot.shots)")
    panels: Literal["average", "each", "both"] = Field(
        "both", description="a panel of the mean over the benchmarks, one per benchmark, or both"
    )


class ScalingSpec(Spec):
    """Pre-train every model on every nested subset of the upstream set, transfer each, plot accuracy against
    pre-training set size (Fig. 4) and against pre-training compute (Fig. 5)."""

    base: BenchmarkSpec = Field(
        description="pre-training, transfer suite and compute shared by every arm (its model.name is replaced by "
        "each of models; its other model fields apply to all)"
    )
    models: list[str] = Field(
        min_length=1,
        description="the ViT and BiT variants compared, e.g. vit_b_16 and bit_r50x1",
        json_schema_extra={"items": {"enum": list_models()}},
    )
    upstream_sizes: list[UpstreamSize] = Field(
        min_length=1,
        description="pre-training set sizes in images (nested random subsets of the upstream training split), "
        "or full for the whole split",
    )
    finetune: bool = Field(False, description="fine-tune every arm on every benchmark as well as few-shot")
    plot: ScalingPlotSpec = Field(default_factory=ScalingPlotSpec, description="what Figures 4 and 5 show")

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        names = [resolve_model_name(v) for v in value]
        if len(set(names)) != len(names):
            raise ValueError(f"models: each model once, got {names}")
        return names

    @field_validator("upstream_sizes")
    @classmethod
    def _distinct_sizes(cls, value: list[int | str]) -> list[int | str]:
        if len(set(value)) != len(value):
            raise ValueError(f"upstream_sizes: each size once, got {value}")
        return sorted(value, key=lambda s: (s == FULL, s if s != FULL else 0))

    @model_validator(mode="after")
    def _consistent(self) -> ScalingSpec:
        errors = []
        base = self.base
        if base.pretrain is None:
            errors.append("base.pretrain is required: the study pre-trains every model (base.init is not used)")
        elif base.pretrain.train_subset is not None:
            errors.append("base.pretrain.train_subset: give the sizes in upstream_sizes")
        if base.transfer.from_scratch_baseline:
            errors.append("base.transfer.from_scratch_baseline: the study compares pre-trained models; set it false")
        fewshot_on = base.transfer.fewshot.enabled and any(b.fewshot for b in base.transfer.benchmarks)
        if self.plot.setting == "fewshot" and not fewshot_on:
            errors.append("plot.setting fewshot needs few-shot evaluation on at least one benchmark")
        if self.plot.setting == "fewshot" and self.plot.shots not in base.transfer.fewshot.shots:
            errors.append(f"plot.shots {self.plot.shots} is not in base.transfer.fewshot.shots")
        if self.plot.setting == "finetune" and not (
            self.finetune and any(b.finetune for b in base.transfer.benchmarks)
        ):
            errors.append("plot.setting finetune needs finetune=true and a benchmark that fine-tunes")
        if errors:
            raise ValueError("; ".join(errors))
        for i, name in enumerate(self.models):
            try:
                self.model_spec(name)
            except ValueError as e:
                raise ValueError(f"models.{i} ({name}): {e}") from None
        return self

    def check_inputs(self) -> None:
        """The base spec's inputs: every arm reads the same datasets."""
        self.base.check_inputs()

    def model_spec(self, name: str) -> BenchmarkSpec:
        """The base spec for one model (validated: its patch size must divide the resolutions, and so on), with
        fine-tuning off unless asked for; every size of the model shares its transfer settings."""
        data = self.base.model_dump(mode="json")
        data["model"]["name"] = name
        if not self.finetune:
            for bench in data["transfer"]["benchmarks"]:
                bench["finetune"] = False
        return BenchmarkSpec.model_validate(data)

    def arm_spec(self, name: str, subset: int | None, steps: int) -> BenchmarkSpec:
        """The spec of one (model, size) arm: ``subset`` images (None: the whole split) for ``steps`` steps, its
        checkpoint registered as ``<experiment>-<model>[-n<subset>]``."""
        spec = self.model_spec(name)
        assert spec.pretrain is not None
        registered = spec.pretrain.registered_model or f"{spec.experiment}-{name}"
        pretrain = spec.pretrain.model_copy(
            update={
                "train_subset": subset,
                "steps": steps,
                "epochs": None,
                "registered_model": registered + (f"-n{subset}" if subset else ""),
            }
        )
        return spec.model_copy(update={"pretrain": pretrain})
