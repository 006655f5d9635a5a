"""Evaluation metrics: few-shot linear ridge, top-1 and ImageNet ReaL meters (VTAB-1k aggregation lives in
``vit.vtab``).

Accuracies here are fractions in [0, 1]. Meters count exactly (integers), accept padded-and-masked batches so no
evaluation sample is dropped (paper-facts §5.2 caveat), and sum their counts across ``torch.distributed`` ranks with
``all_reduce``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse
import torch
import torch.distributed as dist

ArrayLike = np.ndarray | torch.Tensor

BIAS_FEATURE = 100.0  # big_vision's constant bias feature: large, so the bias is almost unregularised (§7.4)
_TEST_CHUNK = 8192  # test rows scored at a time, bounding the (rows x classes) float64 score matrix


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fewshot_ridge(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    l2: float = 1024.0,
    num_classes: int | None = None,
) -> float:
    """Accuracy of a closed-form ridge regression from frozen features to {-1, 1}^K targets (paper-facts §7).

    big_vision's ``fewshot_lsr`` step by step: whiten with the mean and (population) std + 1e-5 of the selected
    train features, append a constant bias feature 100.0, regress ``2 * onehot - 1`` with L2 strength ``l2``
    (fixed 2**10 in the released evaluator), predict the argmax. The primal form ``(XᵀX + λI)⁻¹Xᵀy`` is solved when
    N >= D, the dual ``Xᵀ(XXᵀ + λI)⁻¹y`` when N < D (D counts the bias feature).

    Computed in float64 with numpy/scipy on the host (tensors are copied there): numpy forms ``XᵀX`` with a
    symmetric rank-k update (half a matrix product), the system is solved as positive definite, and ``Xᵀy`` comes
    from per-class feature sums, so 1,000 classes cost no more than 10.
    """
    x, y = _numpy(train_x), _numpy(train_y).astype(np.int64).reshape(-1)
    tx, ty = _numpy(test_x), _numpy(test_y).astype(np.int64).reshape(-1)
    if x.ndim != 2 or tx.ndim != 2 or x.shape[1] != tx.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {x.shape} and {tx.shape}")
    if len(x) != len(y) or len(tx) != len(ty):
        raise ValueError("features and labels differ in length")
    k = num_classes if num_classes is not None else int(max(y.max(), ty.max())) + 1
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64) + 1e-5

    def whiten(features: np.ndarray) -> np.ndarray:  # into one float64 buffer with the bias column, no temporaries
        out = np.empty((len(features), features.shape[1] + 1))
        np.subtract(features, mean, out=out[:, :-1])
        out[:, :-1] /= std
        out[:, -1] = BIAS_FEATURE
        return out

    x = whiten(x)
    n, d = x.shape
    onehot = scipy.sparse.csr_matrix((np.ones(n), (y, np.arange(n))), shape=(k, n))  # (K, N)
    if n >= d:
        xty = 2 * (onehot @ x).T - x.sum(0)[:, None]  # Xᵀ(2·onehot − 1), (D, K)
        w = scipy.linalg.solve(x.T @ x + l2 * np.eye(d), xty, assume_a="pos")
    else:
        targets = 2 * onehot.T.toarray() - 1
        w = x.T @ scipy.linalg.solve(x @ x.T + l2 * np.eye(n), targets, assume_a="pos")
    correct = sum(
        np.count_nonzero((whiten(tx[i : i + _TEST_CHUNK]) @ w).argmax(1) == ty[i : i + _TEST_CHUNK])
        for i in range(0, len(tx), _TEST_CHUNK)
    )
    return correct / len(ty)


def few_shot_indices(labels: ArrayLike, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` samples per class, as big_vision draws them (paper-facts §7.2).

    One ``np.random.default_rng(seed)`` permutes each class's indices (ascending index order) in ascending class
    order; the first ``shots`` of each permutation are kept. A class with fewer samples gives all it has.
    """
    labels = _numpy(labels).reshape(-1)
    order = np.argsort(labels, kind="stable")  # grouped by class, ascending index within a class
    _, starts = np.unique(labels[order], return_index=True)
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(group)[:shots] for group in np.split(order, starts[1:])]).astype(np.int64)


def fewshot_evaluate(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2: float = 1024.0,
    num_classes: int | None = None,
) -> pd.DataFrame:
    """Few-shot accuracy for every (shots, seed) on features extracted once (columns shots, seed, accuracy).

    ``num_classes`` is the dataset's class count (big_vision takes it from the dataset info); by default the
    largest label + 1.
    """
    train_x, test_x = _numpy(train_x), _numpy(test_x)
    train_y, test_y = _numpy(train_y).astype(np.int64).reshape(-1), _numpy(test_y).astype(np.int64).reshape(-1)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    rows = []
    for k in shots:
        for seed in seeds:
            idx = few_shot_indices(train_y, k, seed)
            acc = fewshot_ridge(train_x[idx], train_y[idx], test_x, test_y, l2=l2, num_classes=num_classes)
            rows.append({"shots": int(k), "seed": int(seed), "accuracy": acc})
    return pd.DataFrame(rows, columns=["shots", "seed", "accuracy"])


