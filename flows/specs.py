"""Typed specs of a benchmark run (pydantic): what the Prefect UI renders as a form and the CLI fills from presets.

A :class:`BenchmarkSpec` is built from stage specs; every inconsistency is refused before any compute, with an
error naming the field (``--set`` paths and UI field names are the same dotted paths).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.settings import default_artifact_root, default_tracking_uri
from vit import storage
from vit.configs import list_models, model_config, resolve_model_name
from vit.engine.config import batch_error, length_error, objective_error

Protocol = Literal["imagenet", "cifar10", "cifar100", "pets", "flowers102", "vtab"]
FILE_FORMATS = ("imagenet", "imagefolder", "cifar10", "cifar100", "pets", "flowers102", "fashion-mnist", "vtab", "list")


def _title(name: str, _info: Any) -> str:
    """The form's label of a field: ``warmup_steps`` -> ``Warmup steps``."""
    return name.replace("_", " ").capitalize()


RANGE_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems")


def _form_schema(schema: dict[str, Any]) -> None:
    """What Prefect's form needs of a model's JSON schema. An ``X | None`` field stays ``anyOf: [X, null]`` (the form
    renders that as an X/None toggle) with its range beside the ``anyOf``, not inside it: jsonschema then names the
    field out of range (``transfer.finetune.steps: 0 is less than or equal to the minimum of 0``) where an ``anyOf``
    only says that the value "is not valid under any of the given schemas". (``pretrain``, a nullable section, is
    made the preset's in each deployment's form: ``flows.deployments.preset_form``.)"""
    for prop in schema.get("properties", {}).values():
        options = prop.get("anyOf", [])
        if len(options) != 2 or {"type": "null"} not in options:
            continue
        (kept,) = [o for o in options if o != {"type": "null"}]
        for key in RANGE_KEYWORDS:
            if key in kept:
                prop[key] = kept.pop(key)


class Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        field_title_generator=_title,
        json_schema_extra=_form_schema,
    )


