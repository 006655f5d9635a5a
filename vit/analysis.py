"""The paper's analysis pictures (paper-facts §10) and the pipeline's plots.

Computations: mean attention distance per head and layer (Fig. 7 right, Fig. 11), attention rollout (Fig. 6, 14),
position-embedding similarity (Fig. 7 centre, Fig. 10), principal components of the RGB patch-embedding filters
(Fig. 7 left). Plots render with matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no global
state), return the PNG bytes and also write them to ``path`` when one is given.

Units: the plot functions take accuracies as fractions in [0, 1] (what ``vit.evaluate`` returns) and show
percent. Images are model inputs, (3, H, W) tensors in [-1, 1], or (H, W, 3) arrays, uint8 or float in [0, 1].
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import scipy.ndimage
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator
from PIL import Image

from vit.model import VisionTransformer

AttentionMaps = Sequence[torch.Tensor] | torch.Tensor  # per layer (B, heads, T, T), as model.attention_maps gives
ImageLike = torch.Tensor | np.ndarray
PathLike = str | Path

# --------------------------------------------------------------------------------------------------------------
# Computations


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


def _rgb01(image: ImageLike) -> np.ndarray:
    """Any supported image -> (H, W, 3) float64 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        rgb = ((image.detach().to("cpu", torch.float64) + 1) / 2).permute(1, 2, 0).numpy()
    else:
        rgb = np.asarray(image)
        rgb = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    if rgb.ndim == 2 or rgb.shape[-1] == 1:
        rgb = np.repeat(rgb.reshape(*rgb.shape[:2], 1), 3, axis=-1)
    return np.clip(rgb, 0.0, 1.0)


