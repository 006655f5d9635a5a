"""Analysis pictures on hand-made attention and embeddings with known answers, and every plot as a real PNG."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks import plots as P
from tests.helpers import images, randomize_
from vit import analysis as A
from vit.model import create_model


def _maps(kind: str, grid=(3, 4), batch=2, heads=3, layers=2, prefix=1) -> list[torch.Tensor]:
    t = prefix + grid[0] * grid[1]
    if kind == "identity":
        a = torch.eye(t, dtype=torch.float64)
    elif kind == "uniform":
        a = torch.full((t, t), 1.0 / t, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return [a.expand(batch, heads, t, t).clone() for _ in range(layers)]


def _brute_force_mean_distance(grid, patch):
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    return np.mean([math.dist(p, q) * patch for p in cells for q in cells])


def test_identity_attention_has_zero_distance():
    d = A.mean_attention_distance(_maps("identity"), (3, 4), patch_size=16)
    assert d.shape == (2, 3)
    assert np.all(d == 0)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_uniform_attention_distance_is_the_mean_pairwise_distance(grid):
    expected = _brute_force_mean_distance(grid, patch=16)
    d = A.mean_attention_distance(_maps("uniform", grid), grid, patch_size=16)
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    # Without renormalisation the class token's weight 1/T counts at distance 0.
    n = grid[0] * grid[1]
    raw = A.mean_attention_distance(_maps("uniform", grid), grid, patch_size=16, renormalize=False)
    np.testing.assert_allclose(raw, expected * n / (n + 1), rtol=1e-12)


def test_attention_to_one_patch_measures_distance_from_it():
    grid, t = (3, 4), 13
    a = torch.zeros(1, 2, t, t)
    a[:, 0] = torch.eye(t)
    a[:, 1, :, 1 + 4 + 2] = 1.0  # head 1: every query attends to the patch at row 1, column 2 (raster order)
    d = A.mean_attention_distance([a], grid, patch_size=14)
    cells = itertools.product(range(3), range(4))
    assert d[0, 0] == 0
    assert d[0, 1] == pytest.approx(np.mean([math.dist(c, (1, 2)) * 14 for c in cells]))


def test_model_attention_distance_batches_exactly():
    model = randomize_(create_model("vit_micro_4", num_classes=10, image_size=32), std=0.2).eval()
    x = images(5, 32)
    batched = A.model_attention_distance(model, x, batch_size=2)
    whole = A.mean_attention_distance(model.attention_maps(x), model.grid_size, 4)
    assert batched.shape == (4, 4)
    np.testing.assert_allclose(batched, whole, rtol=1e-12)
    assert np.all((batched > 0) & (batched < 32 * math.sqrt(2)))


def test_rollout_of_identity_attention_is_identity():
    r = A.attention_rollout(_maps("identity", layers=3), (3, 4))
    assert r.shape == (2, 3, 4)
    assert np.all(r == 0)  # the class token only ever attends to itself: equal (zero) weight on every patch


@pytest.mark.parametrize("layers", [1, 3])
def test_rollout_of_uniform_attention_is_uniform(layers):
    t = 13
    r = A.attention_rollout(_maps("uniform", layers=layers), (3, 4))
    # (0.5·U + 0.5·I)^L = 0.5^L·I + (1 − 0.5^L)·U for the idempotent U = 1/T.
    np.testing.assert_allclose(r, (1 - 0.5**layers) / t, rtol=1e-12)
    raw = A.attention_rollout(_maps("uniform", layers=layers), (3, 4), renormalize=False)
    np.testing.assert_allclose(raw, r * 2**layers, rtol=1e-12)


def test_rollout_multiplies_head_averaged_residual_matrices():
    model = randomize_(create_model("vit_micro_4", num_classes=10, image_size=32), std=0.2).eval()
    maps = model.attention_maps(images(2, 32))
    joint = np.eye(65)
    for a in maps:
        augmented = a.double().mean(1).numpy() + np.eye(65)
        joint = (augmented / augmented.sum(-1, keepdims=True)) @ joint
    np.testing.assert_allclose(A.attention_rollout(maps, (8, 8)), joint[:, 0, 1:].reshape(2, 8, 8), rtol=1e-10)


def test_rollout_overlay_keeps_the_attended_region():
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    hot = np.zeros((4, 4))
    hot[1, 2] = 1.0
    overlay = A.rollout_overlay(image, hot)
    assert overlay.shape == (32, 32, 3)
    assert overlay.min() >= 0 and overlay.max() <= 200 / 255 + 1e-9
    brightest = np.unravel_index(overlay[..., 0].argmax(), (32, 32))
    assert brightest[0] // 8 == 1 and brightest[1] // 8 == 2
    unchanged = A.rollout_overlay(torch.zeros(3, 32, 32), np.ones((4, 4)))  # no information: the image as it is
    np.testing.assert_allclose(unchanged, 0.5)


def test_position_embedding_similarity_has_unit_diagonal():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 12, 16)
    pos[0, 1 + 5] = 3 * pos[0, 1 + 0]  # the patch at (1, 1) points the same way as the one at (0, 0)
    sim = A.position_embedding_similarity(pos, (3, 4))
    assert sim.shape == (3, 4, 3, 4)
    flat = sim.reshape(12, 12)
    np.testing.assert_allclose(np.diag(flat), 1.0, rtol=1e-12)
    np.testing.assert_allclose(flat, flat.T, rtol=1e-12)
    assert sim[0, 0, 1, 1] == pytest.approx(1.0)
    assert np.all(np.abs(flat) <= 1 + 1e-12)


@pytest.mark.parametrize("center", [True, False])
def test_filter_pca_reconstructs_the_filters(center):
    weight = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pca = A.embedding_filter_pca(weight, k=28, center=center)
    assert pca.components.shape == (20, 4, 4, 3)  # k is capped by the rank
    flat = weight.permute(0, 2, 3, 1).reshape(20, -1).double().numpy()
    basis = pca.components.reshape(20, -1)
    np.testing.assert_allclose(basis @ basis.T, np.eye(20), atol=1e-10)
    scores = (flat - pca.mean.reshape(-1)) @ basis.T
    np.testing.assert_allclose(scores @ basis + pca.mean.reshape(-1), flat, atol=1e-10)
    assert np.all(np.diff(pca.explained_variance_ratio) <= 1e-12)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.any(pca.mean != 0) == center


def test_filter_pca_finds_the_one_direction_filters_vary_along():
    direction = torch.zeros(3, 2, 2)
    direction[0, 1, 0] = 1.0  # red channel, row 1, column 0
    weight = torch.arange(1.0, 9.0)[:, None, None, None] * direction + 0.25
    pca = A.embedding_filter_pca(weight, k=3)
    assert pca.explained_variance_ratio[0] == pytest.approx(1.0)
    assert abs(pca.components[0, 1, 0, 0]) == pytest.approx(1.0)  # channel-last image: [row, column, channel]


def _assert_png(data: bytes, path) -> None:
    assert path.read_bytes() == data
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 300 and image.height > 200
    pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    colors = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert len(colors) > 50  # drawn content, not a blank canvas


def test_every_plot_writes_a_readable_png(tmp_path):
    rng = np.random.default_rng(0)
    model = randomize_(create_model("vit_micro_4", num_classes=10, image_size=32), std=0.2).eval()
    x = images(3, 32)
    maps = model.attention_maps(x)
    curves = pd.DataFrame(
        [
            {"step": s, "metric": m, "value": v, "stage": stage}
            for stage in ("pretrain", "finetune:cifar10")
            for s in range(0, 100, 10)
            for m, v in (("train/loss", 2 / (1 + s)), ("train/lr", 1e-3 * min(1, s / 20)), ("val/top1", s / 100))
        ]
    )
    sweep = pd.DataFrame({"lr": [0.001, 0.003, 0.01, 0.03], "accuracy": [0.91, 0.95, 0.94, 0.90]})
    fewshot = pd.DataFrame(
        [
            {"dataset": d, "shots": k, "seed": s, "accuracy": 0.2 + 0.1 * np.log(k) + rng.normal(0, 0.01)}
            for d in ("cifar100", "oxford_iiit_pet")
            for k in (1, 5, 10, 25)
            for s in range(3)
        ]
    )
    plots = {
        "distance": lambda p: P.plot_attention_distance(A.mean_attention_distance(maps, (8, 8), 4), p, image_size=32),
        "rollout": lambda p: P.plot_rollout_overlays(x, A.attention_rollout(maps, (8, 8)), p),
        "posemb": lambda p: P.plot_position_similarity(A.position_embedding_similarity(model.pos_embed, (8, 8)), p),
        "filters": lambda p: P.plot_embedding_filters(A.embedding_filter_pca(model.patch_embed.proj.weight), p),
        "curves": lambda p: P.plot_training_curves(curves, p),
        "sweep": lambda p: P.plot_lr_sweep(sweep, p),
        "fewshot": lambda p: P.plot_fewshot(fewshot, p),
        # small multiples: pre-trained and from-scratch runs of one benchmark share a panel
        "curves-grouped": lambda p: P.plot_training_curves(
            curves.assign(group="cifar10", variant=curves["stage"].map({"pretrain": "a", "finetune:cifar10": "b"})), p
        ),
        "fewshot-variants": lambda p: P.plot_fewshot(fewshot.assign(variant=fewshot["seed"].map(str)), p),
    }
    for name, plot in plots.items():
        path = tmp_path / "plots" / f"{name}.png"
        _assert_png(plot(path), path)
