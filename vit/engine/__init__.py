"""Training and evaluation as the paper did them, from one CPU to many GPUs (see ``python -m vit.engine --help``)."""

from vit.engine.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from vit.engine.run import TrainOutcome, build_model, train
from vit.engine.trainer import NonFiniteLossError, Preempted, Trainer

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "Preempted",
    "TrainConfig",
    "TrainOutcome",
    "Trainer",
    "build_model",
    "train",
]
