"""The paper's analysis computations (paper-facts §10); ``tasks.plots`` draws them.

Mean attention distance per head and layer (Fig. 7 right, Fig. 11), attention rollout (Fig. 6, 14),
position-embedding similarity (Fig. 7 centre, Fig. 10), principal components of the RGB patch-embedding filters
(Fig. 7 left). Images are model inputs, (3, H, W) tensors in [-1, 1], or (H, W, 3) arrays, uint8 or float in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
from PIL import Image

from vit.model import VisionTransformer

AttentionMaps = Sequence[torch.Tensor] | torch.Tensor  # per layer (B, heads, T, T), as model.attention_maps gives
ImageLike = torch.Tensor | np.ndarray


def _layers(attention_maps: AttentionMaps) -> Iterator[torch.Tensor]:
    """Each layer's (B, heads, T, T) weights in float64 on the CPU, converted one layer at a time (memory)."""
    if len(attention_maps) == 0:
        raise ValueError("no attention maps given")
    for a in attention_maps:
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention maps must be (B, heads, T, T) per layer, got {tuple(a.shape)}")
        yield torch.as_tensor(a).detach().to("cpu", torch.float64)


def _check_tokens(num_tokens: int, grid_size: Sequence[int], num_prefix_tokens: int) -> None:
    if num_tokens != num_prefix_tokens + math.prod(grid_size):
        raise ValueError(f"{num_tokens} tokens do not match {num_prefix_tokens} prefix + grid {tuple(grid_size)}")


def grid_distances(grid_size: Sequence[int], pixels_per_token: float) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the raster-ordered token positions of a (gh, gw) grid."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(torch.float64)
    return torch.cdist(positions, positions) * pixels_per_token


def mean_attention_distance(
    attention_maps: AttentionMaps,
    grid_size: Sequence[int],
    patch_size: float,
    num_prefix_tokens: int = 1,
    renormalize: bool = True,
) -> np.ndarray:
    """Mean attention distance in pixels, (layers, heads) (paper App. D.7, maintainer's method in I#162).

    For each query patch: the attention-weighted average of the Euclidean distance, on the token grid, between
    the query's and each key's position, times ``patch_size`` (pixels per token; ``cfg.total_stride`` for
    hybrids); then averaged over queries and images.

    The class-token handling is UNCONFIRMED in the paper. The class token has no grid position, so it is never a
    query here. As a key, ``renormalize=True`` (default) drops its weight and rescales each query's patch weights
    to sum to one, i.e. the distance of the attention *among patches*; ``renormalize=False`` keeps the patch
    weights as they are, which counts the weight on the class token at distance zero.
    """
    distances = grid_distances(grid_size, patch_size)
    per_layer = []
    for a in _layers(attention_maps):
        _check_tokens(a.shape[-1], grid_size, num_prefix_tokens)
        patches = a[:, :, num_prefix_tokens:, num_prefix_tokens:]
        per_query = torch.einsum("bhqk,qk->bhq", patches, distances)
        if renormalize:
            per_query = per_query / patches.sum(-1)
        per_layer.append(per_query.mean(dim=(0, 2)))
    return torch.stack(per_layer).numpy()


@torch.no_grad()
def model_attention_distance(
    model: VisionTransformer, images: torch.Tensor, batch_size: int = 16, renormalize: bool = True
) -> np.ndarray:
    """``mean_attention_distance`` of a model over many images (the paper uses 128), batched to bound memory."""
    total, count = None, 0
    for batch in images.split(batch_size):
        maps = model.attention_maps(batch.to(model.pos_embed.device, model.pos_embed.dtype))
        d = mean_attention_distance(
            maps, model.grid_size, model.cfg.total_stride, model.num_prefix_tokens, renormalize=renormalize
        )
        total = d * len(batch) if total is None else total + d * len(batch)
        count += len(batch)
    if total is None:
        raise ValueError("no images given")
    return total / count