class DatasetSpec(Spec):
    """A dataset to prepare: ``source`` as ``vitflow data prepare`` takes it (``FORMAT:PATH``)."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="name in the artifact store (datasets/NAME/FINGERPRINT)",
    )
    source: str = Field(description="FORMAT:PATH, e.g. cifar10:/data/cifar-10-batches-py or synthetic-upstream:")
    options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="reader options, e.g. minival=0.02, max_train=4000, size=32 (see vitflow data prepare --help)",
    )
    max_corrupt_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="fail when more than this share of samples is unusable"
    )

    @field_validator("source")
    @classmethod
    def _source_has_format(cls, value: str) -> str:
        from vit.data import DataError
        from vit.data.sources import parse_source

        if ":" not in value:
            raise ValueError(f"source {value!r} must be FORMAT:PATH (e.g. cifar10:/data/cifar-10-batches-py)")
        try:
            parse_source(value)
        except DataError as e:
            raise ValueError(str(e)) from None
        return value

    def missing_path(self) -> str | None:
        """The local source path when it does not exist (checked when a run starts, where the data must be)."""
        fmt, path = self.source.split(":", 1)
        if fmt in FILE_FORMATS and path and "://" not in path and not Path(path).exists():
            return path
        return None


class ModelSpec(Spec):
    name: str = Field(
        "vit_micro_4",
        description="the ViT variant, e.g. vit_b_16 (aliases such as ViT-B/16 are accepted too)",
        json_schema_extra={"enum": list_models()},  # a dropdown in the UI's form
    )
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None: the variant's official default")
    gelu_approximate: Literal["tanh", "none"] = Field(
        "tanh", description="tanh: the official JAX GELU; none: exact erf (timm, torchvision)"
    )
    allow_partial_patches: bool = Field(
        False, description="accept resolutions that are not a multiple of the patch (VALID drops the border)"
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return resolve_model_name(value)


class PretrainSpec(Spec):
    """Upstream pre-training (paper Table 3). Exactly one of ``steps`` and ``epochs``."""

    dataset: DatasetSpec = Field(title="Dataset", description="the upstream dataset")
    objective: Literal["classification", "mpp"] = Field(
        "classification",
        description="classification (the paper's supervised pre-training) or mpp (masked patch prediction)",
    )
    image_size: int = Field(224, gt=0, description="pre-training resolution in pixels")
    steps: int | None = Field(None, gt=0, description="training steps (give steps or epochs)")
    epochs: float | None = Field(None, gt=0, description="epochs over the training split (give steps or epochs)")
    batch_size: int = Field(4096, gt=0, description="global batch: devices x micro-batch x accumulation steps")
    train_subset: int | None = Field(
        None,
        gt=0,
        description="train on this many images of the training split, the first of one seeded permutation, so "
        "smaller subsets lie inside larger ones (the paper's 9M/30M/90M of JFT); None: the whole split",
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate (Adam)")
    weight_decay: float = Field(0.03, ge=0, description="weight decay (paper Table 3)")
    weight_decay_mode: Literal["lr_relative", "schedule_only"] = Field(
        "lr_relative",
        description="lr_relative: decay scaled by the learning rate (flax Adam); schedule_only: big_vision's",
    )
    warmup_steps: int = Field(10_000, ge=0, description="linear warm-up steps")
    decay: Literal["linear", "cosine"] = Field("linear", description="learning-rate decay after warm-up")
    linear_end: float = Field(1e-5, ge=0, description="final learning rate of the linear decay")
    grad_clip: float | None = Field(
        None, gt=0, description="clip the global gradient norm at this value (None: no clipping)"
    )
    loss: Literal["sigmoid", "softmax"] = Field("sigmoid", description="sigmoid cross-entropy (the paper's) or softmax")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the targets")
    head_bias_init: float | None = Field(None, description="initial head bias (None: -10 for the sigmoid loss, else 0)")
    pre_logits: bool = Field(True, description="the tanh pre-logits layer of width D (paper §3.1)")
    dropout: float | None = Field(0.1, ge=0, lt=1, description="dropout rate (None: the variant's default)")
    train_transform: Literal["pretrain", "eval"] = Field(
        "pretrain",
        description="pretrain: the paper's random crop (5-100% of the area) and flip; eval: the whole image, "
        "unaugmented (for short schedules on small images, where such crops leave too little to learn from)",
    )
    eval_split: str | None = Field(
        None, description="a held-out split of the upstream set the pre-trained model's top-1 is measured on"
    )
    checkpoint_every_minutes: float = Field(30.0, gt=0, description="save a resumable checkpoint this often")
    registered_model: str | None = Field(
        None, description="MLflow registered model (default: EXPERIMENT-MODEL, e.g. demo-vit_micro_4)"
    )
    alias: str = Field("candidate", description="MLflow registry alias pointed at the new model version")

    @model_validator(mode="after")
    def _one_length(self) -> PretrainSpec:
        if error := length_error(self.steps, self.epochs) or objective_error(self.objective, self.loss):
            raise ValueError(f"pretrain: {error}")
        return self


class BenchmarkItem(Spec):
    """One downstream benchmark: its dataset, the protocol row of Table 4, and what to run on it."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="the benchmark's name in results and MLflow runs, e.g. cifar10 or vtab/dtd",
    )
    dataset: DatasetSpec = Field(title="Dataset", description="the benchmark's dataset")
    protocol: Protocol = Field(
        description="the row of the paper's Table 4 (steps, learning rates, splits) it is fine-tuned with"
    )

    @field_validator("name")
    @classmethod
    def _no_parent_segments(cls, value: str) -> str:
        if ".." in value.split("/") or "//" in value:
            raise ValueError(f"benchmark name {value!r} may not contain '..' or empty '/' segments")
        return value

    finetune: bool = Field(True, description="fine-tune on this benchmark")
    fewshot: bool = Field(True, description="few-shot linear evaluation on this benchmark")
    real: bool = Field(False, description="also report ImageNet ReaL (needs real_labels in the dataset)")


