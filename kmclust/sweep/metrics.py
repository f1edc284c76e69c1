"""Clustering quality: majority-label accuracy, NMI, ARI, Hungarian accuracy, purity, and
the label-free indices for choosing k (Davies–Bouldin, Calinski–Harabasz, silhouette).

Thin wrappers over scikit-learn (NMI, ARI, contingency matrix, silhouette) and
scipy (``linear_sum_assignment``); Davies–Bouldin and Calinski–Harabasz are
computed here in one pass over the rows (scikit-learn's definitions, checked
against it in the tests). Cluster labels are learned on the training set
only; the held-out test set is scored with them and never influences them.
Label arrays are 1-D integer arrays; true labels must be >= 0 so that -1 can
mark a cluster without members. Inputs come from the engine, not from users,
so mistakes raise a plain ValueError.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    pairwise_distances,
    silhouette_score,
)
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


def silhouette_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the ``size`` rows (of ``n``) the silhouette is computed on.

    All rows if ``size`` ≥ n, none if 0. Drawn from ``seed`` alone, so every run
    given the same seed is scored on the same rows (reproducible, and paired across k).
    """
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(n, size=size, replace=False))


def sample_distances(x: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Euclidean distances (float64) between the sampled rows: shared by every run of a seed,
    since computing them is most of a silhouette's cost."""
    if len(sample) == 0:
        return np.empty((0, 0))
    return pairwise_distances(np.asarray(x[sample], dtype=np.float64))


def _scorable(n_labels: int, n_rows: int) -> bool:
    """scikit-learn's rule: the indices need 2 to n_rows − 1 distinct labels."""
    return 2 <= n_labels <= n_rows - 1


def internal_indices(
    x: np.ndarray,
    labels: np.ndarray,
    sample: np.ndarray,
    distances: np.ndarray | None = None,
) -> dict[str, float]:
    """Davies–Bouldin, Calinski–Harabasz (all rows) and silhouette (rows ``sample``).

    ``x`` (N, D) rows, ``labels`` (N,) cluster ids; ``distances``:
    ``sample_distances(x, sample)`` if already at hand. Cluster centres are the means of
    their members in float64 (as scikit-learn takes them, whether or not the run
    converged); empty clusters do not count. One pass over the rows, cluster by
    cluster: no N × k distance matrix. An index that is undefined (fewer than two
    non-empty clusters, or every row its own cluster; an empty sample) is NaN.
    """
    labels = _ints(labels, "cluster ids")
    present = np.unique(labels)
    n, n_labels = len(labels), len(present)
    means = np.empty((n_labels, x.shape[1]))
    counts = np.empty(n_labels)
    spread = np.empty(n_labels)  # mean distance of a cluster's members to its centre
    within = 0.0  # Σ squared distances to the centres
    for i, c in enumerate(present):
        rows = np.asarray(x[labels == c], dtype=np.float64)
        means[i] = rows.mean(axis=0)
        sq = np.einsum("ij,ij->i", rows - means[i], rows - means[i])
        counts[i], spread[i], within = len(rows), np.sqrt(sq).mean(), within + sq.sum()
    out = {"davies_bouldin": np.nan, "calinski_harabasz": np.nan, "silhouette": np.nan}
    if _scorable(n_labels, n):
        overall = counts @ means / n
        between = float(counts @ ((means - overall) ** 2).sum(axis=1))
        ch = 1.0 if within == 0 else between * (n - n_labels) / (within * (n_labels - 1))
        out["calinski_harabasz"] = float(ch)
        out["davies_bouldin"] = _davies_bouldin(means, spread)
    sub = labels[sample]
    if len(sample) and _scorable(len(np.unique(sub)), len(sample)):
        if distances is None:
            distances = sample_distances(x, sample)
        out["silhouette"] = float(silhouette_score(distances, sub, metric="precomputed"))
    return out


def _davies_bouldin(means: np.ndarray, spread: np.ndarray) -> float:
    """Mean over clusters of the worst (s_i + s_j) / ‖c_i − c_j‖, as scikit-learn defines it."""
    gaps = cdist(means, means)
    if np.allclose(spread, 0) or np.allclose(gaps, 0):
        return 0.0  # scikit-learn's value when no cluster has spread or all centres coincide
    gaps[gaps == 0] = np.inf
    return float(np.mean(np.max((spread[:, None] + spread[None, :]) / gaps, axis=1)))
