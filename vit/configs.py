"""The model variants of the paper and their architecture configs, without torch: what specs, plans and reports
need to name, validate and describe a model (``vit.model`` builds them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

Pooling = Literal["token", "gap"]
GeluApproximate = Literal["tanh", "none"]


@dataclass(frozen=True)
class ViTConfig:
    """Everything that determines a model's architecture (and therefore its state-dict shapes)."""

    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pooling: Pooling = "token"
    gelu_approximate: GeluApproximate = "tanh"
    head_bias_init: float = 0.0
    # Hybrid: ResNet stage depths before the transformer (empty = plain ViT). ``patch_size`` then applies
    # to the ResNet feature map (1 for the paper's hybrids).
    resnet_layers: tuple[int, ...] = ()
    resnet_width: int = 1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pooling not in ("token", "gap"):
            raise ValueError(f"pooling must be 'token' or 'gap', got {self.pooling!r}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    @property
    def is_hybrid(self) -> bool:
        return bool(self.resnet_layers)

    @property
    def total_stride(self) -> int:
        """Pixels per token along one side: the patch size, times the ResNet's downsampling for hybrids."""
        if not self.is_hybrid:
            return self.patch_size
        return 4 * 2 ** (len(self.resnet_layers) - 1) * self.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(token_grid(self, self.image_size))  # type: ignore[return-value]

    @property
    def num_features(self) -> int:
        return self.representation_size or self.hidden_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        return _from_dict(cls, d, "resnet_layers")


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` -> ``(224, 224)``, refusing non-positive sizes."""
    hw = (int(size), int(size)) if isinstance(size, int | float) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"image size must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def token_grid(cfg: ViTConfig, image_size: int | Sequence[int]) -> tuple[int, int]:
    """Token grid for an image size: VALID patching (leftover pixels dropped); hybrids downsample with SAME."""
    h, w = as_hw(image_size)
    if cfg.is_hybrid:
        for _ in range(2 + len(cfg.resnet_layers) - 1):  # root conv, max-pool, one per later stage
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h < cfg.patch_size or w < cfg.patch_size:
        raise ValueError(
            f"image size {as_hw(image_size)} is smaller than one patch ({cfg.total_stride} px per token side)"
        )
    return h // cfg.patch_size, w // cfg.patch_size


@dataclass(frozen=True)
class BiTConfig:
    """A BiT ResNet-v2 (Kolesnikov et al., ECCV 2020): pre-activation bottlenecks, GroupNorm(32) and
    weight-standardised convolutions; the paper's ResNet baseline (``vit.bit`` builds it).

    Stage ``i`` has bottleneck width ``base_width · width_factor · 2^i`` and 4x that many output channels.
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width_factor: int = 1
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    head_bias_init: float = 0.0
    base_width: int = 64  # 64 in every BiT; smaller only for the CPU demo model
    arch: Literal["bit"] = "bit"

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"layers must be positive stage depths, got {self.layers}")
        if self.width_factor < 1 or (self.base_width * self.width_factor) % 32:
            raise ValueError("base_width x width_factor must be a positive multiple of 32 (GroupNorm's 32 groups)")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    is_hybrid = False

    @property
    def total_stride(self) -> int:
        """1: a ResNet has no patch grid, global average pooling takes any resolution."""
        return 1

    @property
    def num_features(self) -> int:
        return 4 * self.base_width * self.width_factor * 2 ** (len(self.layers) - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "image_size": list(self.image_size), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> BiTConfig:
        return _from_dict(cls, d, "layers")


def _from_dict(cls: type, d: dict, layers_field: str):
    """A config from its ``to_dict()`` (JSON lists back to tuples), refusing unknown fields."""
    unknown = set(d) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    d = dict(d)
    if "image_size" in d:
        d["image_size"] = as_hw(d["image_size"])
    if layers_field in d:
        d[layers_field] = tuple(d[layers_field])
    return cls(**d)


ArchConfig = ViTConfig | BiTConfig


def config_from_dict(d: dict) -> ArchConfig:
    """The config a ``to_dict()`` was made from: BiT's carry ``arch: "bit"``, ViT's carry no ``arch``."""
    return BiTConfig.from_dict(d) if d.get("arch") == "bit" else ViTConfig.from_dict(d)


@dataclass(frozen=True)
class ModelSpec:
    config: ArchConfig
    paper_name: str
    aliases: tuple[str, ...] = field(default=())


def _vit(patch: int, width: int, depth: int, heads: int, mlp: int, **kw) -> ViTConfig:
    return ViTConfig(patch_size=patch, hidden_size=width, depth=depth, num_heads=heads, mlp_dim=mlp, **kw)


# Fine-tuning configs of vision_transformer/vit_jax/configs/models.py (paper-facts §1.2); the dropout defaults are
# the current official ones (0.1 for L/16, H/14 and the R50 hybrids).
_REGISTRY: dict[str, ModelSpec] = {
    "vit_ti_16": ModelSpec(_vit(16, 192, 12, 3, 768), "ViT-Ti/16"),
    "vit_s_16": ModelSpec(_vit(16, 384, 12, 6, 1536), "ViT-S/16"),
    "vit_s_32": ModelSpec(_vit(32, 384, 12, 6, 1536), "ViT-S/32"),
    "vit_b_16": ModelSpec(_vit(16, 768, 12, 12, 3072), "ViT-B/16"),
    "vit_b_32": ModelSpec(_vit(32, 768, 12, 12, 3072), "ViT-B/32"),
    "vit_b_8": ModelSpec(_vit(8, 768, 12, 12, 3072), "ViT-B/8"),
    "vit_l_16": ModelSpec(_vit(16, 1024, 24, 16, 4096, dropout=0.1), "ViT-L/16"),
    "vit_l_32": ModelSpec(_vit(32, 1024, 24, 16, 4096), "ViT-L/32"),
    "vit_h_14": ModelSpec(_vit(14, 1280, 32, 16, 5120, dropout=0.1), "ViT-H/14"),
    "r50_vit_b_16": ModelSpec(_vit(1, 768, 12, 12, 3072, dropout=0.1, resnet_layers=(3, 4, 9)), "R50+ViT-B/16"),
    "r50_vit_l_32": ModelSpec(_vit(1, 1024, 24, 16, 4096, dropout=0.1, resnet_layers=(3, 4, 6, 3)), "R50+ViT-L/32"),
    # BiT baselines (Kolesnikov et al. 2020, big_transfer): the paper's ResNet comparators (Table 2: BiT-L R152x4).
    # The aliases are the paper's table names (Table 2's BiT-L, Table 6's ResNets), so its numbers find ours.
    "bit_r50x1": ModelSpec(BiTConfig((3, 4, 6, 3), 1), "BiT-R50x1", ("ResNet50x1",)),
    "bit_r50x3": ModelSpec(BiTConfig((3, 4, 6, 3), 3), "BiT-R50x3", ("ResNet50x3",)),
    "bit_r101x1": ModelSpec(BiTConfig((3, 4, 23, 3), 1), "BiT-R101x1", ("ResNet101x1",)),
    "bit_r101x3": ModelSpec(BiTConfig((3, 4, 23, 3), 3), "BiT-R101x3", ("ResNet101x3",)),
    "bit_r152x2": ModelSpec(BiTConfig((3, 8, 36, 3), 2), "BiT-R152x2", ("ResNet152x2",)),
    "bit_r152x4": ModelSpec(BiTConfig((3, 8, 36, 3), 4), "BiT-R152x4", ("ResNet152x4", "BiT-L (ResNet152x4)")),
    # Tiny models for CPU demos and tests (not in the paper).
    "vit_micro_4": ModelSpec(_vit(4, 64, 4, 4, 128), "ViT-micro/4"),
    "vit_mini_8": ModelSpec(_vit(8, 128, 6, 4, 256), "ViT-mini/8"),
    "bit_micro": ModelSpec(BiTConfig((3, 3, 1), 1, base_width=32), "BiT-micro"),  # ViT-micro/4's FLOPs at 32 px
}

_SMALL = ("vit_micro", "vit_mini", "bit_micro")
PAPER_VARIANTS = tuple(n for n in _REGISTRY if not n.startswith(_SMALL + ("bit_",)))  # the ViTs
BIT_VARIANTS = tuple(n for n in _REGISTRY if n.startswith("bit_") and not n.startswith(_SMALL))


def _normalise(name: str) -> str:
    return name.strip().lower().replace("+", "_").replace("-", "_").replace("/", "_")


_ALIASES: dict[str, str] = {}
for _key, _spec in _REGISTRY.items():
    _ALIASES[_normalise(_spec.paper_name)] = _key
    _ALIASES[_normalise(_spec.paper_name.replace("/", "_"))] = _key  # "ViT-B_16", the official file names
    _ALIASES[_key] = _key
    _ALIASES.update((_normalise(alias), _key) for alias in _spec.aliases)


def resolve_model_name(name: str) -> str:
    """Canonical registry key for a name or alias ("ViT-B/16", "R50+ViT-B/16", "ViT-B_16", "vit_b_16")."""
    key = _ALIASES.get(_normalise(name))
    if key is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return key


def list_models(include_small: bool = True) -> list[str]:
    """Registry keys. ``include_small=False`` lists only the paper's variants (its ViTs and BiT baselines)."""
    return list(_REGISTRY) if include_small else list(PAPER_VARIANTS + BIT_VARIANTS)


def is_bit(name: str) -> bool:
    """Whether a registered name is a BiT ResNet rather than a ViT."""
    return isinstance(_REGISTRY[resolve_model_name(name)].config, BiTConfig)


def model_config(name: str, **overrides) -> ArchConfig:
    cfg = _REGISTRY[resolve_model_name(name)].config
    if "image_size" in overrides:
        overrides["image_size"] = as_hw(overrides["image_size"])
    try:
        return replace(cfg, **overrides)
    except TypeError as e:
        raise ValueError(f"bad model option for {name!r}: {e}") from None


def paper_name(name: str) -> str:
    return _REGISTRY[resolve_model_name(name)].paper_name
