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
from vit.configs import model_config, resolve_model_name

Protocol = Literal["imagenet", "cifar10", "cifar100", "pets", "flowers102", "vtab"]
FILE_FORMATS = ("imagenet", "imagefolder", "cifar10", "cifar100", "pets", "flowers102", "fashion-mnist", "vtab", "list")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DatasetSpec(Spec):
    """A dataset to prepare: ``source`` as ``vitflow data prepare`` takes it (``FORMAT:PATH``)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: str = Field(description="FORMAT:PATH, e.g. cifar10:/data/cifar-10-batches-py or synthetic-upstream:")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    max_corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0)

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
    name: str = "vit_micro_4"
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None: the variant's official default")
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    allow_partial_patches: bool = Field(
        False, description="accept resolutions that are not a multiple of the patch (VALID drops the border)"
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return resolve_model_name(value)


class PretrainSpec(Spec):
    """Upstream pre-training (paper Table 3). Exactly one of ``steps`` and ``epochs``."""

    dataset: DatasetSpec
    objective: Literal["classification", "mpp"] = "classification"
    image_size: int = Field(224, gt=0)
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(4096, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.03, ge=0)
    weight_decay_mode: Literal["lr_relative", "schedule_only"] = "lr_relative"
    warmup_steps: int = Field(10_000, ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    linear_end: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    loss: Literal["sigmoid", "softmax"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    head_bias_init: float | None = None
    pre_logits: bool = Field(True, description="the tanh pre-logits layer of width D (paper §3.1)")
    dropout: float | None = Field(0.1, ge=0, lt=1)
    checkpoint_every_minutes: float = Field(30.0, gt=0)
    registered_model: str | None = Field(None, description="MLflow registered model (default <experiment>-<model>)")
    alias: str = "candidate"

    @model_validator(mode="after")
    def _one_length(self) -> PretrainSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("pretrain: give exactly one of steps and epochs")
        if self.objective == "mpp" and self.loss != "softmax":
            raise ValueError("pretrain.loss must be softmax for the mpp objective")
        return self


class BenchmarkItem(Spec):
    """One downstream benchmark: its dataset, the protocol row of Table 4, and what to run on it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    dataset: DatasetSpec
    protocol: Protocol

    @field_validator("name")
    @classmethod
    def _no_parent_segments(cls, value: str) -> str:
        if ".." in value.split("/") or "//" in value:
            raise ValueError(f"benchmark name {value!r} may not contain '..' or empty '/' segments")
        return value

    finetune: bool = True
    fewshot: bool = True
    real: bool = Field(False, description="also report ImageNet ReaL (needs real_labels in the dataset)")


class FinetuneSpec(Spec):
    """Overrides of Table 4 for every benchmark (None keeps the protocol's value)."""

    image_size: int = Field(384, gt=0)
    batch_size: int = Field(512, gt=0)
    steps: int | None = Field(None, gt=0)
    lrs: list[float] | None = None
    warmup_steps: int | None = Field(None, ge=0)
    sweep: bool = True
    polyak: float | None = Field(None, gt=0, lt=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("lrs")
    @classmethod
    def _positive_lrs(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(lr <= 0 for lr in value)):
            raise ValueError("finetune.lrs must be a non-empty list of positive learning rates")
        return value


class FewshotSpec(Spec):
    enabled: bool = True
    shots: list[int] = Field(default_factory=lambda: [1, 5, 10, 25], min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    l2: float = Field(1024.0, gt=0)
    image_size: int | None = Field(None, gt=0, description="None: the pre-training (or init checkpoint's) resolution")

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, value: list[int]) -> list[int]:
        if any(k <= 0 for k in value):
            raise ValueError("fewshot.shots must be positive")
        return value


class TransferSpec(Spec):
    benchmarks: list[BenchmarkItem] = Field(default_factory=list)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    fewshot: FewshotSpec = Field(default_factory=FewshotSpec)
    from_scratch_baseline: bool = Field(False, description="also fine-tune a randomly initialised model")

    @model_validator(mode="after")
    def _unique_names(self) -> TransferSpec:
        names = [b.name for b in self.benchmarks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"transfer.benchmarks: duplicate names {dupes}")
        return self


class ComputeSpec(Spec):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous for nnodes > 1")
    accum_steps: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int = Field(0, ge=0)
    max_parallel: int = Field(1, ge=1, description="fine-tunes run at once (local dispatch)")
    threads_per_job: int | None = Field(None, ge=1)
    prefork: bool = Field(
        True,
        description="fork each single-process training stage from a server that has imported torch and the engine "
        "once (saves seconds per stage); false: a fresh `python -m vit.engine` per stage",
    )
    dispatch: Literal["local", "deployments"] = "local"
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
    enabled: bool = True
    num_images: int = Field(8, ge=1, le=64)


class BenchmarkSpec(Spec):
    """The whole protocol: prepare -> pre-train (or start from ``init``) -> transfer -> aggregate."""

    experiment: str = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    pretrain: PretrainSpec | None = None
    init: str | None = Field(None, description="start transfer from this checkpoint instead of pre-training")
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    artifact_root: str | None = Field(None, description="None: $VITFLOW_ARTIFACT_ROOT or $VITFLOW_HOME/artifacts")
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI or sqlite:///$VITFLOW_HOME/mlflow.db"
    )
    seed: int = Field(0, ge=0)

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
        per_step = self.compute.world_size * self.compute.accum_steps
        batches = {"transfer.finetune.batch_size": self.transfer.finetune.batch_size}
        if self.pretrain is not None:
            batches["pretrain.batch_size"] = self.pretrain.batch_size
        for name, batch in batches.items():
            if batch % per_step:
                errors.append(
                    f"{name} {batch} is not divisible by devices ({self.compute.world_size}) x "
                    f"compute.accum_steps ({self.compute.accum_steps})"
                )
        if self.pretrain is not None and self.pretrain.objective == "mpp" and cfg.is_hybrid:
            errors.append("pretrain.objective mpp needs a plain ViT, not a hybrid")
        if errors:
            raise ValueError("; ".join(errors))
        return self

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


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides (values parsed as YAML) to a spec dict; list items by index."""
    import yaml

    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        if isinstance(value, str) and not isinstance(overrides, dict):
            value = yaml.safe_load(value) if value != "" else ""
        node: Any = data
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise ValueError(f"override {key!r}: empty field name in the path")
        for depth, part in enumerate(parents):
            if isinstance(node, list):
                node = node[_index(part, key, len(node))]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, dict | list):
                where = ".".join(parents[: depth + 1])
                raise ValueError(f"override {key!r}: {where} is a value ({node!r}), not a section with fields")
        if isinstance(node, list):
            node[_index(leaf, key, len(node))] = value
        else:
            node[leaf] = value
    return data


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not path.to.field=value")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {item!r} has an empty path")
    return key.strip(), value


def _index(part: str, key: str, length: int) -> int:
    if not part.lstrip("-").isdigit() or not -length <= int(part) < length:
        raise ValueError(f"override {key!r}: {part!r} is not an index of a list of {length}")
    return int(part)
