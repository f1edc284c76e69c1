"""Nearest centroid per run from a chunk's distance matrix, with near ties settled exactly.

The GEMM gives each distance with a rounding error that depends on how the
BLAS tiles the product, so two computations over different row sets (a whole
chunk, the few rows a bound could not clear) may disagree where two
centroids are almost equally near. Here every label is the *exact* nearest:
a row whose two best computed distances lie within twice the proven error
bound (:func:`error_bound`) is settled by direct float64 ‖x − c‖² sums,
ties going to the lowest index. Labels then depend on the data and the
centroids only, never on chunking, row subsets or BLAS, which is what lets
distance bounds skip rows without changing a result.

Compiled with numba (one pass over the (n, ΣK) matrix instead of numpy's
argmin and partition over small axes); ``nogil`` so chunk tasks run in
parallel threads.
"""

from __future__ import annotations

import numba
import numpy as np


def error_bound(xsq: np.ndarray, csq_max: float | np.ndarray, d: int, dtype: np.dtype) -> np.ndarray:
    """Per row, a bound on the error of a computed ‖c‖² − 2x·c (and of ‖x‖² added to it).

    Dot products of length ``d`` in ``dtype`` err by at most γ_d·Σ|x_i c_i| ≤
    γ_d·‖x‖‖c‖ (γ_d = d·u / (1 − d·u), u the unit roundoff), ‖c‖² by γ_d·‖c‖²,
    each addition by u·|result|; with 2‖x‖‖c‖ ≤ ‖x‖² + ‖c‖² the total is
    below (d + 2)·u·(‖x‖² + 2 max‖c‖²) to first order. The factor 1.25 and
    d + 4 cover γ_d's higher-order terms (d·u ≈ 5e-5 for float32) and the
    norms passed in being computed values themselves.
    """
    u = float(np.finfo(dtype).eps) / 2
    return 1.25 * (d + 4) * u * (np.asarray(xsq, dtype=np.float64) + 2.0 * np.asarray(csq_max, dtype=np.float64))


def nearest(
    dist: np.ndarray, offsets: np.ndarray, x: np.ndarray, centroids: np.ndarray, bound: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, R) int64 and second-nearest computed distance (n, R) for a stacked ``dist`` (n, ΣK).

    ``dist`` holds ‖c‖² − 2x·c (‖x‖² left out), ``bound`` the per-row error
    bound of its entries. The second value is a lower bound on the distance
    to every centroid but the chosen one (the smallest computed value when a
    near tie was settled; inf when k = 1).
    """
    labels, second, near = _scan(dist, np.asarray(offsets, dtype=np.int64), 2.0 * bound)
    if near.any():
        rows, runs = np.nonzero(near)
        _settle(np.ascontiguousarray(x), np.ascontiguousarray(centroids, dtype=np.float64), dist,
                np.asarray(offsets, dtype=np.int64), 2.0 * bound, labels, rows, runs)
    return labels, second


@numba.njit(cache=True, nogil=True)
def _scan(dist, offsets, window):  # pragma: no cover - compiled
    n = dist.shape[0]
    r = offsets.size - 1
    labels = np.empty((n, r), dtype=np.int64)
    second = np.empty((n, r), dtype=dist.dtype)
    near = np.zeros((n, r), dtype=np.bool_)
    inf = dist.dtype.type(np.inf)
    for i in range(n):
        row = dist[i]
        for p in range(r):
            lo, hi = offsets[p], offsets[p + 1]
            best = row[lo]
            arg = lo
            sec = inf
            for j in range(lo + 1, hi):  # branch-free: min/max and a select per entry
                v = row[j]
                sec = min(sec, max(best, v))
                arg = j if v < best else arg
                best = min(best, v)
            labels[i, p] = arg - lo
            if sec - best <= window[i]:
                near[i, p] = True
                sec = best  # the settled label may be any near one: only the minimum bounds the others
            second[i, p] = sec
    return labels, second, near


@numba.njit(cache=True, nogil=True)
def _settle(x, c64, dist, offsets, window, labels, rows, runs):  # pragma: no cover - compiled
    d = x.shape[1]
    for t in range(rows.size):
        i, p = rows[t], runs[t]
        lo, hi = offsets[p], offsets[p + 1]
        limit = dist[i, lo + labels[i, p]] + window[i]
        best = np.inf
        arg = -1
        for j in range(lo, hi):
            if dist[i, j] <= limit:
                s = 0.0
                for q in range(d):
                    diff = np.float64(x[i, q]) - c64[j, q]
                    s += diff * diff
                if s < best:
                    best = s
                    arg = j - lo
        labels[i, p] = arg


def squared_errors(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) float64 ‖x_i − z_{label_i}‖², summed directly (no ‖x‖² − 2x·z + ‖z‖² cancellation)."""
    return _squared_errors(np.ascontiguousarray(x), np.ascontiguousarray(centroids, dtype=np.float64),
                           np.ascontiguousarray(labels, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _squared_errors(x, c64, labels):  # pragma: no cover - compiled
    n, d = x.shape
    out = np.empty(n)
    for i in range(n):
        z = c64[labels[i]]
        s = 0.0
        for q in range(d):
            diff = np.float64(x[i, q]) - z[q]
            s += diff * diff
        out[i] = s
    return out



def moved_bounds(
    labels: np.ndarray, upper: np.ndarray, lower: np.ndarray, moved: np.ndarray, offsets: np.ndarray,
    row_slack: np.ndarray, run_slack: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hamerly bounds (n, R) after the centroids moved by ``moved`` (ΣK,), and which (row, run) need a recompute.

    The assigned centroid got farther by at most its own move (upper grows by
    it); every other one came closer by at most the largest move among the
    *others* (lower shrinks by it). A label is kept only when lower² − upper²
    exceeds ``row_slack[i] + run_slack[p]`` (twice the error bound of the
    computed distances the bounds started from).
    """
    return _moved_bounds(labels, upper, lower, moved, np.asarray(offsets, dtype=np.int64), row_slack, run_slack)


@numba.njit(cache=True, nogil=True)
def _moved_bounds(labels, upper, lower, moved, offsets, row_slack, run_slack):  # pragma: no cover - compiled
    n, r = labels.shape
    top_col = np.empty(r, dtype=np.int64)
    top = np.empty(r)
    runner_up = np.zeros(r)
    for p in range(r):
        top_col[p] = offsets[p]
        top[p] = moved[offsets[p]]
        for j in range(offsets[p] + 1, offsets[p + 1]):
            if moved[j] > top[p]:
                runner_up[p] = top[p]
                top[p] = moved[j]
                top_col[p] = j
            elif moved[j] > runner_up[p]:
                runner_up[p] = moved[j]
    new_upper = np.empty((n, r))
    new_lower = np.empty((n, r))
    need = np.empty((n, r), dtype=np.bool_)
    for i in range(n):
        for p in range(r):
            col = offsets[p] + labels[i, p]
            u = upper[i, p] + moved[col]
            lo = lower[i, p] - (runner_up[p] if col == top_col[p] else top[p])
            new_upper[i, p] = u
            new_lower[i, p] = lo
            need[i, p] = not (np.isfinite(u) and lo > u and lo * lo - u * u > row_slack[i] + run_slack[p])
    return new_upper, new_lower, need
