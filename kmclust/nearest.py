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

The same rules serve Hamerly's second step (:func:`reassign`): for a (row,
run) pair whose bounds failed, the exact distance to its centroid first, then
the run's centroids, pair by pair with no GEMM. Also here: the other compiled
loops of a chunk (row norms, row gathers, exact squared errors, bound updates).

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


def assign_rows(
    dist: np.ndarray, offsets: np.ndarray, x: np.ndarray, rows: np.ndarray, runs: np.ndarray,
    c64: np.ndarray, window: np.ndarray, xsq: np.ndarray,
    labels: np.ndarray, dmin: np.ndarray, upper: np.ndarray, lower: np.ndarray,
) -> None:
    """Exact nearest centroid of every (row, run) of a stacked ``dist`` (m, ΣK), written in place.

    ``dist`` holds ‖c‖² − 2x·c (‖x‖² left out) for rows ``rows`` of ``x``
    against the stacked centroids ``c64`` (float64) with ``offsets``;
    ``window`` is twice each row's error bound, ``xsq`` the rows' ‖x‖² in
    ``dist``'s dtype. For stack position p, column ``runs[p]`` of the (n, R)
    outputs receives: the label, the computed squared distance to it
    (clipped at 0), and in float64 its root (an upper bound) and the root of
    the second-nearest computed distance (a lower bound on every other
    centroid: the nearest one's when a near tie was settled; inf when k = 1).
    """
    _assign_rows(dist, np.asarray(offsets, dtype=np.int64), x, np.asarray(rows, dtype=np.int64),
                 np.asarray(runs, dtype=np.int64), c64, window, xsq, labels, dmin, upper, lower)


@numba.njit(cache=True, nogil=True)
def _best_two(row, lo, hi):  # pragma: no cover - compiled
    """Index of the smallest entry of row[lo:hi], its value and the second smallest (branch-free)."""
    best = row[lo]
    arg = lo
    sec = row.dtype.type(np.inf)
    for j in range(lo + 1, hi):
        v = row[j]
        sec = min(sec, max(best, v))
        arg = j if v < best else arg
        best = min(best, v)
    return arg, best, sec


@numba.njit(cache=True, nogil=True)
def _exact_sq(xrow, c, buf):  # pragma: no cover - compiled
    """‖x − c‖² in float64 in a fixed order (eight interleaved partial sums, then a fixed tree).

    The order is written out, not left to the compiler, so the bits do not
    depend on where the row sits in memory. The differences go through the
    float64 scratch ``buf`` (length D) first: both loops then vectorise
    (2.6× the fused loop; the same bits).
    """
    d = xrow.size
    for q in range(d):
        buf[q] = np.float64(xrow[q]) - c[q]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    m = d - d % 8
    for q in range(0, m, 8):
        s0 += buf[q] * buf[q]
        s1 += buf[q + 1] * buf[q + 1]
        s2 += buf[q + 2] * buf[q + 2]
        s3 += buf[q + 3] * buf[q + 3]
        s4 += buf[q + 4] * buf[q + 4]
        s5 += buf[q + 5] * buf[q + 5]
        s6 += buf[q + 6] * buf[q + 6]
        s7 += buf[q + 7] * buf[q + 7]
    for q in range(m, d):
        s0 += buf[q] * buf[q]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True, nogil=True)
def _exact_nearest(xrow, c64, row, lo, hi, limit, buf):  # pragma: no cover - compiled
    """Among the columns whose computed value is within ``limit``: the exact nearest (float64 sums, lowest index)."""
    best = np.inf
    arg = -1
    for j in range(lo, hi):
        if row[j] <= limit:
            s = _exact_sq(xrow, c64[j], buf)
            if s < best:
                best = s
                arg = j
    return arg


@numba.njit(cache=True, nogil=True)
def _assign_rows(dist, offsets, x, rows, runs, c64, window, xsq, labels, dmin, upper, lower):  # pragma: no cover
    zero = dist.dtype.type(0)
    buf = np.empty(x.shape[1])
    for i in range(dist.shape[0]):
        r = rows[i]
        row = dist[i]
        for p in range(offsets.size - 1):
            lo, hi = offsets[p], offsets[p + 1]
            arg, best, sec = _best_two(row, lo, hi)
            if sec - best <= window[i]:  # near tie: settle exactly
                arg = _exact_nearest(x[r], c64, row, lo, hi, best + window[i], buf)
                sec = best  # the settled label may be any near one: only the minimum bounds the others
            d1 = max(row[arg] + xsq[i], zero)
            d2 = max(sec + xsq[i], zero)
            s = runs[p]
            labels[r, s] = arg - lo
            dmin[r, s] = d1
            upper[r, s] = np.sqrt(np.float64(d1))
            lower[r, s] = np.sqrt(np.float64(d2))


