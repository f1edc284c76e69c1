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
import math

import numba
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import (
    pairwise_distances,
)

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


def _table(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(classes × clusters) int64 contingency of the labels present, both sorted (one bincount):
    the table scikit-learn's ``contingency_matrix`` builds, without its per-call checks."""
    true, pred = _pair(true, pred)
    classes, t = np.unique(true, return_inverse=True)
    clusters, p = np.unique(pred, return_inverse=True)
    size = len(classes) * len(clusters)
    return np.bincount(t * len(clusters) + p, minlength=size).reshape(len(classes), -1)


def _entropy(counts: np.ndarray) -> float:
    """scikit-learn's entropy of a labelling from its (sorted, non-zero) label counts."""
    if counts.size == 1:
        return 0.0
    pi = counts.astype(np.float64)
    pi_sum = np.sum(pi)
    return float(-np.sum((pi / pi_sum) * (np.log(pi) - math.log(pi_sum))))


def _nmi(c: np.ndarray) -> float:
    """NMI (arithmetic mean) from a contingency table, step for step as scikit-learn computes it
    (``normalized_mutual_info_score`` and ``mutual_info_score``), so the bits agree."""
    if c.shape[0] == c.shape[1] == 1 or c.size == 0:
        return 1.0
    pi, pj = c.sum(axis=1), c.sum(axis=0)
    if pi.size == 1 or pj.size == 1:
        return 0.0
    nzx, nzy = np.nonzero(c)
    nz_val = c[nzx, nzy].astype(np.float64)
    total = float(c.sum())
    outer = pi.take(nzx).astype(np.int64) * pj.take(nzy).astype(np.int64)
    log_outer = -np.log(outer) + math.log(float(pi.sum())) + math.log(float(pj.sum()))
    nm = nz_val / total
    mi = nm * (np.log(nz_val) - math.log(total)) + nm * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    mi = float(np.clip(mi.sum(), 0.0, None))
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(pi), _entropy(pj)]))


def _ari(c: np.ndarray) -> float:
    """ARI from a contingency table: scikit-learn's pair confusion matrix, in exact integers."""
    n = int(c.sum())
    sum_squares = int((c.astype(np.int64) ** 2).sum())
    n_c, n_k = c.sum(axis=1), c.sum(axis=0)
    fp = int(c.dot(n_k).sum()) - sum_squares
    fn = int(c.T.dot(n_c).sum()) - sum_squares
    tp = sum_squares - n
    tn = n * n - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _hungarian(c: np.ndarray, n: int) -> float:
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / n)


def nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """Normalized mutual information (scikit-learn's, arithmetic mean; the same bits)."""
    return _nmi(_table(true, pred))


def ari(true: np.ndarray, pred: np.ndarray) -> float:
    """Adjusted Rand index (scikit-learn's; the same value)."""
    return _ari(_table(true, pred))


