"""vit: the science of vitflow in pure PyTorch — models, checkpoints, data, engine, evaluation, analysis."""

from vit.checkpoints import load_pretrained
from vit.model import (
    VisionTransformer,
    ViTConfig,
    count_parameters,
    create_model,
    list_models,
    model_config,
    resolve_model_name,
)

__version__ = "0.1.0"

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_config",
    "resolve_model_name",
]
