"""Clustering quality: majority-label accuracy, NMI, ARI, Hungarian accuracy, purity, and
the label-free indices for choosing k (Davies–Bouldin, Calinski–Harabasz, silhouette).

scikit-learn's definitions throughout (checked against it in the tests): NMI and ARI
from one contingency table, Hungarian accuracy with scipy's ``linear_sum_assignment``,
Davies–Bouldin and Calinski–Harabasz in two compiled passes over the rows for several
runs at once (uint8 rows summed exactly in integers), the silhouette on a seeded sample.
Cluster labels are learned on the training set only; the held-out test set is scored
with them and never influences them. Label arrays are 1-D integer arrays; true labels
must be >= 0 so that -1 can mark a cluster without members. Inputs come from the
engine, not from users, so mistakes raise a plain ValueError.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numba
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import pairwise_distances

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
    """Euclidean distances (float64, in the units of ``x``) between the sampled rows: shared
    by every run of a seed, since computing them is most of a silhouette's cost."""
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
    scale: float = 1.0,
) -> dict[str, float]:
    """Davies–Bouldin, Calinski–Harabasz (all rows) and silhouette (rows ``sample``) of one
    labelling of the rows ``x * scale``: ``cluster_indices`` and ``sample_silhouette``."""
    out = cluster_indices(x, [labels], scale)[0]
    return out | {"silhouette": sample_silhouette(x, labels, sample, distances)}


def sample_silhouette(
    x: np.ndarray, labels: np.ndarray, sample: np.ndarray, distances: np.ndarray | None = None
) -> float:
    """Silhouette of the rows ``sample`` (``distances``: ``sample_distances(x, sample)`` if
    already at hand); NaN where scikit-learn refuses (fewer than two labels, or every row
    its own cluster, in the sample; an empty sample). Any scale of ``x``: it is a ratio."""
    sub = _ints(labels, "cluster ids")[sample]
    if not (len(sample) and _scorable(len(np.unique(sub)), len(sample))):
        return float("nan")
    return silhouette(sample_distances(x, sample) if distances is None else distances, sub)


def cluster_indices(
    x: np.ndarray, label_sets: Sequence[np.ndarray], scale: float = 1.0
) -> list[dict[str, float]]:
    """Davies–Bouldin and Calinski–Harabasz of each labelling of the rows ``x * scale`` (N, D).

    Several runs at once: each block of rows is read from memory once for all of them.
    Cluster centres are the means of their members (as scikit-learn takes them, whether or
    not the run converged); empty clusters and unused ids do not count. An index that is
    undefined (fewer than two clusters, or every row its own) is NaN. Both are ratios, so
    ``scale`` only enters scikit-learn's absolute test for "no spread"; uint8 rows (the
    sweep's pixels) are summed exactly in integers, a quarter of float32 rows' memory traffic.
    """
    x, n = np.ascontiguousarray(x), len(x)
    idx, sizes = np.empty((len(label_sets), n), np.intp), []
    for r, labels in enumerate(label_sets):
        labels = _ints(labels, "cluster ids")
        if len(labels) != n:
            raise ValueError(f"{n} rows but {len(labels)} cluster ids")
        if n and labels.min() < 0:
            raise ValueError("cluster ids must be non-negative")
        counts = np.bincount(labels)
        present = np.flatnonzero(counts)
        renumber = np.zeros(len(counts), np.intp)
        renumber[present] = np.arange(len(present))
        idx[r] = renumber[labels]
        sizes.append(len(present))
    m = max(sizes, default=0)
    sums = np.zeros((len(label_sets), m, x.shape[1]), _sum_dtype(x.dtype, n))
    counts = np.zeros((len(label_sets), m), np.int64)
    block = max(1, 2**16 // max(1, x.shape[1] * x.itemsize))  # rows in ~64 KiB, cached for all
    _cluster_sums(x, idx, sums, counts, block)
    with np.errstate(invalid="ignore", divide="ignore"):  # padding of runs with fewer clusters
        means = sums / counts[:, :, None]
    spread, sq = moments = np.zeros((2, len(label_sets), m))
    _cluster_spreads(x, idx, means, moments, block)
    out = []
    for r, k in enumerate(sizes):
        values = {"davies_bouldin": np.nan, "calinski_harabasz": np.nan}
        if _scorable(k, n):
            mu, size, within = means[r, :k], counts[r, :k], float(np.sum(sq[r, :k]))
            between = float(size @ ((mu - size @ mu / n) ** 2).sum(axis=1))
            ch = 1.0 if within == 0 else between * (n - k) / (within * (k - 1))
            values["calinski_harabasz"] = float(ch)
            values["davies_bouldin"] = _davies_bouldin(mu, spread[r, :k] / size, scale)
        out.append(values)
    return out


def _sum_dtype(dtype: np.dtype, n: int) -> type:
    """Cluster sums of n rows: exact int32 for uint8 rows while 255·n fits, else int64;
    float64 (numpy's row order) for any other rows."""
    if dtype != np.uint8:
        return np.float64
    return np.int32 if 255 * n < 2**31 else np.int64


@numba.njit(cache=True, nogil=True)
def _cluster_sums(
    x: np.ndarray, idx: np.ndarray, sums: np.ndarray, counts: np.ndarray, block: int
) -> None:
    """Per run r and cluster c (``idx[r]`` per row): Σ of its rows into ``sums[r, c]`` (# OUT,
    in row order) and its member count into ``counts[r, c]`` (# OUT)."""
    n, d = x.shape
    for i0 in range(0, n, block):
        for r in range(idx.shape[0]):
            for i in range(i0, min(i0 + block, n)):
                c = idx[r, i]
                counts[r, c] += 1
                total, row = sums[r, c], x[i]
                for j in range(d):
                    total[j] += row[j]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _cluster_spreads(
    x: np.ndarray, idx: np.ndarray, means: np.ndarray, out: np.ndarray, block: int
) -> None:
    """Per run r and cluster c: Σ of its rows' distances to ``means[r, c]`` into
    ``out[0, r, c]`` (# OUT) and Σ of their squares into ``out[1, r, c]`` (# OUT), in float64
    from the differences themselves (no cancelling expansion; the sum over a row's
    pixels reassociated, so that it is vectorised)."""
    n, d = x.shape
    for i0 in range(0, n, block):
        for r in range(idx.shape[0]):
            for i in range(i0, min(i0 + block, n)):
                c = idx[r, i]
                row, mean = x[i], means[r, c]
                s = 0.0
                for j in range(d):
                    v = row[j] - mean[j]
                    s += v * v
                out[0, r, c] += np.sqrt(s)
                out[1, r, c] += s


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


def _davies_bouldin(means: np.ndarray, spread: np.ndarray, scale: float = 1.0) -> float:
    """Mean over clusters of the worst (s_i + s_j) / ‖c_i − c_j‖, as scikit-learn defines it
    (its test for no spread, or coinciding centres, on the rows times ``scale``)."""
    gaps = cdist(means, means)
    if np.allclose(spread * scale, 0) or np.allclose(gaps * scale, 0):
        return 0.0  # scikit-learn's value when no cluster has spread or all centres coincide
    gaps[gaps == 0] = np.inf
    return float(np.mean(np.max((spread[:, None] + spread[None, :]) / gaps, axis=1)))