def hungarian_acc(true: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes.

    Maximum-weight matching on the classes x clusters contingency matrix;
    works for rectangular matrices (unmatched clusters count as wrong).
    NaN for no samples.
    """
    c = _table(true, pred)
    return float("nan") if c.size == 0 else _hungarian(c, int(c.sum()))


def purity(true: np.ndarray, pred: np.ndarray) -> float:
    """Share of samples in their cluster's majority class (NaN for no samples)."""
    c = _table(true, pred)
    return float("nan") if c.size == 0 else float(c.max(axis=0).sum() / c.sum())


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
    training set alone. The training-set scores share one contingency table.
    """
    train_true, train_ids = _pair(train_true, train_ids)
    test_true, test_ids = _pair(test_true, test_ids)
    if train_ids.size == 0:
        raise ValueError("the training set is empty")
    label = majority_labels(train_ids, train_true, k)
    table = _table(train_true, train_ids)
    n = train_ids.size
    return {
        "cluster_label": label,
        "cluster_size": np.bincount(train_ids, minlength=k).astype(np.int64),
        "train_accuracy": label_accuracy(train_ids, train_true, label),
        "test_accuracy": label_accuracy(test_ids, test_true, label),
        "nmi": _nmi(table),
        "ari": _ari(table),
        "acc": _hungarian(table, n) if k == n_classes else float("nan"),
        "purity": float(table.max(axis=0).sum() / n),
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
    present, idx = np.unique(labels, return_inverse=True)
    n, n_labels = len(labels), len(present)
    if n == 0:
        means, counts = np.empty((0, x.shape[1])), np.empty(0)
        spread, within = np.empty(0), 0.0
    else:
        means, counts, spread, sq = _cluster_moments(x, idx.astype(np.intp), n_labels)
        within = float(np.sum(sq))
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
        out["silhouette"] = silhouette(distances, sub)
    return out


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's ``silhouette_score(distances, labels, metric="precomputed")``, same bits.

    scikit-learn sums each row's distances per cluster with one ``bincount`` per row; here
    a compiled loop adds every (row, cluster) sum's terms in the same column order, from
    0.0, as ``bincount`` does (the same bits, without its (row, cluster) bin array: a
    tenth of the time per run). ``labels`` must hold 2 to n − 1 distinct values.
    """
    _, lab = np.unique(_ints(labels, "cluster ids"), return_inverse=True)
    n, m = len(lab), int(lab.max()) + 1
    freqs = np.bincount(lab)
    sums = _row_cluster_sums(
        np.ascontiguousarray(distances, dtype=np.float64), lab.astype(np.intp), m
    )
    own = (np.arange(n), lab)
    intra = sums[own]
    sums[own] = np.inf
    sums /= freqs
    inter = sums.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        intra /= (freqs - 1).take(lab, mode="clip")
        sil = inter - intra
        sil /= np.maximum(intra, inter)
    return float(np.mean(np.nan_to_num(sil)))


@numba.njit(cache=True, nogil=True)
def _row_cluster_sums(distances: np.ndarray, lab: np.ndarray, m: int) -> np.ndarray:
    """(n, m): per row, the sum of its distances to the members of each cluster 0..m-1,
    terms added in column order (``np.bincount(lab, row, m)`` row by row, the same bits)."""
    n = distances.shape[0]
    sums = np.zeros((n, m))
    for i in range(n):
        for j in range(len(lab)):
            sums[i, lab[j]] += distances[i, j]
    return sums


@numba.njit(cache=True, nogil=True)
def _cluster_moments(
    x: np.ndarray, idx: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per cluster 0..m-1 (``idx`` per row): float64 mean of its rows, member count, mean
    distance of its rows to that mean, and Σ of their squared distances.

    Two passes over the rows, no copy of them: the means are summed in row order (as
    numpy's ``rows.mean(axis=0)``), each squared distance with 8 partial sums.
    """
    n, d = x.shape
    means = np.zeros((m, d))
    counts = np.zeros(m)
    for i in range(n):
        c = idx[i]
        counts[c] += 1.0
        for j in range(d):
            means[c, j] += x[i, j]
    for c in range(m):
        for j in range(d):
            means[c, j] /= counts[c]
    spread = np.zeros(m)
    sq = np.zeros(m)
    part = np.zeros(8)
    whole = d - d % 8
    for i in range(n):
        c = idx[i]
        part[:] = 0.0
        for j0 in range(0, whole, 8):
            for t in range(8):
                v = x[i, j0 + t] - means[c, j0 + t]
                part[t] += v * v
        s = 0.0
        for j in range(whole, d):
            v = x[i, j] - means[c, j]
            s += v * v
        s += ((part[0] + part[1]) + (part[2] + part[3])) + (
            (part[4] + part[5]) + (part[6] + part[7])
        )
        sq[c] += s
        spread[c] += np.sqrt(s)
    return means, counts, spread / counts, sq


def _davies_bouldin(means: np.ndarray, spread: np.ndarray) -> float:
    """Mean over clusters of the worst (s_i + s_j) / ‖c_i − c_j‖, as scikit-learn defines it."""
    gaps = cdist(means, means)
    if np.allclose(spread, 0) or np.allclose(gaps, 0):
        return 0.0  # scikit-learn's value when no cluster has spread or all centres coincide
    gaps[gaps == 0] = np.inf
    return float(np.mean(np.max((spread[:, None] + spread[None, :]) / gaps, axis=1)))