def attention_rollout(
    attention_maps: AttentionMaps,
    grid_size: Sequence[int],
    num_prefix_tokens: int = 1,
    renormalize: bool = True,
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) of the class token over the patches, (B, gh, gw) (paper App. D.8).

    Per layer the heads are averaged and the identity is added for the residual connection (I#18); the layers'
    matrices are multiplied from the first layer up, and the class-token row over the patch tokens is the map.

    ``renormalize`` (UNCONFIRMED for ViT; Abnar & Zuidema's code does it) divides each row of ``A + I`` by its sum,
    giving ``0.5·A + 0.5·I`` for softmax rows; ``False`` keeps ``A + I``. Softmax rows sum to one, so the two differ
    by the factor 2**layers only, and maps normalised by their maximum for display are identical.
    """
    if num_prefix_tokens < 1:
        raise ValueError("attention rollout follows the class token; this model has none (pooling='gap')")
    rollout = None
    for a in _layers(attention_maps):
        _check_tokens(a.shape[-1], grid_size, num_prefix_tokens)
        augmented = a.mean(1) + torch.eye(a.shape[-1], dtype=a.dtype)
        if renormalize:
            augmented = augmented / augmented.sum(-1, keepdim=True)
        rollout = augmented if rollout is None else augmented @ rollout
    return rollout[:, 0, num_prefix_tokens:].reshape(-1, *grid_size).numpy()


def rgb01(image: ImageLike) -> np.ndarray:
    """Any supported image -> (H, W, 3) float64 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        rgb = ((image.detach().to("cpu", torch.float64) + 1) / 2).permute(1, 2, 0).numpy()
    else:
        rgb = np.asarray(image)
        rgb = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    if rgb.ndim == 2 or rgb.shape[-1] == 1:
        rgb = np.repeat(rgb.reshape(*rgb.shape[:2], 1), 3, axis=-1)
    return np.clip(rgb, 0.0, 1.0)


def unit_range(x: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant array (no information) becomes ones."""
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def rollout_overlay(image: ImageLike, rollout_map: np.ndarray, blur: bool = True) -> np.ndarray:
    """The image dimmed by its rollout map, (H, W, 3) in [0, 1], as the maintainers drew Fig. 6 (I#27).

    The map is resized to the image with Lanczos, blurred (``blur``) with a Gaussian whose standard deviation is the
    patch size (image width / map width), min-max normalised and used as an alpha mask. The original first divides
    the map by its maximum; resizing and blurring are linear, so that cannot change the normalised mask.
    """
    rgb = rgb01(image)
    rollout_map = np.asarray(rollout_map, dtype=np.float32)
    small = Image.fromarray(rollout_map)
    mask = np.asarray(small.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.LANCZOS), dtype=np.float64)
    if blur:
        mask = scipy.ndimage.gaussian_filter(mask, rgb.shape[1] / rollout_map.shape[1])
    return rgb * unit_range(mask)[..., None]


def position_embedding_similarity(
    pos_embed: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int = 1
) -> np.ndarray:
    """Cosine similarity of every patch's position embedding with every other's, (gh, gw, gh, gw) (Fig. 7 centre).

    ``[r, c]`` is the tile of the patch at row r, column c: its similarity to all positions of the grid.
    """
    pos = torch.as_tensor(pos_embed).detach().to("cpu", torch.float64)
    pos = pos.reshape(-1, pos.shape[-1])
    _check_tokens(len(pos), grid_size, num_prefix_tokens)
    unit = torch.nn.functional.normalize(pos[num_prefix_tokens:], dim=-1)
    return (unit @ unit.T).reshape(*grid_size, *grid_size).numpy()


@dataclass(frozen=True)
class FilterPCA:
    """Principal components of the patch-embedding filters, channel-last images."""

    components: np.ndarray  # (k, P, P, C): unit-norm principal directions, largest variance first
    explained_variance_ratio: np.ndarray  # (k,): share of the total (centred or not) second moment
    mean: np.ndarray  # (P, P, C): the mean filter removed before the PCA (zeros when not centred)


def embedding_filter_pca(weight: torch.Tensor, k: int = 28, center: bool = True) -> FilterPCA:
    """PCA of the (D, C, P, P) patch-embedding filters as D samples of C·P·P values (Fig. 7 left shows 28).

    Whether the paper centred the filters is UNCONFIRMED; ``center=True`` (default) is the textbook PCA, removing
    the mean filter first; ``center=False`` takes the singular vectors of the raw filters.
    """
    w = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    if w.ndim != 4:
        raise ValueError(f"expected a (D, C, P, P) conv weight, got shape {tuple(w.shape)}")
    d, c, ph, pw = w.shape
    flat = w.permute(0, 2, 3, 1).reshape(d, -1).numpy()
    mean = flat.mean(0) if center else np.zeros(flat.shape[1])
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    k = min(k, len(s))
    variance = s**2
    return FilterPCA(
        components=vt[:k].reshape(k, ph, pw, c),
        explained_variance_ratio=variance[:k] / variance.sum(),
        mean=mean.reshape(ph, pw, c),
    )