class FinetuneSpec(Spec):
    """Overrides of Table 4 for every benchmark (None keeps the protocol's value)."""

    image_size: int = Field(384, gt=0, description="fine-tuning resolution in pixels (paper: 384)")
    batch_size: int = Field(512, gt=0, description="global fine-tuning batch (paper: 512)")
    steps: int | None = Field(None, gt=0, description="fine-tuning steps (None: the protocol's)")
    lrs: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="learning rates to sweep (None: the protocol's)"
    )
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps (None: the protocol's)")
    sweep: bool = Field(True, description="choose the learning rate on the held-out split (false: the first one)")
    polyak: float | None = Field(
        None, gt=0, lt=1, description="Polyak averaging factor of the weights, e.g. 0.9999 (None: off)"
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0], min_length=1, description="a final fine-tune per seed"
    )


class FewshotSpec(Spec):
    enabled: bool = Field(True, description="run few-shot linear evaluation")
    shots: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5, 10, 25], min_length=1, description="training images per class"
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="sampling seeds of the shots"
    )
    l2: float = Field(1024.0, gt=0, description="ridge regularisation (big_vision: 1024)")
    image_size: int | None = Field(None, gt=0, description="None: the pre-training (or init checkpoint's) resolution")


class TransferSpec(Spec):
    benchmarks: list[BenchmarkItem] = Field(default_factory=list, description="the downstream benchmarks")
    finetune: FinetuneSpec = Field(
        default_factory=FinetuneSpec, title="Finetune", description="fine-tuning settings shared by every benchmark"
    )
    fewshot: FewshotSpec = Field(
        default_factory=FewshotSpec, title="Fewshot", description="few-shot settings shared by every benchmark"
    )
    from_scratch_baseline: bool = Field(False, description="also fine-tune a randomly initialised model")

    @model_validator(mode="after")
    def _unique_names(self) -> TransferSpec:
        names = [b.name for b in self.benchmarks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"transfer.benchmarks: duplicate names {dupes}")
        return self