def reassign(
    x: np.ndarray, xsq: np.ndarray, centroids: np.ndarray, offsets: np.ndarray, runs: np.ndarray,
    need: np.ndarray, coef: float, labels: np.ndarray, dmin: np.ndarray, upper: np.ndarray, lower: np.ndarray,
) -> None:
    """Hamerly's second step for the (row, run) pairs of ``need`` in stack positions ``runs``, in place.

    A pair whose bounds failed first gets its distance to the assigned
    centroid, computed as one GEMM entry would be (one dot product, off by at
    most :func:`error_bound`, as the computed distance the lower bound came
    from): when the lower bound still clears it by the error window (``coef``
    · (‖x‖² + 2 max‖c‖² of the run), the window of :func:`error_bound`
    doubled), the label stays and the upper bound tightens. Otherwise the row is compared with every centroid of the run:
    float32 dot products in any order (the error bound holds for every
    order), then near ties settled exactly as in :func:`assign_rows`. Per
    pair, no GEMM: the cost follows the pairs, not rows × stack.
    """
    c64 = centroids.astype(np.float64)
    csq = np.einsum("ij,ij->i", centroids, centroids)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    _reassign(x, xsq, centroids, csq, c64, np.asarray(offsets, dtype=np.int64), np.asarray(runs, dtype=np.int64),
              need, coef, csq_max, labels, dmin, upper, lower)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dots(buf, cent, lo, hi, out):  # pragma: no cover - compiled
    """out[j - lo] = buf · cent[j] for j in [lo, hi), four centroids per sweep over ``buf`` (register reuse)."""
    d = buf.size
    j = lo
    while j + 4 <= hi:
        s0 = s1 = s2 = s3 = cent.dtype.type(0)
        for q in range(d):
            v = buf[q]
            s0 += v * cent[j, q]
            s1 += v * cent[j + 1, q]
            s2 += v * cent[j + 2, q]
            s3 += v * cent[j + 3, q]
        out[j - lo] = s0
        out[j - lo + 1] = s1
        out[j - lo + 2] = s2
        out[j - lo + 3] = s3
        j += 4
    while j < hi:
        s0 = cent.dtype.type(0)
        for q in range(d):
            s0 += buf[q] * cent[j, q]
        out[j - lo] = s0
        j += 1


@numba.njit(cache=True, nogil=True)
def _reassign(x, xsq, cent, csq, c64, offsets, runs, need, coef, csq_max,  # pragma: no cover - compiled
              labels, dmin, upper, lower):
    n, d = x.shape
    buf = np.empty(d, dtype=cent.dtype)
    buf64 = np.empty(d)
    dots = np.empty(cent.shape[0], dtype=cent.dtype)
    zero = cent.dtype.type(0)
    two = cent.dtype.type(2)
    inf = cent.dtype.type(np.inf)
    for i in range(n):
        converted = False  # the row in the centroids' dtype, once for all its runs
        for p in runs:
            if not need[i, p]:
                continue
            if not converted:
                for q in range(d):
                    buf[q] = x[i, q]
                converted = True
            lo, hi = offsets[p], offsets[p + 1]
            window = coef * (np.float64(xsq[i]) + 2.0 * csq_max[p])
            a = lo + labels[i, p]
            # computed like a GEMM entry (one dot product): off by at most the error bound, as the lower bound
            e = max(csq[a] - two * _dot(buf, cent[a]) + xsq[i], zero)
            low = lower[i, p]
            if low > 0 and low * low - e > window:  # the label stays: tighten the upper bound
                upper[i, p] = np.sqrt(np.float64(e))
                dmin[i, p] = e
                continue
            _dots(buf, cent, lo, hi, dots)
            best = inf
            sec = inf
            arg = lo
            for j in range(lo, hi):
                v = csq[j] - two * dots[j - lo]
                dots[j - lo] = v
                sec = min(sec, max(best, v))
                arg = j if v < best else arg
                best = min(best, v)
            if sec - best <= window:  # near tie: settle exactly
                limit = best + window
                top = np.inf
                for j in range(lo, hi):
                    if dots[j - lo] <= limit:
                        t = _exact_sq(x[i], c64[j], buf64)
                        if t < top:
                            top = t
                            arg = j
                sec = best
                best = dots[arg - lo]
            d1 = max(best + xsq[i], zero)
            d2 = max(sec + xsq[i], zero)
            labels[i, p] = arg - lo
            dmin[i, p] = d1
            upper[i, p] = np.sqrt(np.float64(d1))
            lower[i, p] = np.sqrt(np.float64(d2))


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(buf, c):  # pragma: no cover - compiled
    """buf · c in their dtype, any order (the error bound holds for every order)."""
    s = c.dtype.type(0)
    for q in range(buf.size):
        s += buf[q] * c[q]
    return s


