"""The synthetic upstream set and VTAB-like suite: deterministic from a seed, grouped like VTAB, and structured
enough that pre-training on the upstream set improves few-shot transfer over random initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vit
from vit.data import SYNTHETIC_VTAB_TASKS, DataError, build_transform, open_dataset, prepare_dataset
from vit.data.synthetic import upstream_combinations


def test_suite_covers_the_three_vtab_groups():
    groups = {task.group for task in SYNTHETIC_VTAB_TASKS.values()}
    assert groups == {"natural", "specialized", "structured"}
    for name, task in SYNTHETIC_VTAB_TASKS.items():
        assert name.startswith(task.group) and task.num_classes >= 4


def test_generation_is_deterministic_from_the_seed(tmp_path):
    def manifest(seed: int, root: str):
        uri = prepare_dataset(
            "synthetic-upstream:classes=12,per_class=5,test_per_class=2",
            "up",
            str(tmp_path / root),
            seed=seed,
            progress=False,
        )
        ds = open_dataset(uri)
        return ds, ds.manifest().sort_values(["split", "key"])["sha256"].tolist()

    a, first = manifest(0, "a")
    b, again = manifest(0, "b")
    c, other = manifest(1, "c")
    assert first == again and a.fingerprint == b.fingerprint
    assert set(first).isdisjoint(other) and a.fingerprint != c.fingerprint
    assert a.num_classes == 12 and a.count("train") == 60 and a.count("test") == 24
    assert a.count("minival") == 12  # 1% as ImageNet: at least one per class
    assert a.info["synthetic"] == {"classes": 12, "per_class": 5, "test_per_class": 2, "size": 32}
    assert len(set(upstream_combinations(100))) == 100


def test_vtab_like_task_splits_and_group(tmp_path):
    uri = prepare_dataset("synthetic-vtab:structured_location,test=50,size=40", "loc", str(tmp_path), progress=False)
    ds = open_dataset(uri)
    assert ds.info["vtab_group"] == "structured" and ds.info["vtab_task"] == "structured_location"
    assert {s: ds.count(s) for s in ds.splits} == {"train800": 800, "val200": 200, "test": 50, "train800val200": 1000}
    assert set(ds.manifest("test")[["width", "height"]].itertuples(index=False)) == {(40, 40)}
    with pytest.raises(DataError, match="option size=4 is out of range"):
        prepare_dataset("synthetic-vtab:structured_location,size=4", "loc", str(tmp_path), progress=False)


def _ridge_predict(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int, l2: float) -> np.ndarray:
    """Closed-form regularised least squares to {-1, 1}^K targets on whitened features with a bias feature (paper
    §4.1, big_vision's fewshot_lsr)."""
    mean, std = train.mean(0), train.std(0) + 1e-5
    train, test = (train - mean) / std, (test - mean) / std
    train, test = (np.c_[x, np.full(len(x), 100.0)] for x in (train, test))
    targets = 2 * np.eye(classes)[labels] - 1
    w = np.linalg.solve(train.T @ train + l2 * np.eye(train.shape[1]), train.T @ targets)
    return (test @ w).argmax(1)


def test_pretraining_on_upstream_improves_few_shot_transfer(tmp_path):
    """Pre-train a small ViT (vit_micro_4 cut to 2 blocks, patch 8 at 32 px: 16 tokens, cheap on CPU) on 30
    upstream classes for a few hundred steps, then compare 10-shot linear transfer to every task of the suite
    against the same architecture at random initialisation."""
    torch.manual_seed(0)
    root = str(tmp_path)
    upstream = open_dataset(prepare_dataset("synthetic-upstream:classes=30,per_class=100", "up", root, progress=False))
    pretrained = vit.create_model("vit_micro_4", image_size=32, num_classes=30, patch_size=8, depth=2)
    random_init = vit.create_model("vit_micro_4", image_size=32, num_classes=30, patch_size=8, depth=2)
    steps, tf = 400, build_transform("eval", 32)
    images, labels = next(iter(upstream.loader("train", 10_000, tf, repeat=False)))[:2]  # decoded once: 3000 images
    optimizer = torch.optim.AdamW(pretrained.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(pretrained(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert loss.item() < 2.0  # ln(30) = 3.4 at chance

    accuracy: dict[str, tuple[float, float]] = {}
    for name, task in SYNTHETIC_VTAB_TASKS.items():
        options = {"max_train800": 10 * task.num_classes, "max_val200": 1}  # 10 shots per class (labels cycle)
        ds = open_dataset(prepare_dataset(f"synthetic-vtab:{name},test=150", name, root, progress=False, **options))
        train = next(iter(ds.loader("train800", 1000, tf, shuffle=False, repeat=False)))
        test = next(iter(ds.loader("test", 1000, tf, shuffle=False, repeat=False)))
        scores = []
        for model in (pretrained.eval(), random_init.eval()):
            with torch.no_grad():
                features = [model.forward_pre_logits(b.images).numpy() for b in (train, test)]
            predicted = _ridge_predict(features[0], train.labels.numpy(), features[1], task.num_classes, l2=10.0)
            scores.append(float((predicted == test.labels.numpy()).mean()))
        accuracy[name] = (scores[0], scores[1])
    pre, rand = np.array(list(accuracy.values())).T
    natural = [i for i, n in enumerate(accuracy) if n.startswith("natural")]
    assert pre.mean() > rand.mean() + 0.03, accuracy  # the suite as a whole (measured: +0.075)
    assert pre[natural].mean() > rand[natural].mean() + 0.05, accuracy  # object categories most (measured: +0.10)