def _unit_range(x: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant array (no information) becomes ones."""
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)


def rollout_overlay(image: ImageLike, rollout_map: np.ndarray, blur: bool = True) -> np.ndarray:
    """The image dimmed by its rollout map, (H, W, 3) in [0, 1], as the maintainers drew Fig. 6 (I#27).

    The map is resized to the image with Lanczos, blurred (``blur``) with a Gaussian whose standard deviation is the
    patch size (image width / map width), min-max normalised and used as an alpha mask. The original first divides
    the map by its maximum; resizing and blurring are linear, so that cannot change the normalised mask.
    """
    rgb = _rgb01(image)
    rollout_map = np.asarray(rollout_map, dtype=np.float32)
    small = Image.fromarray(rollout_map)
    mask = np.asarray(small.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.LANCZOS), dtype=np.float64)
    if blur:
        mask = scipy.ndimage.gaussian_filter(mask, rgb.shape[1] / rollout_map.shape[1])
    return rgb * _unit_range(mask)[..., None]


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


# --------------------------------------------------------------------------------------------------------------
# Plots


def _png(fig: Figure, path: PathLike | None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def _mosaic(tiles: np.ndarray, ncols: int, fill: float) -> np.ndarray:
    """(n, h, w[, c]) tiles -> one image in rows of ``ncols``, tiles separated by a 1-pixel ``fill`` border."""
    n, h, w = tiles.shape[:3]
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1, *tiles.shape[3:]), fill, dtype=np.float64)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tile
    return out


def _tick_every(n: int) -> int:
    return 1 if n <= 12 else math.ceil(n / 8)


def plot_attention_distance(
    distances: np.ndarray,
    path: PathLike | None = None,
    title: str = "Mean attention distance per head",
    image_size: int | None = None,
) -> bytes:
    """Fig. 7 right: one dot per head at each depth; ``image_size`` (px) sets the y range to the image width."""
    distances = np.asarray(distances)
    layers, heads = distances.shape
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    palette = matplotlib.colormaps["tab10" if heads <= 10 else "tab20"]
    depth = np.arange(1, layers + 1)
    for h in range(heads):
        ax.scatter(depth, distances[:, h], s=22, color=palette(h % palette.N), label=f"Head {h + 1}", edgecolors="none")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_title(title)
    ax.xaxis.set_major_locator(FixedLocator(depth[:: _tick_every(layers)]))
    ax.set_ylim(0, image_size if image_size else max(1.0, float(distances.max()) * 1.08))
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return _png(fig, path)


def plot_rollout_overlays(
    images: Sequence[ImageLike],
    maps: np.ndarray,
    path: PathLike | None = None,
    title: str = "Attention rollout of the class token",
    blur: bool = True,
    per_row: int = 4,
) -> bytes:
    """Fig. 6: each image beside its rollout overlay, ``per_row`` pairs per row."""
    n = len(images)
    if n == 0 or n != len(maps):
        raise ValueError(f"need one map per image, got {n} images and {len(maps)} maps")
    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * 2 * cols, 2.8 * rows + 0.5), layout="constrained")
    fig.suptitle(title)
    for i, (image, rollout_map) in enumerate(zip(images, maps, strict=True)):
        r, c = divmod(i, cols)
        for j, (shown, label) in enumerate(
            [(_rgb01(image), "Input"), (rollout_overlay(image, rollout_map, blur), "Attention")]
        ):
            ax = fig.add_subplot(rows, 2 * cols, r * 2 * cols + 2 * c + j + 1)
            ax.imshow(shown)
            ax.set_title(f"{label} {i + 1}", fontsize="medium")
            ax.set_axis_off()
    return _png(fig, path)


def plot_position_similarity(
    similarity: np.ndarray,
    path: PathLike | None = None,
    title: str = "Position embedding similarity",
) -> bytes:
    """Fig. 7 centre: one tile per patch position showing its cosine similarity to every position."""
    similarity = np.asarray(similarity)
    gh, gw = similarity.shape[:2]
    mosaic = _mosaic(similarity.reshape(gh * gw, gh, gw), ncols=gw, fill=np.nan)
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    for axis, n, size in ((ax.xaxis, gw, gw), (ax.yaxis, gh, gh)):
        shown = np.arange(0, n, _tick_every(n))
        axis.set_major_locator(FixedLocator(shown * (size + 1) + (size - 1) / 2))
        axis.set_major_formatter(FixedFormatter([str(i + 1) for i in shown]))
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.85, label="Cosine similarity")
    return _png(fig, path)


def plot_embedding_filters(
    pca: FilterPCA,
    path: PathLike | None = None,
    title: str = "RGB embedding filters (first principal components)",
    ncols: int = 7,
) -> bytes:
    """Fig. 7 left: each principal component min-max scaled to an RGB image (the sign of a component is arbitrary)."""
    components = pca.components
    if components.shape[-1] != 3:
        raise ValueError(f"RGB filters needed, got {components.shape[-1]} input channels (a hybrid's 1x1 embedding?)")
    tiles = np.stack([_unit_range(c) for c in components])
    mosaic = _mosaic(tiles, ncols=min(ncols, len(tiles)), fill=1.0)
    rows = math.ceil(len(tiles) / ncols)
    fig = Figure(figsize=(1.1 * min(ncols, len(tiles)) + 0.6, 1.1 * rows + 0.9), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{title}\n{len(tiles)} components, {pca.explained_variance_ratio.sum():.0%} of the variance")
    return _png(fig, path)


_PANELS = ("loss", "learning rate", "accuracy", "other")


def _panel(metric: str) -> str:
    name = metric.lower().rsplit("/", 1)[-1]
    if "loss" in name:
        return "loss"
    if name in ("lr", "learning_rate") or name.endswith("_lr"):
        return "learning rate"
    if any(key in name for key in ("top1", "top5", "acc", "real")):
        return "accuracy"
    return "other"


def _small_multiples(n: int, ncols: int, width: float, height: float, title: str) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels in rows of at most ``ncols``."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), layout="constrained")
    fig.suptitle(title)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def _line_styles(variants: pd.Series) -> dict[str, dict[str, str]]:
    """The same colour and dash for a variant in every panel, in the order the variants first appear."""
    return {
        v: {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i % 4]}
        for i, v in enumerate(dict.fromkeys(variants))
    }


def plot_training_curves(curves: pd.DataFrame, path: PathLike | None = None, title: str = "Training curves") -> bytes:
    """Loss, learning rate and accuracy against step as small multiples: one panel per (group, kind of metric).

    ``curves`` is tidy: columns ``step``, ``metric`` (e.g. ``train/loss``, ``train/lr``, ``val/top1``), ``value``
    and ``stage`` (e.g. ``pretrain``, ``finetune:cifar10``). Optional ``group`` and ``variant`` columns put several
    stages in one panel, a line each (e.g. group ``cifar10``, variants ``pre-trained`` and ``from scratch``);
    without them every stage is its own group. Metrics that are none of the three go to an "other" panel.
    """
    missing = {"step", "metric", "value", "stage"} - set(curves.columns)
    if missing or curves.empty:
        raise ValueError(f"curves need rows and the columns step, metric, value, stage (missing {sorted(missing)})")
    curves = curves.assign(
        panel=curves["metric"].map(_panel),
        group=curves["group"] if "group" in curves.columns else curves["stage"],
        variant=curves["variant"] if "variant" in curves.columns else curves["metric"],
    )
    cells = [
        (group, panel)
        for group in dict.fromkeys(curves["group"])
        for panel in _PANELS
        if ((curves["group"] == group) & (curves["panel"] == panel)).any()
    ]
    style = _line_styles(curves["variant"])
    fig, axes = _small_multiples(len(cells), ncols=4, width=3.6, height=2.7, title=title)
    for ax, (group, panel) in zip(axes, cells, strict=True):
        rows = curves[(curves["group"] == group) & (curves["panel"] == panel)]
        variants = [v for v in style if (rows["variant"] == v).any()]
        for variant in variants:
            series = rows[rows["variant"] == variant].sort_values("step")
            ax.plot(series["step"], series["value"], label=str(variant), linewidth=1.4, **style[variant])
        ax.set_title(f"{group}: {panel}", fontsize="medium")
        ax.set_xlabel("Step")
        ax.set_ylabel(panel.capitalize())
        ax.grid(alpha=0.3)
        if len(variants) > 1:
            ax.legend(fontsize="small")
    return _png(fig, path)


def plot_lr_sweep(sweep: pd.DataFrame, path: PathLike | None = None, title: str = "Learning-rate sweep") -> bytes:
    """Validation accuracy against learning rate (log x), the best rate of each benchmark starred and labelled.

    ``sweep`` has columns ``lr`` and ``accuracy`` (in [0, 1]) and optionally ``benchmark`` (one line each).
    """
    sweep = sweep if "benchmark" in sweep.columns else sweep.assign(benchmark="validation")
    fig = Figure(figsize=(6.8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for benchmark, rows in sweep.groupby("benchmark", sort=True):
        rows = rows.groupby("lr", as_index=False)["accuracy"].mean().sort_values("lr")
        (line,) = ax.plot(rows["lr"], 100 * rows["accuracy"], marker="o", label=str(benchmark))
        best = rows.loc[rows["accuracy"].idxmax()]
        ax.scatter([best["lr"]], [100 * best["accuracy"]], marker="*", s=260, color=line.get_color(), zorder=3)
        ax.annotate(
            f"best lr={best['lr']:g}: {100 * best['accuracy']:.2f}%",
            (best["lr"], 100 * best["accuracy"]),
            textcoords="offset points",
            xytext=(0, 14),
            ha="center",
            fontsize="small",
            color=line.get_color(),
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": line.get_color(), "alpha": 0.9},
        )
    rates = np.sort(sweep["lr"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(rates))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{r:g}" for r in rates]))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.margins(x=0.12, y=0.18)
    ax.set_xlabel("Learning rate (log scale)")
    ax.set_ylabel("Validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig, path)


def plot_fewshot(results: pd.DataFrame, path: PathLike | None = None, title: str = "Few-shot linear accuracy") -> bytes:
    """Accuracy against shots per class (log x), mean ± std over seeds as error bars.

    ``results`` has columns dataset, shots, seed, accuracy (in [0, 1]). Without a ``variant`` column every dataset is
    a line of one panel; with one (e.g. ``pre-trained`` / ``from scratch``) every dataset gets its own panel with a
    line per variant, so the comparison is read off one panel at a time.
    """
    by_panel = "variant" in results.columns
    panels = list(dict.fromkeys(sorted(results["dataset"]))) if by_panel else [title]
    if by_panel:
        fig, axes = _small_multiples(len(panels), ncols=4, width=3.4, height=2.8, title=title)
    else:
        fig = Figure(figsize=(6.8, 4.6), layout="constrained")
        axes = [fig.add_subplot()]
    shots = np.sort(results["shots"].unique())
    style = _line_styles(results["variant"]) if by_panel else {}
    for ax, panel in zip(axes, panels, strict=True):
        rows = results[results["dataset"] == panel] if by_panel else results
        key = "variant" if by_panel else "dataset"
        for label, part in rows.groupby(key, sort=not by_panel):
            stats = part.groupby("shots")["accuracy"].agg(["mean", "std"]).fillna(0.0)
            ax.errorbar(
                stats.index,
                100 * stats["mean"],
                yerr=100 * stats["std"],
                marker="o",
                capsize=3,
                label=str(label),
                **style.get(label, {}),
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(shots))
        ax.xaxis.set_major_formatter(FixedFormatter([str(s) for s in shots]))
        ax.xaxis.set_minor_locator(FixedLocator([]))
        ax.set_xlabel("Shots per class (log scale)")
        ax.set_ylabel("Accuracy (%)")
        ax.set_title(panel, fontsize="medium" if by_panel else "large")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if not by_panel:
        axes[0].set_ylabel("Accuracy (%), mean ± std over seeds")
    return _png(fig, path)