# ----------------------------------------------------------------------------------------------------------------
# Meters


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum an integer tensor over all ranks (a no-op without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    reduced = tensor.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def _predictions(logits_or_predictions: ArrayLike) -> torch.Tensor:
    """(B, K) logits -> argmax; (B,) class ids pass through."""
    x = torch.as_tensor(logits_or_predictions).detach()
    return (x.argmax(-1) if x.ndim == 2 else x).to(torch.int64).reshape(-1)


def _mask(mask: ArrayLike | None, batch: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask).detach().to(device=device, dtype=torch.bool).reshape(-1)
    if len(mask) != batch:
        raise ValueError(f"mask has {len(mask)} entries for a batch of {batch}")
    return mask


class ClassificationMeter:
    """Exact top-1 counts per class, accumulated batch by batch on the inputs' device (no host sync per batch).

    Padded samples are excluded with ``mask``; their labels may be anything (e.g. -1). After the last batch call
    ``all_reduce()`` once on every rank to sum the counts over ``torch.distributed`` ranks.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._correct = torch.zeros(num_classes, dtype=torch.int64)
        self._total = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, logits_or_predictions: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> None:
        preds = _predictions(logits_or_predictions)
        labels = torch.as_tensor(labels).detach().to(device=preds.device, dtype=torch.int64).reshape(-1)
        if len(preds) != len(labels):
            raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
        keep = _mask(mask, len(labels), preds.device)
        preds, labels = preds[keep], labels[keep]
        total = torch.bincount(labels, minlength=self.num_classes)
        if len(total) != self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got up to {len(total) - 1}")
        correct = torch.bincount(labels[preds == labels], minlength=self.num_classes)
        self._correct = self._correct.to(preds.device) + correct
        self._total = self._total.to(preds.device) + total

    def all_reduce(self) -> ClassificationMeter:
        counts = _all_reduce_sum(torch.stack([self._correct, self._total]))
        self._correct, self._total = counts[0], counts[1]
        return self

    @property
    def count(self) -> int:
        return int(self._total.sum())

    @property
    def correct(self) -> int:
        return int(self._correct.sum())

    @property
    def top1(self) -> float:
        """Fraction correct over all counted samples (NaN before any sample)."""
        return self.correct / self.count if self.count else math.nan

    def per_class_accuracy(self) -> np.ndarray:
        """(num_classes,) float64 accuracies, NaN for classes with no samples."""
        correct, total = self._correct.numpy(force=True), self._total.numpy(force=True)
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


RealLabels = Sequence[Sequence[int]] | ArrayLike


def real_accuracy(
    logits_or_predictions: ArrayLike, real_labels: RealLabels, mask: ArrayLike | None = None
) -> tuple[int, int]:
    """ImageNet ReaL counts ``(correct, counted)`` for one batch (paper-facts §9.5, big_vision's evaluator).

    A top-1 prediction is correct when it is in the image's ReaL label set; images whose set is empty are not
    counted, nor are masked-out (padded) ones. ``real_labels`` is a list of label lists or a (B, K) multi-hot array.
    """
    preds = _predictions(logits_or_predictions)
    keep = _mask(mask, len(preds), preds.device)
    if isinstance(real_labels, np.ndarray | torch.Tensor) and real_labels.ndim == 2:
        multi_hot = torch.as_tensor(real_labels).detach().to(preds.device) > 0
        hit = multi_hot.gather(1, preds[:, None]).squeeze(1)
        valid = multi_hot.any(1) & keep
        return int((hit & valid).sum()), int(valid.sum())
    if len(real_labels) != len(preds):
        raise ValueError(f"{len(real_labels)} ReaL label sets for {len(preds)} predictions")
    valid = [k and len(s) > 0 for k, s in zip(keep.tolist(), real_labels, strict=True)]
    correct = sum(v and p in set(map(int, s)) for v, p, s in zip(valid, preds.tolist(), real_labels, strict=True))
    return int(correct), sum(valid)


class RealMeter:
    """Accumulates ``real_accuracy`` over batches; ``all_reduce()`` sums the counts over ranks."""

    def __init__(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.int64)  # correct, counted

    def update(self, logits_or_predictions: ArrayLike, real_labels: RealLabels, mask: ArrayLike | None = None) -> None:
        self._counts += torch.tensor(real_accuracy(logits_or_predictions, real_labels, mask))

    def all_reduce(self) -> RealMeter:
        self._counts = _all_reduce_sum(self._counts)
        return self

    @property
    def correct(self) -> int:
        return int(self._counts[0])

    @property
    def count(self) -> int:
        return int(self._counts[1])

    @property
    def top1(self) -> float:
        return self.correct / self.count if self.count else math.nan


# ----------------------------------------------------------------------------------------------------------------
# VTAB-1k
