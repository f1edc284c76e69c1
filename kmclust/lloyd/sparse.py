"""In-memory Lloyd for scipy.sparse rows (and small dense arrays): scikit-learn's iteration.

The estimator's path for CSR/CSC matrices and sparse arrays, which the Dask
engine does not take, and for the few dense fits the engine refuses (k above
the number of distinct points, where scikit-learn relocates anyway and
warns). Pure numpy/scipy.

Distances use the expansion ‖x‖² − 2x·c + ‖c‖² (one sparse × dense product
per row block). Labels are the exact nearest centroid: a row whose best two
distances lie within the expansion's rounding bound is settled by summing
‖x − c‖² directly in float64 (ties then go to the lower index). Cluster sums
are one sparse product (weights as a k × n one-hot matrix) in float64.

One iteration is scikit-learn's ``lloyd_iter``: labels from the current
centres, weighted sums, empty clusters given the points farthest from their
centres, new centres. The run stops on *strict convergence* (labels equal to
the previous iteration's), when Σ‖Δc‖² ≤ ``tol`` (absolute), or after
``max_iter``; a run not strictly converged gets a final assignment so that
labels match the centres.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

#: rows per block of distance work (a block's (rows, k) float64 distances stay small)
BLOCK_ROWS = 8192
_EPS = np.finfo(np.float64).eps


@dataclass
class Fit:
    """Outcome of one in-memory run (centres float64)."""

    centers: np.ndarray
    labels: np.ndarray  # (n,) int32
    inertia: float  # Σ w ‖x − c_label‖²
    n_iter: int
    converged: bool
    n_relocated: int
    mean_distance: float = np.nan  # unweighted mean of ‖x − c_label‖


def as_rows(x) -> np.ndarray | sp.csr_matrix:
    """``x`` as float64 CSR (sparse input, sparse arrays kept as such) or a float64 ndarray."""
    if sp.issparse(x):
        return x.tocsr().astype(np.float64, copy=False)
    return np.asarray(x, dtype=np.float64)


class DenseRows:
    """Row access to a CSR matrix as dense float64 blocks, for the dense initialisers.

    ``rows[slice]``, ``rows[index list]`` give 2-D dense blocks, ``rows[i]`` one 1-D row,
    so :mod:`kmclust.lloyd.init_sampling` runs unchanged (and draws what it draws on the
    same data stored densely).
    """

    def __init__(self, x: sp.csr_matrix) -> None:
        self.x = x
        self.shape = x.shape
        self.dtype = np.dtype(np.float64)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.x[[int(key)]].toarray()[0]
        return self.x[key].toarray()


def sq_norms(x) -> np.ndarray:
    """Squared row norms in float64."""
    if sp.issparse(x):
        return np.asarray(x.multiply(x).sum(axis=1), dtype=np.float64).ravel()
    return np.einsum("ij,ij->i", x, x)


def stats(x, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (weighted) mean and standard deviation (ddof=0) in float64."""
    n = x.shape[0]
    w = np.ones(n) if w is None else w
    total = float(w.sum())
    mean = np.asarray(x.T @ w, dtype=np.float64).ravel() / total
    sq = x.multiply(x) if sp.issparse(x) else x * x
    var = np.asarray(sq.T @ w, dtype=np.float64).ravel() / total - mean * mean
    return mean, np.sqrt(np.maximum(var, 0.0))


def _exact_block(rows, c: np.ndarray) -> np.ndarray:
    """(m, k) squared distances summed directly, ‖x − c‖² (no cancellation)."""
    dense = rows.toarray() if sp.issparse(rows) else rows
    out = np.empty((dense.shape[0], c.shape[0]))
    for j, cj in enumerate(c):
        diff = dense - cj
        out[:, j] = np.einsum("ij,ij->i", diff, diff)
    return out


