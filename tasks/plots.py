"""The pipeline's plots: the paper's analysis pictures (computed by ``vit.analysis``) and the run's curves.

Plots render with matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, no global state), return
the PNG bytes and also write them to ``path`` when one is given. They take accuracies as fractions in [0, 1] (what
``vit.metrics`` returns) and show percent.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator

from vit.analysis import FilterPCA, ImageLike, rgb01, rollout_overlay, unit_range

PathLike = str | Path


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
            [(rgb01(image), "Input"), (rollout_overlay(image, rollout_map, blur), "Attention")]
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
    tiles = np.stack([unit_range(c) for c in components])
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


SCALING_AXES = {
    "upstream_images": "Pre-training images (log scale)",
    "pretrain_exaflops": "Pre-training compute, exaFLOPs (log scale)",
}


def _log_axis(ax: Axes, values: pd.Series) -> None:
    """A log x axis spanning at least a decade around ``values``, ticks at 1, 2 and 5 of each decade."""
    from matplotlib.ticker import LogLocator, NullFormatter

    low, high = float(values.min()), float(values.max())
    centre, half = math.sqrt(low * high), max(1.5 * math.sqrt(high / low), math.sqrt(10))
    ax.set_xscale("log")
    ax.set_xlim(centre / half, centre * half)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_scaling(
    table: pd.DataFrame,
    x: str,
    setting: str,
    panels: str = "both",
    series: str = "model",
    path: PathLike | None = None,
    title: str = "",
) -> bytes:
    """Accuracy against pre-training set size or compute (log x): the paper's Fig. 4 and 5.

    ``table`` is the scaling study's table (columns model, upstream_images, pretrain_exaflops, benchmark, setting,
    top1 in percent; benchmark ``mean`` is the mean over benchmarks). ``x``: upstream_images or
    pretrain_exaflops; ``series``: a line per ``model`` (Fig. 4), or per ``upstream_images`` joining the models
    trained on the same data in order of their compute (Fig. 5); ``panels``: average (the ``mean`` panel), each
    (a panel per benchmark) or both.
    """
    if x not in SCALING_AXES:
        raise ValueError(f"x must be one of {', '.join(SCALING_AXES)}, got {x!r}")
    rows = table[table["setting"] == setting]
    if rows.empty:
        raise ValueError(f"no results of the setting {setting!r} to plot")
    rows = rows.assign(line=rows[series].map(lambda v: f"{v:,} images" if series == "upstream_images" else str(v)))
    each = sorted(b for b in set(rows["benchmark"]) if b != "mean")
    average = ["mean"] if "mean" in set(rows["benchmark"]) else []
    shown = {"average": average or each, "each": each, "both": average + each}[panels]
    style = _line_styles(rows["line"])
    fig, axes = _small_multiples(len(shown), ncols=4, width=3.6, height=2.9, title=title or f"{setting} top-1")
    for ax, bench in zip(axes, shown, strict=True):
        for line, part in rows[rows["benchmark"] == bench].groupby("line", sort=False):
            part = part.sort_values(x)
            ax.plot(part[x], part["top1"], marker="o", label=line, **style[line])
            if series != "model":
                for px, py, model in zip(part[x], part["top1"], part["model"], strict=True):
                    ax.annotate(model, (px, py), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        _log_axis(ax, rows[x])
        ax.set_title("mean over benchmarks" if bench == "mean" else bench, fontsize="medium")
        ax.set_xlabel(SCALING_AXES[x])
        ax.set_ylabel(f"{setting} top-1 (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    return _png(fig, path)
