"""Vision Transformer (Dosovitskiy et al., ICLR 2021), faithful to the official JAX code.

One readable file in the style of timm's ``vision_transformer.py``. Numerics follow the official
implementation (paper-facts §2): LayerNorm eps 1e-6, tanh-approximated GELU by default, zero class token,
position embeddings that include the class token, dropout after the position add and after every dense layer
except q/k/v, and the official initialisers (xavier-uniform attention and MLP kernels, lecun-normal patch and
pre-logits kernels, zero head).

Inputs are NCHW images in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from vit.bit import ResNetV2

from vit.configs import BiTConfig, GeluApproximate, ViTConfig, as_hw, is_bit, model_config, token_grid
from vit.hybrid import ResNetStem, resnet_macs
from vit.init import lecun_normal_

# --------------------------------------------------------------------------------------------------------------
# Modules


class PatchEmbed(nn.Module):
    """Conv patch embedding with VALID padding; optionally on top of a ResNet feature map (hybrid).

    The kernel is stored as the official conv (``proj``, (D, C, p, p)), but because the stride equals the kernel
    size the conv is one matrix product: the image is cut into (B, N, C·p·p) patch rows (one copy of the input)
    and multiplied by the flattened kernel. On CPU that is faster than oneDNN's strided convolution, and its
    backward is one GEMM for the kernel's gradient; the output comes out (B, N, D) contiguous, as the blocks want.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.backbone: nn.Module | None = None
        in_chans = cfg.in_chans
        if cfg.is_hybrid:
            self.backbone = ResNetStem(cfg.resnet_layers, cfg.resnet_width, cfg.in_chans)
            in_chans = self.backbone.out_channels
        self.proj = nn.Conv2d(in_chans, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)
        b, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        gh, gw = h // p, w // p  # VALID: leftover rows and columns are dropped
        patches = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, gh * gw, c * p * p)  # (B, N, C·p·p), raster order, (c, y, x) within a patch
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention`` (flash / mem-efficient on GPU).

    q, k and v are one fused ``qkv`` projection (equivalent to the official separate Dense layers, and faster).
    Its (B, N, 3, H, hd) output is split along the ``3`` axis and each part viewed as (B, H, N, hd) without a
    copy; the attention output and the gradients of q, k and v then keep that token-major layout, so the merge
    of the heads is a view and the backward writes the qkv gradient in one pass (the usual head-major permute
    costs an extra full copy of it per block).
    """

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        for chunk in self.qkv.weight.data.view(3, dim, dim):  # xavier on each (D, D) kernel, as Flax does
            nn.init.xavier_uniform_(chunk)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2))
        weights = None
        if return_weights:  # explicit softmax, for analysis only
            weights = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
            out = F.dropout(weights, self.attention_dropout, self.training) @ v
        else:
            dropout_p = self.attention_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out)), weights


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, dropout: float, gelu_approximate: GeluApproximate):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop2 = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.attention_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_dim, cfg.dropout, cfg.gelu_approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attn(self.norm1(x), return_weights=True)
        x = x + out
        return x + self.mlp(self.norm2(x)), weights  # type: ignore[return-value]


class PreLogits(nn.Module):
    """The pre-training head's hidden layer: Dense + tanh (paper §3.1, App. D.3)."""

    def __init__(self, dim: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)
        lecun_normal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size)) if cfg.pooling == "token" else None
        num_tokens = math.prod(cfg.grid_size) + (1 if cfg.pooling == "token" else 0)
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, cfg.hidden_size).normal_(std=0.02))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.pre_logits: nn.Module = (
            PreLogits(cfg.hidden_size, cfg.representation_size) if cfg.representation_size else nn.Identity()
        )
        self.head = self._new_head(cfg.num_classes, cfg.num_features, cfg.head_bias_init)

    # -- construction helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _new_head(num_classes: int, in_features: int, bias_init: float = 0.0) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(in_features, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.constant_(head.bias, bias_init)
        return head

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def reset_classifier(self, num_classes: int, head_bias_init: float = 0.0) -> None:
        """Drop the pre-logits layer and attach a new zero-initialised head (paper §3.2, App. B.1.1)."""
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.pre_logits = nn.Identity()
        self.head = self._new_head(num_classes, self.cfg.hidden_size, head_bias_init).to(device, dtype)
        self.cfg = replace(self.cfg, num_classes=num_classes, representation_size=None, head_bias_init=head_bias_init)

    def set_image_size(self, image_size: int | Sequence[int]) -> None:
        """Change the input resolution, resampling the position embeddings as the official code does."""
        new_grid = token_grid(self.cfg, image_size)
        if new_grid != self.grid_size:
            with torch.no_grad():
                resized = resample_pos_embed(self.pos_embed.data, self.grid_size, new_grid, self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
        self.cfg = replace(self.cfg, image_size=as_hw(image_size))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass: less activation memory for ~30% more compute."""
        self.grad_checkpointing = enable

    # -- forward ------------------------------------------------------------------------------------------------

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch embeddings (B, N, D), before class token and position embeddings."""
        expected = tuple(self.cfg.image_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} px but the model is set to {expected}; call set_image_size first"
            )
        return self.patch_embed(x)

    def _prepare_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            patches = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.pos_drop(patches + self.pos_embed)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, N, D) -> normalised tokens (B, prefix + N, D)."""
        x = self._prepare_tokens(patches)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_patches(x))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.cfg.pooling == "token" else tokens.mean(dim=1)

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits features (B, num_features): the representation few-shot evaluation uses. Not called
        ``forward_features``: timm's method of that name returns the tokens, which here is :meth:`forward_tokens`."""
        return self.pre_logits(self.pool(self.forward_tokens(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_pre_logits(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention weights of every layer, each (B, heads, T, T), T = prefix + N tokens."""
        tokens = self._prepare_tokens(self.embed_patches(x))
        maps = []
        for block in self.blocks:
            tokens, weights = block.forward_with_weights(tokens)
            maps.append(weights)
        return maps


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resize (1, prefix + gh*gw, D) position embeddings to a new grid as the official code does.

    The class-token entry is kept; the grid is interpolated bilinearly with ``align_corners=True``, which equals
    ``scipy.ndimage.zoom(order=1)`` used by vision_transformer and big_vision (paper-facts §2.6).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    gh, gw = old_grid
    if grid.shape[1] != gh * gw:
        raise ValueError(f"position embedding has {grid.shape[1]} grid entries, expected {gh}x{gw}={gh * gw}")
    dim = grid.shape[-1]
    work_dtype = torch.float32 if pos_embed.dtype in (torch.float16, torch.bfloat16) else pos_embed.dtype
    grid = grid.reshape(1, gh, gw, dim).permute(0, 3, 1, 2).to(work_dtype)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Registry


def create_model(
    name: str,
    num_classes: int = 1000,
    image_size: int | Sequence[int] = 224,
    representation_size: int | None = None,
    dropout: float | None = None,
    gelu_approximate: GeluApproximate = "tanh",
    **overrides,
) -> VisionTransformer | ResNetV2:
    """Build a registered variant. ``dropout=None`` keeps the variant's official default."""
    if dropout is not None:
        overrides["dropout"] = dropout
    if is_bit(name):
        from vit.bit import create_bit

        return create_bit(name, num_classes, image_size, representation_size=representation_size, **overrides)
    cfg = model_config(
        name,
        num_classes=num_classes,
        image_size=image_size,
        representation_size=representation_size,
        gelu_approximate=gelu_approximate,
        **overrides,
    )
    token_grid(cfg, cfg.image_size)  # validates the size against the patch before allocating anything
    return VisionTransformer(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: ViTConfig, training: bool = True) -> float:
    """Model FLOPs per image (2 per multiply-add) of the transformer and patch embedding.

    Training counts forward + backward as 3x forward (the convention MFU uses). The hybrid ResNet stem is
    included approximately through its convolutions.
    """
    if isinstance(cfg, BiTConfig):
        from vit.bit import bit_flops_per_image

        return bit_flops_per_image(cfg, training)
    gh, gw = cfg.grid_size
    n = gh * gw + (1 if cfg.pooling == "token" else 0)
    d, m = cfg.hidden_size, cfg.mlp_dim
    per_layer = n * (4 * d * d + 2 * d * m) + 2 * n * n * d  # qkv+proj, MLP, QK^T and AV (MACs)
    patch_in = cfg.in_chans * cfg.patch_size**2
    macs = cfg.depth * per_layer + gh * gw * patch_in * d + cfg.num_features * max(cfg.num_classes, 0)
    if cfg.is_hybrid:
        macs += resnet_macs(cfg)
    fwd = 2.0 * macs
    return 3.0 * fwd if training else fwd