def nearest(x, c: np.ndarray, xsq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centre of every row (first of equals) and its squared distance."""
    n, k = x.shape[0], c.shape[0]
    xsq = sq_norms(x) if xsq is None else xsq
    csq = np.einsum("ij,ij->i", c, c)
    nnz = np.diff(x.indptr) if sp.issparse(x) else np.full(n, x.shape[1])
    labels = np.empty(n, dtype=np.int32)
    best = np.empty(n)
    for s in range(0, n, BLOCK_ROWS):
        e = min(s + BLOCK_ROWS, n)
        d = np.asarray(x[s:e] @ c.T, dtype=np.float64)
        d *= -2.0
        d += xsq[s:e, None]
        d += csq[None, :]
        lab = np.argmin(d, axis=1)
        b = d[np.arange(e - s), lab]
        # rounding bound of the expansion: both distances err by at most ~(m + 4) eps (‖x‖²+‖c‖²)
        bound = 2.0 * (nnz[s:e] + 4) * _EPS * (xsq[s:e] + csq.max())
        if k > 1:
            second = np.partition(d, 1, axis=1)[:, 1]
            risky = np.flatnonzero((second - b <= bound) | (b <= bound))
        else:
            risky = np.flatnonzero(b <= bound)
        if risky.size:
            exact = _exact_block(x[s + risky], c)
            lab[risky] = np.argmin(exact, axis=1)
            b[risky] = exact[np.arange(risky.size), lab[risky]]
        labels[s:e] = lab
        best[s:e] = np.maximum(b, 0.0)
    return labels, best


def sq_dists_to(x, c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """‖x_i − c_{labels_i}‖² in float64.

    Sparse rows: ‖c‖² + Σ_nz x(x − 2c) over the stored entries; where that is small next to
    ‖x‖² + ‖c‖² (it may have cancelled) the distance is summed directly.
    """
    if not sp.issparse(x):
        diff = x - c[labels]
        return np.einsum("ij,ij->i", diff, diff)
    n = x.shape[0]
    row = np.repeat(np.arange(n), np.diff(x.indptr))
    cl = c[labels[row], x.indices]
    vals = x.data * (x.data - 2.0 * cl)
    csq = np.einsum("ij,ij->i", c, c)[labels]
    out = np.maximum(csq + np.bincount(row, weights=vals, minlength=n), 0.0)
    risky = np.flatnonzero(out <= 1e-6 * (sq_norms(x) + csq))
    for s in range(0, risky.size, BLOCK_ROWS):
        rows = risky[s : s + BLOCK_ROWS]
        diff = x[rows].toarray() - c[labels[rows]]
        out[rows] = np.einsum("ij,ij->i", diff, diff)
    return out


def _sums(x, labels: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster weighted sums (k, D) and weights (k,) in float64."""
    n = x.shape[0]
    onehot = sp.csr_array((w, (labels, np.arange(n))), shape=(k, n))
    sums = onehot @ x
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return np.asarray(sums, dtype=np.float64), np.bincount(labels, weights=w, minlength=k)


def _row(x, i: int) -> np.ndarray:
    return x[[i]].toarray()[0] if sp.issparse(x) else x[i]


def _relocate(x, w, labels, d2, sums, weights) -> int:
    """Give each empty cluster one of the points farthest from their centres (scikit-learn's
    policy, weights moved with the points), never a cluster's last point; in place.

    Returns how many clusters were empty.
    """
    empty = np.flatnonzero(weights == 0)
    left = np.bincount(labels, minlength=len(weights))
    far = []
    for i in np.argsort(-d2, kind="stable"):
        if len(far) == empty.size:
            break
        if left[labels[i]] > 1:
            left[labels[i]] -= 1
            far.append(i)
    for new, i in zip(empty, far):
        old, row = labels[i], _row(x, int(i)) * w[i]
        sums[old] -= row
        sums[new] = row
        weights[new] = w[i]
        weights[old] -= w[i]
    return int(empty.size)


def lloyd(
    x,
    centers: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    tol: float = 0.0,
    max_iter: int = 300,
    log: Callable[[str], None] | None = None,
) -> Fit:
    """One Lloyd run from ``centers`` on in-memory rows (``as_rows``), scikit-learn's iteration.

    ``tol`` is absolute (compared with Σ‖Δc‖²); ``log`` receives scikit-learn's verbose lines.
    """
    n, k = x.shape[0], centers.shape[0]
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    xsq = sq_norms(x)
    c = np.array(centers, dtype=np.float64)
    labels_old = np.full(n, -1, dtype=np.int32)
    strict = converged = False
    relocated = 0
    for i in range(max_iter):
        labels, d2 = nearest(x, c, xsq)
        sums, weights = _sums(x, labels, w, k)
        if np.any(weights == 0):
            relocated += _relocate(x, w, labels, d2, sums, weights)
        new = sums.copy()
        full = weights > 0
        new[full] /= weights[full, None]
        move = new - c
        if log is not None:
            log(f"Iteration {i}, inertia {float(w @ sq_dists_to(x, c, labels))}.")
        c = new
        if np.array_equal(labels, labels_old):
            strict = converged = True
            if log is not None:
                log(f"Converged at iteration {i}: strict convergence.")
            break
        total = float(np.einsum("ij,ij->", move, move))
        if total <= tol:
            converged = True
            if log is not None:
                log(f"Converged at iteration {i}: center shift {total} within tolerance {tol}.")
            break
        labels_old = labels
    if not strict:
        labels, _ = nearest(x, c, xsq)
    d2 = sq_dists_to(x, c, labels)
    return Fit(c, labels, float(w @ d2), i + 1, converged, relocated, float(np.sqrt(d2).mean()))


def predict(x, centers: np.ndarray, sample_weight: np.ndarray | None = None):
    """Labels (int32) and Σ w ‖x − c_label‖² of in-memory rows for fixed centres."""
    c = np.asarray(centers, dtype=np.float64)
    labels, _ = nearest(x, c)
    d2 = sq_dists_to(x, c, labels)
    return labels, float(d2.sum() if sample_weight is None else sample_weight @ d2)


def distances(x, centers: np.ndarray) -> np.ndarray:
    """(n, k) Euclidean distances in float64 (small ones summed directly)."""
    c = np.asarray(centers, dtype=np.float64)
    xsq = sq_norms(x)
    csq = np.einsum("ij,ij->i", c, c)
    out = np.empty((x.shape[0], c.shape[0]))
    for s in range(0, x.shape[0], BLOCK_ROWS):
        e = min(s + BLOCK_ROWS, x.shape[0])
        d = np.asarray(x[s:e] @ c.T, dtype=np.float64)
        d = xsq[s:e, None] - 2.0 * d + csq[None, :]
        risky = np.flatnonzero((d <= 1e-6 * (xsq[s:e, None] + csq[None, :])).any(axis=1))
        if risky.size:
            d[risky] = _exact_block(x[s + risky], c)
        out[s:e] = np.sqrt(np.maximum(d, 0.0))
    return out
