"""Clustering quality: majority-label accuracy, NMI, ARI, Hungarian accuracy, purity.

Thin wrappers over scikit-learn (NMI, ARI, contingency matrix) and scipy
(``linear_sum_assignment``). Cluster labels are learned on the training set
only; the held-out test set is scored with them and never influences them.
Label arrays are 1-D integer arrays; true labels must be >= 0 so that -1 can
mark a cluster without members. Inputs come from the engine, not from users,
so mistakes raise a plain ValueError.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

log = logging.getLogger(__name__)

#: label of a cluster with no training members
UNLABELLED = -1


def _ints(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers; got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true, pred = _ints(true, "true labels"), _ints(pred, "cluster ids")
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} true labels but {len(pred)} cluster ids")
    return true, pred


def majority_labels(cluster_ids: np.ndarray, true_labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) int64: each cluster's most frequent true label among its members.

    Ties go to the smallest label; a cluster without members gets -1.
    """
    y, ids = _pair(true_labels, cluster_ids)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if ids.size and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}); got {ids.min()}..{ids.max()}")
    if y.size and y.min() < 0:
        raise ValueError("true labels must be non-negative")
    classes, y_idx = np.unique(y, return_inverse=True)
    n_cls = max(len(classes), 1)
    counts = np.bincount(ids * n_cls + y_idx, minlength=k * n_cls).reshape(k, n_cls)
    # argmax returns the first maximum, i.e. the smallest label (classes are sorted)
    labels = classes[counts.argmax(axis=1)] if len(classes) else np.zeros(k, np.int64)
    labels = labels.astype(np.int64)
    labels[counts.sum(axis=1) == 0] = UNLABELLED
    return labels


def label_accuracy(
    cluster_ids: np.ndarray, true_labels: np.ndarray, cluster_label: np.ndarray
) -> float:
    """Share of samples whose cluster's label equals their own (NaN if no samples).

    Members of an unlabelled (-1) cluster count as wrong.
    """
    y, ids = _pair(true_labels, cluster_ids)
    cluster_label = _ints(cluster_label, "cluster_label")
    if ids.size == 0:
        return float("nan")
    if ids.min() < 0 or ids.max() >= len(cluster_label):
        raise ValueError(f"cluster ids must lie in [0, {len(cluster_label)})")
    return float(np.mean(cluster_label[ids] == y))


def nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """Normalized mutual information (scikit-learn, arithmetic mean)."""
    return float(normalized_mutual_info_score(*_pair(true, pred)))


def ari(true: np.ndarray, pred: np.ndarray) -> float:
    """Adjusted Rand index (scikit-learn)."""
    return float(adjusted_rand_score(*_pair(true, pred)))


def hungarian_acc(true: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes.

    Maximum-weight matching on the classes x clusters contingency matrix;
    works for rectangular matrices (unmatched clusters count as wrong).
    NaN for no samples.
    """
    true, pred = _pair(true, pred)
    if true.size == 0:
        return float("nan")
    c = contingency_matrix(true, pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / true.size)


def purity(true: np.ndarray, pred: np.ndarray) -> float:
    """Share of samples in their cluster's majority class (NaN for no samples)."""
    true, pred = _pair(true, pred)
    if true.size == 0:
        return float("nan")
    return float(contingency_matrix(true, pred).max(axis=0).sum() / true.size)


def evaluate(
    train_ids: np.ndarray,
    train_true: np.ndarray,
    test_ids: np.ndarray,
    test_true: np.ndarray,
    k: int,
    n_classes: int,
) -> dict[str, float | np.ndarray]:
    """All clustering metrics of one run.

    Returns ``cluster_label`` (k,) and ``cluster_size`` (k,) train counts
    (int64), ``train_accuracy``, ``test_accuracy`` (NaN for an empty test
    set), ``nmi``, ``ari``, ``purity`` (train set) and ``acc`` (Hungarian,
    train set; NaN unless k == n_classes). Cluster labels come from the
    training set alone.
    """
    train_true, train_ids = _pair(train_true, train_ids)
    test_true, test_ids = _pair(test_true, test_ids)
    if train_ids.size == 0:
        raise ValueError("the training set is empty")
    label = majority_labels(train_ids, train_true, k)
    return {
        "cluster_label": label,
        "cluster_size": np.bincount(train_ids, minlength=k).astype(np.int64),
        "train_accuracy": label_accuracy(train_ids, train_true, label),
        "test_accuracy": label_accuracy(test_ids, test_true, label),
        "nmi": nmi(train_true, train_ids),
        "ari": ari(train_true, train_ids),
        "acc": hungarian_acc(train_true, train_ids) if k == n_classes else float("nan"),
        "purity": purity(train_true, train_ids),
    }