class ComputeSpec(Spec):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    nproc_per_node: int = Field(1, ge=1, description="training processes (GPUs) per node; more than one runs torchrun")
    nnodes: int = Field(1, ge=1, description="nodes of a multi-node training run")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous for nnodes > 1")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation steps per optimiser step")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="training precision")
    compile: bool = Field(False, description="torch.compile the model")
    grad_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, more compute)"
    )
    num_workers: int = Field(0, ge=0, description="data-loading worker processes per training process")
    max_parallel: int = Field(1, ge=1, description="fine-tunes run at once (local dispatch)")
    threads_per_job: int | None = Field(
        None, ge=1, description="CPU threads per training process (None: torch's default)"
    )
    pretrain_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of the pre-training process, which the benchmark flow runs before any fine-tune "
        "(None: threads_per_job)",
    )
    prefork: bool = Field(
        True,
        description="fork each single-process training stage from a server that has imported torch and the engine "
        "once (saves seconds per stage); false: a fresh `python -m vit.engine` per stage",
    )
    dispatch: Literal["local", "deployments"] = Field(
        "local", description="local: fine-tunes in this process's task runner; deployments: each on a work pool"
    )
    gpu_slots_limit: str | None = Field(
        None,
        description="a Prefect global concurrency limit with one slot per GPU (e.g. `prefect gcl create gpu "
        "--limit 8`); each training stage holds nproc_per_node slots while it runs",
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _rendezvous(self) -> ComputeSpec:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("compute.rdzv_endpoint is required when compute.nnodes > 1")
        return self


class AnalysisSpec(Spec):
    enabled: bool = Field(True, description="draw the paper's Fig. 6/7 analysis figures")
    num_images: int = Field(8, ge=1, le=64, description="images the attention figures are drawn on")


class BenchmarkSpec(Spec):
    """The whole protocol: prepare -> pre-train (or start from ``init``) -> transfer -> aggregate."""

    experiment: str = Field(min_length=1, description="the MLflow experiment (one per suite, so its runs compare)")
    model: ModelSpec = Field(default_factory=ModelSpec, title="Model", description="the model")
    pretrain: PretrainSpec | None = Field(None, description="upstream pre-training (or give init)")
    init: str | None = Field(None, description="start transfer from this checkpoint instead of pre-training")
    transfer: TransferSpec = Field(
        default_factory=TransferSpec, title="Transfer", description="what the model is transferred to"
    )
    compute: ComputeSpec = Field(default_factory=ComputeSpec, title="Compute", description="where and how stages run")
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, title="Analysis", description="the analysis figures")
    artifact_root: str | None = Field(None, description="None: $VITFLOW_ARTIFACT_ROOT or $VITFLOW_HOME/artifacts")
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI or sqlite:///$VITFLOW_HOME/mlflow.db"
    )
    seed: int = Field(0, ge=0, description="seed of pre-training and the from-scratch baseline")

    @field_validator("artifact_root")
    @classmethod
    def _valid_root(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                storage.validate_uri(value)
            except storage.StorageError as e:
                raise ValueError(str(e)) from None
            if storage.is_http(value):
                raise ValueError("artifact_root must be a local path, file:// or s3:// URI")
        return value

    @field_validator("init")
    @classmethod
    def _valid_init(cls, value: str | None) -> str | None:
        if value is None or value.startswith("models:/"):
            return value
        try:
            storage.validate_uri(value)
        except storage.StorageError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _valid_tracking(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite:///", "http://", "https://", "databricks", "file:")):
            raise ValueError(f"tracking_uri {value!r}: use sqlite:///path.db or http(s)://host:port")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkSpec:
        errors = []
        if (self.pretrain is None) == (self.init is None):
            errors.append("give exactly one of pretrain and init (a checkpoint to transfer)")
        cfg = model_config(self.model.name)
        stride = cfg.total_stride
        sizes = {"transfer.finetune.image_size": self.transfer.finetune.image_size}
        if self.pretrain is not None:
            sizes["pretrain.image_size"] = self.pretrain.image_size
        if self.transfer.fewshot.image_size:
            sizes["transfer.fewshot.image_size"] = self.transfer.fewshot.image_size
        for name, size in sizes.items():
            if size < stride:
                errors.append(f"{name} {size} is smaller than one patch of {self.model.name} ({stride} px)")
            elif size % stride and not self.model.allow_partial_patches:
                errors.append(
                    f"{name} {size} is not a multiple of the patch size {stride} of {self.model.name} "
                    "(set model.allow_partial_patches=true to drop the border as the paper's VALID patching does)"
                )
        batches = {"transfer.finetune.batch_size": self.transfer.finetune.batch_size}
        if self.pretrain is not None:
            batches["pretrain.batch_size"] = self.pretrain.batch_size
        for name, batch in batches.items():
            if error := batch_error(batch, self.compute.world_size, self.compute.accum_steps, "compute.accum_steps"):
                errors.append(f"{name} {error}")
        if self.pretrain is not None and self.pretrain.objective == "mpp" and cfg.is_hybrid:
            errors.append("pretrain.objective mpp needs a plain ViT, not a hybrid")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def form_values(self) -> dict[str, Any]:
        """The spec as the flows' ``spec`` parameter (a deployment's default, an API call's value): JSON, with no
        ``pretrain`` when there is none (the form's schema has a pre-training section or none, never null)."""
        return self.model_dump(mode="json", exclude={"pretrain"} if self.pretrain is None else None)

    def check_inputs(self) -> None:
        """Refuse missing local inputs (dataset folders, the init checkpoint) before any compute, naming the field."""
        errors = []
        datasets = [("pretrain.dataset", self.pretrain.dataset)] if self.pretrain else []
        datasets += [(f"transfer.benchmarks.{i}.dataset", b.dataset) for i, b in enumerate(self.transfer.benchmarks)]
        for field, dataset in datasets:
            if path := dataset.missing_path():
                errors.append(f"{field}.source: dataset path {path!r} does not exist")
        if (
            self.init
            and "://" not in self.init
            and not self.init.startswith("models:/")
            and not Path(self.init).exists()
        ):
            errors.append(f"init: checkpoint {self.init!r} does not exist")
        if errors:
            raise ValueError("; ".join(errors))

    # -- derived values -----------------------------------------------------------------------------------------

    def resolved_artifact_root(self) -> str:
        return self.artifact_root or default_artifact_root()

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()

    def spec_hash(self) -> str:
        return hash_json(self.model_dump(mode="json", exclude={"tracking_uri", "compute"}))


def hash_json(data: Any) -> str:
    """A short, stable content hash of JSON-able data (content-addressed stage outputs)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
