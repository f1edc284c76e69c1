"""scikit-learn's Lloyd iteration over blocks of sparse rows, in memory or in dask chunks.

The estimator's path for scipy.sparse input (CSR/CSC matrices and arrays, and dask
arrays with sparse chunks) and for the few dense fits the Dask engine refuses (k
above the number of distinct points, where scikit-learn relocates anyway and warns).

One iteration is scikit-learn's ``lloyd_iter``: labels from the current centres
(every block: :func:`kmclust.lloyd.sparse.step`), exact weighted sums reduced on
the driver, empty clusters given the points farthest from their centres, new
centres. The run stops on *strict convergence* (labels equal to the previous
iteration's), when Σ‖Δc‖² ≤ ``tol`` (absolute), or after ``max_iter``; a run not
strictly converged gets a final assignment so that labels match the centres.
Since each block's share is exact, the fit is the same bits whatever the blocks:
in memory (one block) or any row chunking of a dask array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kmclust.lloyd import sparse
from kmclust.lloyd import sparse_sums as sums


@dataclass
class Fit:
    """Outcome of one run (centres float64)."""

    centers: np.ndarray
    labels: np.ndarray  # (n,) int32
    inertia: float  # Σ w ‖x − c_label‖²
    n_iter: int
    converged: bool
    n_relocated: int
    mean_distance: float = np.nan  # unweighted mean of ‖x − c_label‖


class Rows(Protocol):
    """Rows in blocks: ``map(fn, *args)`` is ``[fn(block, *args) for block in blocks]``."""

    n: int
    w: np.ndarray | None  # every row's weight (None: all 1)
    grids: sparse.Grids

    def map(self, fn: Callable, *args) -> list: ...


class MemoryRows:
    """In-memory rows (sparse or dense) as one block."""

    def __init__(self, x, sample_weight: np.ndarray | None = None) -> None:
        self.w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.block = sparse.block(x, self.w)
        self.n, top, max_w, finite = sparse.summary(self.block)
        if not finite:
            raise ValueError("Input X contains NaN or infinity.")
        self.grids = sparse.grids(self.n, top, max_w)
        self.block = sparse.with_levels(self.block, self.grids)

    def map(self, fn: Callable, *args) -> list:
        return [fn(self.block, *args)]


def _relocate(st: sparse.Step, w: np.ndarray | None, labels, s, weights) -> int:
    """Give each empty cluster one of the points farthest from their centres (scikit-learn's
    policy, weights moved with the points), never a cluster's last point; in place.

    Returns how many clusters were empty.
    """
    empty = np.flatnonzero(weights == 0)
    left = np.bincount(labels, minlength=len(weights))
    far = []
    for j, i in enumerate(st.far):
        if len(far) == empty.size:
            break
        if left[labels[i]] > 1:
            left[labels[i]] -= 1
            far.append(j)
    for new, j in zip(empty, far):
        i = st.far[j]
        wi = 1.0 if w is None else w[i]
        old, row = labels[i], st.far_rows[[j]].toarray()[0] * wi
        s[old] -= row
        s[new] = row
        weights[new] = wi
        weights[old] -= wi
    return int(empty.size)


def fit(
    rows: Rows,
    centers: np.ndarray,
    *,
    tol: float = 0.0,
    max_iter: int = 300,
    log: Callable[[str], None] | None = None,
) -> Fit:
    """One Lloyd run from ``centers``; ``tol`` absolute (compared with Σ‖Δc‖²); ``log``
    receives scikit-learn's verbose lines."""
    g = rows.grids
    c = np.array(centers, dtype=np.float64)
    labels_old = np.full(rows.n, -1, dtype=np.int32)
    strict = converged = False
    relocated = 0
    for i in range(max_iter):
        st = sparse.combine(rows.map(sparse.step, c, g, log is not None))
        labels = st.labels
        new, weights = sums.join(st.sums, g.entries), sums.join(st.weights, g.weights)
        if np.any(weights == 0):
            relocated += _relocate(st, rows.w, labels, new, weights)
        full = weights > 0
        new[full] /= weights[full, None]
        move = new - c
        if log is not None:
            log(f"Iteration {i}, inertia {float(st.inertia)}.")
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
    parts = rows.map(sparse.errors, c, labels if strict else None)
    labels = np.concatenate([p[0] for p in parts])
    inertia = float(sum(p[1] for p in parts))
    mean_distance = float(sum(p[2] for p in parts)) / rows.n
    return Fit(c, labels, inertia, i + 1, converged, relocated, mean_distance)


def lloyd(
    x,
    centers: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    tol: float = 0.0,
    max_iter: int = 300,
    log: Callable[[str], None] | None = None,
) -> Fit:
    """:func:`fit` on in-memory rows (scipy.sparse or dense)."""
    return fit(MemoryRows(x, sample_weight), centers, tol=tol, max_iter=max_iter, log=log)


def predict(rows: Rows, centers: np.ndarray) -> tuple[np.ndarray, float]:
    """Labels (int32) and Σ w ‖x − c_label‖² for fixed centres."""
    parts = rows.map(sparse.errors, np.asarray(centers, dtype=np.float64))
    return np.concatenate([p[0] for p in parts]), float(sum(p[1] for p in parts))


def mean_var(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (weighted) mean and variance (ddof=0), from exact sums."""
    return sparse.mean_var(rows.map(sparse.moments, rows.grids), rows.grids)
