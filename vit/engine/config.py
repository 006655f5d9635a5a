"""The typed configuration of one training run — what ``python -m vit.engine CONFIG`` reads.

Plain dataclasses (vit/ stays free of pydantic and Prefect); the pipeline's pydantic specs build these.
Loaded from YAML or JSON, with ``key.sub=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

Objective = Literal["classification", "mpp"]
Loss = Literal["sigmoid", "softmax"]
OptimizerName = Literal["adam", "sgd"]
Decay = Literal["linear", "cosine", "step"]
WeightDecayMode = Literal["lr_relative", "schedule_only"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
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
    dataset: str = ""  # a prepared dataset URI (vit.data.prepare_dataset)
    train_split: str = "train"
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
    dir: str | None = None  # artifact URI; None disables checkpointing
    every_steps: int | None = None
    every_minutes: float | None = 30.0
    keep: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in ``dir`` if there is one


@dataclass
class TrainConfig:
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
        elif self.batch_size % (world_size * self.accum_steps):
            errors.append(
                f"batch_size {self.batch_size} is not divisible by devices ({world_size}) x accum_steps "
                f"({self.accum_steps})"
            )
        if (self.steps is None) == (self.epochs is None):
            errors.append("give exactly one of steps or epochs")
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
        if self.objective == "mpp" and self.loss != "softmax":
            errors.append("objective mpp predicts 512 colour classes with softmax; set loss=softmax")
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
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """``optim.lr=0.01`` -> data["optim"]["lr"] = 0.01 (the value parsed as YAML: numbers, bools, null, lists)."""
    import yaml

    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    node = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(prefix + u for u in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hint, value, prefix + name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} may not be null")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
