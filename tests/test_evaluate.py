"""Evaluation metrics: few-shot ridge against a direct solve, sampling, meters with masks and ranks, VTAB means."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vit import vtab
from vit.metrics import (
    ClassificationMeter,
    RealMeter,
    few_shot_indices,
    fewshot_evaluate,
    fewshot_ridge,
    real_accuracy,
)
from vit.vtab import vtab_summary


def _direct_ridge_predictions(x, y, tx, k, l2, form):
    """big_vision's fewshot_lsr written out with np.linalg.solve (paper-facts §7)."""
    mean, std = x.mean(0), x.std(0) + 1e-5

    def prep(a):
        return np.hstack([(a - mean) / std, np.full((len(a), 1), 100.0)])

    xw = prep(x)
    targets = 2.0 * np.eye(k)[y] - 1.0
    if form == "primal":
        w = np.linalg.solve(xw.T @ xw + l2 * np.eye(xw.shape[1]), xw.T @ targets)
    else:
        w = xw.T @ np.linalg.solve(xw @ xw.T + l2 * np.eye(len(xw)), targets)
    return (prep(tx) @ w).argmax(1)


def _blobs(n_per_class, k, d, spread, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = np.repeat(np.arange(k), n_per_class)
    return centers[y] + rng.normal(size=(len(y), d)) * spread, y


@pytest.mark.parametrize(
    ("n_per_class", "dim", "l2"),
    [(20, 8, 1.0), (20, 8, 1024.0), (3, 40, 1.0), (3, 40, 1024.0)],  # N >= D and N < D (D counts the bias)
)
def test_fewshot_ridge_equals_direct_solve(n_per_class, dim, l2):
    x, y = _blobs(n_per_class, 4, dim, spread=4.0, seed=1)
    tx, ty = _blobs(25, 4, dim, spread=4.0, seed=2)
    form = "primal" if len(x) >= dim + 1 else "dual"
    expected = _direct_ridge_predictions(x, y, tx, 4, l2, form)
    other = "dual" if form == "primal" else "primal"  # both closed forms are the same ridge solution
    assert np.array_equal(expected, _direct_ridge_predictions(x, y, tx, 4, l2, other))
    accuracy = fewshot_ridge(x, y, tx, ty, l2=l2)
    assert accuracy == np.mean(expected == ty)
    assert 0.0 < accuracy < 1.0  # a non-trivial problem: errors exist, so agreement is informative


def test_fewshot_ridge_separable_data_is_perfect_and_accepts_tensors():
    x, y = _blobs(5, 10, 16, spread=0.01, seed=3)
    tx, ty = _blobs(7, 10, 16, spread=0.01, seed=3)
    assert fewshot_ridge(x, y, tx, ty) == 1.0
    assert fewshot_ridge(torch.from_numpy(x).float(), torch.from_numpy(y), torch.from_numpy(tx), ty) == 1.0


def test_fewshot_ridge_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        fewshot_ridge(np.zeros((4, 3)), np.arange(4), np.zeros((2, 5)), np.arange(2))


def _big_vision_indices(labels, shots, seed, num_classes):
    rng = np.random.default_rng(seed)
    class_indices = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return np.concatenate([idx[:shots] for idx in class_indices])


def test_few_shot_indices_match_big_vision_sampling():
    labels = np.random.default_rng(0).integers(0, 6, size=200)
    labels[labels == 4] = 5  # class 4 absent
    labels[np.flatnonzero(labels == 2)[3:]] = 3  # class 2 has only 3 samples
    for shots, seed in [(1, 0), (5, 1), (10, 2)]:
        picked = few_shot_indices(labels, shots, seed)
        assert np.array_equal(picked, _big_vision_indices(labels, shots, seed, num_classes=6))
        counts = np.bincount(labels[picked], minlength=6)
        available = np.bincount(labels, minlength=6)
        assert counts.tolist() == np.minimum(available, shots).tolist()
    assert np.array_equal(few_shot_indices(labels, 5, 7), few_shot_indices(labels, 5, 7))
    assert not np.array_equal(few_shot_indices(labels, 5, 7), few_shot_indices(labels, 5, 8))


def test_fewshot_evaluate_reuses_features_for_every_shot_and_seed():
    x, y = _blobs(12, 5, 6, spread=3.0, seed=4)
    tx, ty = _blobs(10, 5, 6, spread=3.0, seed=5)
    frame = fewshot_evaluate(x, y, tx, ty, shots=(1, 5), seeds=(0, 1))
    assert list(frame.columns) == ["shots", "seed", "accuracy"]
    assert frame[["shots", "seed"]].values.tolist() == [[1, 0], [1, 1], [5, 0], [5, 1]]
    for row in frame.itertuples():
        idx = few_shot_indices(y, row.shots, row.seed)
        assert row.accuracy == fewshot_ridge(x[idx], y[idx], tx, ty, num_classes=5)


def test_classification_meter_counts_padded_batches_exactly():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 2])
    preds = torch.tensor([0, 2, 2, 2, 1, 1, 0, 0, 1, 2])
    meter = ClassificationMeter(num_classes=4)
    for start in range(0, 10, 4):  # batches of 4; the last one is padded with 2 garbage samples and masked
        batch_preds, batch_labels = preds[start : start + 4], labels[start : start + 4]
        pad = 4 - len(batch_labels)
        logits = torch.nn.functional.one_hot(torch.cat([batch_preds, torch.full((pad,), 3)]), 4).float()
        mask = torch.arange(4) < len(batch_labels)
        meter.update(logits, torch.cat([batch_labels, torch.full((pad,), -1)]), mask)
    assert meter.count == 10 and meter.correct == 7
    assert meter.top1 == 0.7
    per_class = meter.per_class_accuracy()
    np.testing.assert_allclose(per_class[:3], [2 / 3, 2 / 3, 3 / 4])
    assert math.isnan(per_class[3])  # no samples of class 3


