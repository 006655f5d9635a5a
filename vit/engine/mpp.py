"""Masked patch prediction, the paper's self-supervised pre-training objective (§4.6, App. B.1.2; paper-facts §11).

50% of the patch embeddings are corrupted — replaced by a learnable [mask] embedding (80%), by a random other
patch embedding (10%), or kept unchanged (10%) — and the model predicts the 3-bit mean colour (512 classes) of
each corrupted patch from that patch's output token. The paper does not describe the prediction head
(UNCONFIRMED); here it is one linear layer, zero-initialised like the classification head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit.model import VisionTransformer


def mean_colour_targets(images: torch.Tensor, patch: int, bits: int = 3) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, N) class ids of each patch's mean colour quantised to ``bits`` per channel."""
    gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
    mean = F.avg_pool2d(images[..., : gh * patch, : gw * patch].float(), patch)  # (B, 3, gh, gw)
    levels = 2**bits
    q = ((mean + 1) / 2 * levels).floor().clamp(0, levels - 1).long()
    ids = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    return ids.flatten(1)


class MaskedPatchPrediction(nn.Module):
    def __init__(
        self,
        model: VisionTransformer,
        corruption_rate: float = 0.5,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        bits: int = 3,
    ):
        super().__init__()
        if model.cfg.is_hybrid:
            raise ValueError("masked patch prediction needs a plain ViT (patch colours are undefined for hybrids)")
        self.model = model
        self.corruption_rate = corruption_rate
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.bits = bits
        dim = model.cfg.hidden_size
        self.mask_token = nn.Parameter(torch.empty(1, 1, dim).normal_(std=0.02))
        self.head = nn.Linear(dim, 2 ** (3 * bits))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits of the corrupted patches (M, 512), their colour targets (M,))."""
        patches = self.model.embed_patches(images)
        b, n, d = patches.shape
        num_corrupt = max(1, round(self.corruption_rate * n))
        order = torch.rand(b, n, device=patches.device).argsort(dim=1)
        corrupt = torch.zeros(b, n, dtype=torch.bool, device=patches.device)
        corrupt.scatter_(1, order[:, :num_corrupt], True)
        kind = torch.rand(b, n, device=patches.device)
        use_mask = corrupt & (kind < self.mask_fraction)
        use_random = corrupt & (kind >= self.mask_fraction) & (kind < self.mask_fraction + self.random_fraction)
        donors = patches.reshape(b * n, d)[torch.randint(b * n, (b, n), device=patches.device)]
        x = torch.where(use_mask[..., None], self.mask_token.to(patches.dtype).expand(b, n, d), patches)
        x = torch.where(use_random[..., None], donors, x)
        tokens = self.model.encode(x)[:, self.model.num_prefix_tokens :]
        logits = self.head(tokens[corrupt])
        targets = mean_colour_targets(images, self.model.cfg.patch_size, self.bits)[corrupt]
        return logits, targets


def mpp_loss(module: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the corrupted patches' colour classes (image labels are unused)."""
    logits, targets = module(images)
    return F.cross_entropy(logits.float(), targets)
