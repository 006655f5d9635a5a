"""Training and evaluation as the paper did them, from one CPU to many GPUs (see ``python -m vit.engine --help``).

The names below are imported on first use, as in ``vit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vit import lazy_export

if TYPE_CHECKING:
    from vit.engine.config import CheckpointConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from vit.engine.run import TrainOutcome, build_model, train
    from vit.engine.trainer import NonFiniteLossError, Preempted, Trainer

_EXPORTS = {
    **dict.fromkeys(
        ["CheckpointConfig", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig"], "vit.engine.config"
    ),
    **dict.fromkeys(["TrainOutcome", "build_model", "train"], "vit.engine.run"),
    **dict.fromkeys(["NonFiniteLossError", "Preempted", "Trainer"], "vit.engine.trainer"),
}
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


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