def test_classification_meter_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        ClassificationMeter(3).update(torch.tensor([0, 1]), torch.tensor([0, 5]))


def test_real_accuracy_excludes_images_without_real_labels():
    preds = [3, 1, 0, 2, 4]
    real = [[3, 7], [], [1], [2], [4]]  # image 1 has an empty ReaL set; image 4 is padding
    mask = [True, True, True, True, False]
    assert real_accuracy(torch.tensor(preds), real, mask) == (2, 3)
    multi_hot = np.zeros((5, 8), dtype=np.int64)
    for i, labels in enumerate(real):
        multi_hot[i, labels] = 1
    assert real_accuracy(torch.tensor(preds), multi_hot, mask) == (2, 3)
    meter = RealMeter()
    meter.update(torch.nn.functional.one_hot(torch.tensor(preds[:3]), 8).float(), real[:3])
    meter.update(torch.tensor(preds[3:]), real[3:], mask[3:])
    assert (meter.correct, meter.count, meter.top1) == (2, 3, 2 / 3)


_RANK_DATA = {  # per rank: predictions, labels, mask (rank 1's last sample is padding), ReaL sets
    0: ([0, 1, 1, 2], [0, 1, 2, 2], [1, 1, 1, 1], [[0], [1, 2], [], [2]]),
    1: ([2, 0, 1, 1], [2, 0, 0, 2], [1, 1, 1, 0], [[2], [1], [0, 1], [1]]),
}


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        preds, labels, mask, real = _RANK_DATA[rank]
        meter, real_meter = ClassificationMeter(3), RealMeter()
        meter.update(torch.tensor(preds), torch.tensor(labels), torch.tensor(mask))
        real_meter.update(torch.tensor(preds), real, torch.tensor(mask))
        meter.all_reduce()
        real_meter.all_reduce()
        result = {
            "count": meter.count,
            "correct": meter.correct,
            "per_class": meter.per_class_accuracy().tolist(),
            "real": [real_meter.correct, real_meter.count],
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_sums_exact_counts_over_two_gloo_ranks(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    local, local_real = ClassificationMeter(3), RealMeter()  # the same samples seen by one process
    for preds, labels, mask, real in _RANK_DATA.values():
        local.update(torch.tensor(preds), torch.tensor(labels), torch.tensor(mask))
        local_real.update(torch.tensor(preds), real, torch.tensor(mask))
    expected = {
        "count": 7,
        "correct": 5,
        "per_class": local.per_class_accuracy().tolist(),
        "real": [5, 6],
    }
    assert (local.count, local.correct, [local_real.correct, local_real.count]) == (7, 5, [5, 6])
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


_TABLE9 = {  # paper Table 9 rows (paper-facts §8), the 19 tasks in the table's column order
    "ViT-H/14 (JFT)": "95.3 85.5 75.2 99.7 97.2 65.0 88.9 83.3 96.7 91.4 76.6 91.7 63.8 53.1 79.4 63.3 84.5 33.2 51.2",
    "ViT-L/16 (JFT)": "95.4 81.9 74.3 99.7 96.7 63.5 87.4 83.6 96.5 89.7 77.1 86.4 63.1 49.7 74.5 60.5 82.2 36.2 51.1",
    "ViT-L/16 (I21k)": "90.8 84.1 74.1 99.3 92.7 61.0 80.9 82.5 95.6 85.2 75.3 70.3 56.1 41.9 74.7 64.9 79.9 30.5 41.7",
}
_TABLE9_MEANS = {  # DERIVED in paper-facts §8: natural, specialized, structured, 19-task mean
    "ViT-H/14 (JFT)": (86.69, 87.00, 65.03, 77.63),
    "ViT-L/16 (JFT)": (85.56, 86.72, 62.96, 76.29),
    "ViT-L/16 (I21k)": (83.27, 84.65, 57.50, 72.71),
}


@pytest.mark.parametrize("naming", ["canonical", "paper", "aliases"])
@pytest.mark.parametrize("row", sorted(_TABLE9))
def test_vtab_summary_reproduces_table9_group_means(row, naming):
    names = {
        "canonical": [t.name for t in vtab.TASKS],
        "paper": [t.paper_name for t in vtab.TASKS],
        "aliases": [(t.folder_aliases or (t.name,))[0] for t in vtab.TASKS],  # cifar100, oxford_pet, ...
    }[naming]
    summary = vtab_summary(dict(zip(names, map(float, _TABLE9[row].split()), strict=True)))
    got = tuple(round(summary[k], 2) for k in ("natural", "specialized", "structured", "mean"))
    assert got == _TABLE9_MEANS[row]
    assert summary["missing"] == []


def test_vtab_summary_reports_missing_tasks_and_means_over_present_ones():
    values = dict(zip((t.name for t in vtab.TASKS), map(float, _TABLE9["ViT-H/14 (JFT)"].split()), strict=True))
    del values["svhn"], values["patch_camelyon"], values["eurosat"], values["resisc45"], values["diabetic_retinopathy"]
    summary = vtab_summary(values)
    assert summary["missing"] == ["svhn", "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"]
    assert summary["natural"] == pytest.approx((95.3 + 85.5 + 75.2 + 99.7 + 97.2 + 65.0) / 6)
    assert math.isnan(summary["specialized"])
    assert summary["mean"] == pytest.approx(np.mean(list(values.values())))


def test_vtab_summary_rejects_unknown_and_duplicate_tasks():
    with pytest.raises(ValueError, match="unknown VTAB-1k task"):
        vtab_summary({"imagenet": 80.0})
    with pytest.raises(ValueError, match="given twice"):
        vtab_summary({"cifar": 80.0, "cifar100": 81.0})
