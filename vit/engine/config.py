"""The typed configuration of one training run — what ``python -m vit.engine CONFIG`` reads.

Plain dataclasses (vit/ stays free of Prefect and MLflow), validated by pydantic when read; the pipeline's specs
build these. Loaded from YAML or JSON, with ``key.sub=value`` overrides (``vit.overrides``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

Objective = Literal["classification", "mpp"]
Loss = Literal["sigmoid", "softmax"]
OptimizerName = Literal["adam", "sgd"]
Decay = Literal["linear", "cosine", "step"]
WeightDecayMode = Literal["lr_relative", "schedule_only"]
Precision = Literal["fp32", "bf16", "fp16"]
STRICT_FIELDS = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored


# The rules a training run's settings obey, written once: TrainConfig.validate and the pipeline's specs use them.


def length_error(steps: int | None, epochs: float | None) -> str | None:
    return "give exactly one of steps and epochs" if (steps is None) == (epochs is None) else None


def batch_error(batch_size: int, world_size: int, accum_steps: int, accum_name: str = "accum_steps") -> str | None:
    """The global batch is split over devices and accumulation steps evenly."""
    if batch_size % (world_size * accum_steps):
        return f"{batch_size} is not divisible by devices ({world_size}) x {accum_name} ({accum_steps})"
    return None


def objective_error(objective: str, loss: str) -> str | None:
    if objective == "mpp" and loss != "softmax":
        return "objective mpp predicts 512 colour classes with softmax; set loss=softmax"
    return None


@dataclass
class ModelConfig:
    __pydantic_config__ = STRICT_FIELDS

    name: str = "vit_micro_4"
    image_size: int = 32
    num_classes: int | None = None  # None: the dataset's class count
    representation_size: int | None = None  # the pre-training tanh pre-logits layer (paper §3.1)
    dropout: float | None = None  # None: the variant's official default
    gelu_approximate: Literal["tanh", "none"] = "tanh"
    head_bias_init: float | None = None  # None: -10 for sigmoid pre-training (paper-facts §2.5), else 0
    pooling: Literal["token", "gap"] = "token"
    init: str | None = None  # checkpoint to start from (any file vit.load_pretrained reads)
    reset_head: bool = True  # with init: replace the head by a zero-initialised one (paper §3.2)
    overrides: dict[str, Any] = field(default_factory=dict)  # other ViTConfig fields, e.g. {"depth": 2}


@dataclass
class DataConfig:
    __pydantic_config__ = STRICT_FIELDS

    dataset: str = ""  # a prepared dataset URI (vit.data.prepare_dataset)
    train_split: str = "train"
    train_subset: int | None = None  # train on this many samples of train_split (vit.data.dataset.nested_subset)
    subset_seed: int = 0  # the permutation train_subset cuts: one seed, nested subsets
    eval_split: str | None = None
    train_transform: Literal["pretrain", "finetune", "eval", "vtab"] = "pretrain"
    eval_transform: Literal["pretrain", "finetune", "eval", "vtab"] = "eval"
    # tf: tf.image.resize's float bilinear without antialiasing, as the official pipelines (vit.data.transforms)
    resize: Literal["tf", "antialias"] = "tf"
    num_workers: int = 0
    shuffle_buffer: int | None = None  # samples in the loader's shuffle buffer; None: vit.data's SHUFFLE_BUFFER
    # cpu: the loader workers decode and augment; cuda: they only read, and each batch is decoded on the GPU
    # (batched nvJPEG) and augmented there, with the same crops and flips
    decode_device: Literal["cpu", "cuda"] = "cpu"


@dataclass
class OptimConfig:
    __pydantic_config__ = STRICT_FIELDS

    name: OptimizerName = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    # lr_relative: p -= lr * wd * p (flax.optim.Adam / torch AdamW, the ViT-paper era optimiser; the default).
    # schedule_only: p -= wd * schedule(t) * p (big_vision's decoupled decay, not multiplied by the base lr).
    weight_decay_mode: WeightDecayMode = "lr_relative"
    weight_decay_on: Literal["all", "kernels"] = "all"
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    decay: Decay = "linear"
    linear_end: float = 1e-5
    step_decay_at: tuple[float, float, float] = (0.3, 0.6, 0.9)  # decay "step": x0.1 at these fractions (BiT)


@dataclass
class CheckpointConfig:
    __pydantic_config__ = STRICT_FIELDS

    dir: str | None = None  # artifact URI; None disables checkpointing
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in ``dir`` if there is one


@dataclass
class TrainConfig:
    __pydantic_config__ = STRICT_FIELDS

    objective: Objective = "classification"
    loss: Loss = "softmax"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # MixUp (BiT-HyperRule: 0.1): one Beta(alpha, alpha) mix per batch; 0 = off
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    batch_size: int = 64  # global batch: devices x micro-batch x accum_steps
    accum_steps: int = 1
    steps: int | None = None
    epochs: float | None = None  # alternative to steps: converted with the training split's size
    precision: Precision = "fp32"
    compile: bool = False
    grad_checkpointing: bool = False
    polyak: float | None = None  # Polyak averaging factor, e.g. 0.9999 (paper §4.1, Table 2)
    eval_every: int | None = None
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto: cuda when available (rank's local device), else cpu
    peak_flops: float | None = None  # per device, for MFU; None: measured GEMM throughput on CPU, table on GPU

    def validate(self, world_size: int = 1) -> None:
        """Refuse inconsistent settings before any work, naming the field."""
        errors = []
        if self.batch_size <= 0:
            errors.append(f"batch_size must be > 0, got {self.batch_size}")
        if self.accum_steps <= 0:
            errors.append(f"accum_steps must be > 0, got {self.accum_steps}")
        elif error := batch_error(self.batch_size, world_size, self.accum_steps):
            errors.append(f"batch_size {error}")
        if error := length_error(self.steps, self.epochs):
            errors.append(error)
        if self.steps is not None and self.steps <= 0:
            errors.append(f"steps must be > 0, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            errors.append(f"epochs must be > 0, got {self.epochs}")
        if self.optim.lr <= 0:
            errors.append(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.optim.warmup_steps < 0:
            errors.append(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if not self.data.dataset:
            errors.append("data.dataset is required (a prepared dataset URI)")
        if self.polyak is not None and not 0.0 < self.polyak < 1.0:
            errors.append(f"polyak must be in (0, 1), got {self.polyak}")
        if self.mixup_alpha < 0:
            errors.append(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            errors.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if error := objective_error(self.objective, self.loss):
            errors.append(error)
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    @property
    def head_bias(self) -> float:
        if self.model.head_bias_init is not None:
            return self.model.head_bias_init
        return -10.0 if self.loss == "sigmoid" and self.model.init is None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        try:
            return TypeAdapter(cls).validate_python(data)
        except ValidationError as e:
            raise ValueError(_explain(e)) from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        from vit.overrides import apply_overrides

        return cls.from_dict(apply_overrides(data, overrides))


def _explain(error: ValidationError) -> str:
    """pydantic's errors in the config's own words: the dotted field, what it must be."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"unknown config field {where}")
        elif e["type"] == "literal_error":
            lines.append(f"{where} must be one of {e['ctx']['expected']}, got {e['input']!r}")
        else:
            lines.append(f"{where}: {e['msg']}, got {e['input']!r}")
    return "; ".join(lines)