def take_rows(x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[t] = x[rows[t]] converted to out's dtype, in one compiled pass (numpy gathers, then converts)."""
    _take_rows(x, rows, out)


@numba.njit(cache=True, nogil=True)
def _take_rows(x, rows, out):  # pragma: no cover - compiled
    for t in range(rows.size):
        r = rows[t]
        for q in range(x.shape[1]):
            out[t, q] = x[r, q]


def row_norms(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(n,) ‖x_i‖² in ``dtype``: summed exactly for integer pixels, in ``dtype`` otherwise."""
    if x.dtype == np.uint8:
        return _row_norms_u8(np.ascontiguousarray(x)).astype(dtype)
    xf = x.astype(dtype, copy=False)
    return np.einsum("ij,ij->i", xf, xf)


@numba.njit(cache=True, nogil=True)
def _row_norms_u8(x):  # pragma: no cover - compiled
    out = np.empty(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        s = 0
        for q in range(x.shape[1]):
            v = np.int64(x[i, q])
            s += v * v
        out[i] = s
    return out


def runs_missing_a_label(labels: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """(R,) bool: run p's column of ``labels`` (n, R) lacks one of its labels 0 … ks[p] − 1.

    Scans each column only until every label has been seen (a few dozen rows
    for a run without empty clusters), where a bincount reads all n · R.
    """
    return _runs_missing_a_label(labels, np.asarray(ks, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _runs_missing_a_label(labels, ks):  # pragma: no cover - compiled
    n, r = labels.shape
    out = np.zeros(r, dtype=np.bool_)
    for p in range(r):
        seen = np.zeros(ks[p], dtype=np.bool_)
        left = ks[p]
        for i in range(n):
            lab = labels[i, p]
            if not seen[lab]:
                seen[lab] = True
                left -= 1
                if left == 0:
                    break
        out[p] = left > 0
    return out


def squared_errors(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) float64 ‖x_i − z_{label_i}‖², summed directly (no ‖x‖² − 2x·z + ‖z‖² cancellation)."""
    return _squared_errors(np.ascontiguousarray(x), np.ascontiguousarray(centroids, dtype=np.float64),
                           np.ascontiguousarray(labels, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _squared_errors(x, c64, labels):  # pragma: no cover - compiled
    out = np.empty(x.shape[0])
    buf = np.empty(x.shape[1])
    for i in range(x.shape[0]):
        out[i] = _exact_sq(x[i], c64[labels[i]], buf)
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


def signed_row_sums(x: np.ndarray, rows: np.ndarray, slots: np.ndarray, signs: np.ndarray, n_slots: int) -> np.ndarray:
    """(n_slots, D) int32: Σ signs[t] · x[rows[t]] into row ``slots[t]``, for uint8 ``x``.

    Integer accumulators (int32: a chunk of fewer than 2**31 / 255 rows
    cannot overflow), so the sums are exact in any order; one compiled pass
    over the pairs, no sparse matrix to build. Kept int32: half the bytes of
    float64 to move from a worker to the driver.
    """
    return _signed_row_sums(np.ascontiguousarray(x), np.asarray(rows, dtype=np.int64),
                            np.asarray(slots, dtype=np.int64), np.asarray(signs, dtype=np.int8), n_slots)


@numba.njit(cache=True, nogil=True)
def _signed_row_sums(x, rows, slots, signs, n_slots):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.zeros((n_slots, d), dtype=np.int32)
    for t in range(rows.size):
        r, s = rows[t], slots[t]
        if signs[t] > 0:
            for q in range(d):
                out[s, q] += np.int32(x[r, q])
        else:
            for q in range(d):
                out[s, q] -= np.int32(x[r, q])
    return out


def add_rows(out: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
    """out[idx[t]] += rows[t] in place (``idx`` unique), in one compiled pass; the same bits as numpy's."""
    _add_rows(out, np.asarray(idx, dtype=np.int64), np.ascontiguousarray(rows))


@numba.njit(cache=True, nogil=True)
def _add_rows(out, idx, rows):  # pragma: no cover - compiled
    for t in range(idx.size):
        o = out[idx[t]]
        r = rows[t]
        for q in range(r.size):
            o[q] += r[q]
