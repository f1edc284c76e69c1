"""Sparse-row kernels of a row block: exact nearest centroids, distances, cluster sums.

The work of one block of scipy.sparse rows (float64 CSR), shared by the in-memory
fit (:mod:`kmclust.lloyd.sparse_fit`, the whole matrix as one block) and the
chunked fit of dask arrays with sparse chunks (:mod:`kmclust.lloyd.sparse_dask`,
one task per chunk). Pure numpy/scipy.

Distances use the expansion ‖x‖² − 2x·c + ‖c‖² (one sparse × dense product
per row block). Labels are the exact nearest centroid: a row whose best two
distances lie within the expansion's rounding bound is settled by summing
‖x − c‖² directly in float64 (ties then go to the lower index). Every per-row
value depends on the row alone. Cluster sums, weights and moments are exact
level sums on a grid set by the whole data (:mod:`kmclust.lloyd.sparse_sums`),
and J and the mean distance exact sums (:func:`kmclust.lloyd.exact.exact_sum`),
so a block's results add up to the same bits however the rows are chunked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from kmclust.lloyd import sparse_sums as sums
from kmclust.lloyd.exact import exact_sum

#: rows per block of distance work (a block's (rows, k) float64 distances stay small)
BLOCK_ROWS = 8192
_EPS = np.finfo(np.float64).eps


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


@dataclass
class Block:
    """A row block as every pass takes it: canonical float64 CSR rows (sorted, no explicit
    zeros: each row's sums run in one order), squared norms, weights (None: all 1), and the
    index of its first row in the whole data; once the data's grids are known, the levels of
    its weighted entries (:func:`with_levels`: they never change during a fit)."""

    x: sp.csr_matrix
    xsq: np.ndarray
    w: np.ndarray | None
    start: int
    levels: list[np.ndarray] | None = None

    @property
    def wx(self) -> np.ndarray:
        """The stored entries times their row's weight."""
        if self.w is None:
            return self.x.data
        return self.x.data * np.repeat(self.w, np.diff(self.x.indptr))


def block(x, w: np.ndarray | None = None, start: int = 0) -> Block:
    """``x`` (sparse or dense rows) as a :class:`Block`; ``w`` its rows' weights or None."""
    rows = sp.csr_matrix(x, dtype=np.float64, copy=True)
    rows.sum_duplicates()
    rows.eliminate_zeros()
    rows.sort_indices()
    w = None if w is None else np.asarray(w, dtype=np.float64)
    return Block(rows, sq_norms(rows), w, start)


def with_levels(b: Block, g: Grids) -> Block:
    """``b`` with the levels of its weighted entries on the grid ``g.entries``."""
    return replace(b, levels=sums.levels(b.wx, g.entries))


def summary(b: Block) -> tuple[int, float, float, bool]:
    """(rows, max |x|, max weight, all entries finite) of a block."""
    d = b.x.data
    finite = bool(np.isfinite(d).all())
    top = float(np.abs(d).max()) if d.size and finite else 0.0
    wmax = 1.0 if b.w is None or not b.w.size else float(b.w.max())
    return b.x.shape[0], top, wmax, finite


@dataclass(frozen=True)
class Grids:
    """The sum grids of a data set (:func:`kmclust.lloyd.sparse_sums.grid`)."""

    entries: sums.Grid  # w·x
    squares: sums.Grid  # w·x²
    weights: sums.Grid  # w


def grids(n: int, max_abs: float, max_w: float) -> Grids:
    """The grids for ``n`` rows with entries up to ``max_abs`` and weights up to ``max_w``."""
    return Grids(
        sums.grid(n, max_abs * max_w),
        sums.grid(n, max_w * (max_abs * max_abs)),
        sums.grid(n, max_w),
    )


def moments(b: Block, g: Grids) -> tuple[list, list, list]:
    """Levels of Σw, Σw·x and Σw·x² per column of a block (for means and variances)."""
    n = b.x.shape[0]
    w = np.ones(n) if b.w is None else b.w
    total = sums.group_sums(w, np.zeros(n, dtype=np.intp), 1, g.weights)
    wx2 = b.wx * b.x.data
    return total, sums.column_sums(b.x, b.wx, g.entries), sums.column_sums(b.x, wx2, g.squares)


def mean_var(parts: list[tuple[list, list, list]], g: Grids) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (weighted) mean and variance (ddof=0) from blocks' ``moments``."""
    t, s1, s2 = parts[0]
    for a, b1, b2 in parts[1:]:
        t, s1, s2 = sums.add(t, a), sums.add(s1, b1), sums.add(s2, b2)
    total = float(sums.join(t, g.weights)[0])
    mean = sums.join(s1, g.entries) / total
    return mean, np.maximum(sums.join(s2, g.squares) / total - mean * mean, 0.0)


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
        d = np.asarray((x if e - s == n else x[s:e]) @ c.T, dtype=np.float64)
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


@dataclass
class Step:
    """One Lloyd assignment over blocks: labels, exact level sums and weights per cluster, the
    rows farthest from their centres (candidates for empty clusters) and, if asked, J."""

    labels: np.ndarray  # (rows,) int32
    sums: list  # levels of (k, D) per-cluster sums of w·x
    weights: list  # levels of (k,) per-cluster Σw
    far: np.ndarray  # global row indices, farthest first (ties: lower index)
    far_d2: np.ndarray
    far_rows: sp.csr_matrix  # those rows, unweighted
    inertia: Fraction | float | None  # exact Σ w ‖x − c_old‖² (if asked)


def _farthest(d2: np.ndarray, index: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` largest ``d2`` (ties: lower ``index``), largest first."""
    return np.lexsort((index, -d2))[:m]


def step(b: Block, c: np.ndarray, g: Grids, with_inertia: bool = False) -> Step:
    """Labels from centres ``c`` and this block's exact shares of the cluster sums.

    The block's k farthest rows suffice for the relocation: it examines at most k rows
    (each taken row fills an empty cluster, and at most one row per cluster is skipped).
    """
    k, n = c.shape[0], b.x.shape[0]
    labels, d2 = nearest(b.x, c, b.xsq)
    w = np.ones(n) if b.w is None else b.w
    far = _farthest(d2, np.arange(n), k)
    inertia = None
    if with_inertia:
        inertia = exact_sum(w * sq_dists_to(b.x, c, labels))
    return Step(
        labels,
        sums.cluster_sums(b.x, b.levels or sums.levels(b.wx, g.entries), labels, k),
        sums.group_sums(w, labels, k, g.weights),
        far + b.start,
        d2[far],
        b.x[far],
        inertia,
    )


def combine(steps: list[Step]) -> Step:
    """The steps of consecutive blocks, in row order, as one: exact sums (the same bits in
    any grouping), the farthest rows of the whole."""
    if len(steps) == 1:
        return steps[0]
    level_sums, weights = steps[0].sums, steps[0].weights
    for s in steps[1:]:
        level_sums, weights = sums.add(level_sums, s.sums), sums.add(weights, s.weights)
    far = np.concatenate([s.far for s in steps])
    far_d2 = np.concatenate([s.far_d2 for s in steps])
    keep = _farthest(far_d2, far, steps[0].sums[0].shape[0])
    inertia = None if steps[0].inertia is None else sum(s.inertia for s in steps)
    return Step(
        np.concatenate([s.labels for s in steps]),
        level_sums,
        weights,
        far[keep],
        far_d2[keep],
        sp.vstack([s.far_rows for s in steps], format="csr")[keep],
        inertia,
    )


def errors(b: Block, c: np.ndarray, labels: np.ndarray | None = None):
    """(labels, exact Σ w ‖x − c‖², exact Σ ‖x − c‖) of a block; ``labels`` are the whole
    data's (None: the nearest centres)."""
    if labels is None:
        labels, _ = nearest(b.x, c, b.xsq)
    else:
        labels = labels[b.start : b.start + b.x.shape[0]]
    d2 = sq_dists_to(b.x, c, labels)
    w = np.ones(len(d2)) if b.w is None else b.w
    return labels, exact_sum(w * d2), exact_sum(np.sqrt(d2))


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
