"""vit: the science of vitflow in pure PyTorch — models, checkpoints, data, engine, evaluation, analysis.

The names below are imported on first use (PEP 562), so ``import vit.data.sources`` or a command's ``--help``
does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vit.bit import ResNetV2
    from vit.checkpoints import load_pretrained
    from vit.configs import BiTConfig, ViTConfig, list_models, model_config, resolve_model_name
    from vit.model import VisionTransformer, count_parameters, create_model

__version__ = "0.1.0"

_EXPORTS = {
    "load_pretrained": "vit.checkpoints",
    "ResNetV2": "vit.bit",
    **dict.fromkeys(["BiTConfig", "ViTConfig", "list_models", "model_config", "resolve_model_name"], "vit.configs"),
    **dict.fromkeys(["VisionTransformer", "count_parameters", "create_model"], "vit.model"),
}
__all__ = [
    "BiTConfig",
    "ResNetV2",
    "ViTConfig",
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_config",
    "resolve_model_name",
]


def lazy_export(package: str, exports: dict[str, str], name: str) -> Any:
    """A package ``__getattr__``: ``name`` from where ``exports`` says, ``"module"`` (the same name there) or
    ``"module:attribute"``."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module, _, attribute = exports[name].partition(":")
    return getattr(importlib.import_module(module), attribute or name)


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _EXPORTS, name)
