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
run) pair whose bounds failed, the distance to its centroid first, then the
runner-up's or the whole run's, pair by pair with no GEMM; with a lower bound
per centroid (Elkan, :func:`reassign_centroids`), only those of the
centroids whose bound failed. Also here: the
other compiled loops of a chunk (uint8 rows' distances in place of the GEMM,
row norms, row gathers, exact squared errors and their exact sums, bound
updates, adding partial sums).

Compiled with numba (one pass over the (n, ΣK) matrix instead of numpy's
argmin and partition over small axes); ``nogil`` so chunk tasks run in
parallel threads.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numba
import numpy as np


def error_bound(
    xsq: np.ndarray, csq_max: float | np.ndarray, d: int, dtype: np.dtype
) -> np.ndarray:
    """Per row, a bound on the error of a computed ‖c‖² − 2x·c (and of ‖x‖² added to it).

    Dot products of length ``d`` in ``dtype`` err by at most γ_d·Σ|x_i c_i| ≤
    γ_d·‖x‖‖c‖ (γ_d = d·u / (1 − d·u), u the unit roundoff), ‖c‖² by γ_d·‖c‖²,
    each addition by u·|result|; with 2‖x‖‖c‖ ≤ ‖x‖² + ‖c‖² the total is
    below (d + 2)·u·(‖x‖² + 2 max‖c‖²) to first order. The factor 1.25 and
    d + 4 cover γ_d's higher-order terms (d·u ≈ 5e-5 for float32) and the
    norms passed in being computed values themselves.
    """
    u = float(np.finfo(dtype).eps) / 2
    return (
        1.25
        * (d + 4)
        * u
        * (np.asarray(xsq, dtype=np.float64) + 2.0 * np.asarray(csq_max, dtype=np.float64))
    )


def assign_rows(
    dist: np.ndarray,
    offsets: np.ndarray,
    x: np.ndarray,
    rows: np.ndarray,
    runs: np.ndarray,
    c64: np.ndarray,
    window: np.ndarray,
    xsq: np.ndarray,
    labels: np.ndarray,
    dmin: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    second: np.ndarray,
    cbound: np.ndarray | None = None,
    col0: np.ndarray | None = None,
) -> None:
    """Exact nearest centroid of every (row, run) of a stacked ``dist`` (m, ΣK), written in place.

    ``dist`` holds ‖c‖² − 2x·c (‖x‖² left out) for rows ``rows`` of ``x``
    against the stacked centroids ``c64`` (float64) with ``offsets``;
    ``window`` is twice each row's error bound, ``xsq`` the rows' ‖x‖² in
    ``dist``'s dtype. For stack position p, column ``runs[p]`` of the (n, R)
    outputs receives: the label, the computed squared distance to it
    (clipped at 0), in float64 its root (an upper bound), and the two lower
    bounds of :func:`moved_bounds`: ``second``, the second-nearest centroid
    (local index), with the root of its computed distance in
    ``lower[..., 0]``, and the root of the third-nearest in ``lower[..., 1]``
    (below every centroid but those two). When a near tie was settled,
    ``second`` is −1 and both hold the nearest computed distance (below
    every other centroid). inf where the run has no such centroid.
    With ``cbound`` (n, ΣK) float32, stack position p's centroids also get
    per-centroid lower bounds (the roots of their computed distances, rounded
    down) in the columns from ``col0[p]`` on (:func:`moved_centroid_bounds`).
    """
    if cbound is None:
        cbound, col0 = np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    _assign_rows(
        dist,
        np.asarray(offsets, dtype=np.int64),
        x,
        np.asarray(rows, dtype=np.int64),
        np.asarray(runs, dtype=np.int64),
        c64,
        window,
        xsq,
        labels,
        dmin,
        upper,
        lower,
        second,
        cbound,
        np.asarray(col0, dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
def _down32(v):  # pragma: no cover - compiled
    """A float32 at most max(v, 0): a lower bound stays a lower bound in half the bytes."""
    f = np.float32(max(v, 0.0) * (1.0 - 2.0**-22))
    return f if np.float64(f) <= v else np.float32(0)


@numba.njit(cache=True, nogil=True)
def _up32(v):  # pragma: no cover - compiled
    """The smallest float32 at least v (inf beyond float32's range): a limit compared with float32 bounds."""
    f = np.float32(v) if v < 3.0e38 else np.float32(np.inf)
    return np.nextafter(f, np.float32(np.inf)) if np.float64(f) < v else f


@numba.njit(cache=True, nogil=True)
def _best_three(row, lo, hi):  # pragma: no cover - compiled
    """In row[lo:hi]: the index of the smallest entry (the first of equals), its value, the index and value of
    the second smallest, and the third smallest value (index −1, value inf where there is none). Branch-free
    (selects): the comparisons follow the data, which no branch predictor guesses."""
    inf = row.dtype.type(np.inf)
    b1 = row[lo]
    b2 = b3 = inf
    i1 = lo
    i2 = -1
    for j in range(lo + 1, hi):
        v = row[j]
        below1 = v < b1
        below2 = v < b2
        i2 = i1 if below1 else (j if below2 else i2)
        i1 = j if below1 else i1
        b3 = min(b3, max(b2, v))
        b2 = min(b2, max(b1, v))
        b1 = min(b1, v)
    return i1, b1, i2, b2, b3


@numba.njit(cache=True, nogil=True)
def _set_bounds(
    labels, dmin, upper, lower, second, r, s, arg, lo, d1, sec_arg, d2, d3
):  # pragma: no cover
    """Write one (row, run)'s label, computed squared distance, upper bound and the two lower bounds."""
    labels[r, s] = arg - lo
    dmin[r, s] = d1
    upper[r, s] = np.sqrt(np.float64(d1))
    second[r, s] = sec_arg - lo if sec_arg >= 0 else -1
    lower[r, s, 0] = np.sqrt(np.float64(d2))
    lower[r, s, 1] = np.sqrt(np.float64(d3))


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
def _assign_rows(
    dist,
    offsets,
    x,
    rows,
    runs,
    c64,
    window,
    xsq,
    labels,
    dmin,
    upper,
    lower,  # pragma: no cover
    second,
    cbound,
    col0,
):
    zero = dist.dtype.type(0)
    buf = np.empty(x.shape[1])
    for i in range(dist.shape[0]):
        r = rows[i]
        row = dist[i]
        for p in range(offsets.size - 1):
            lo, hi = offsets[p], offsets[p + 1]
            arg, best, sec_arg, sec, third = _best_three(row, lo, hi)
            if sec - best <= window[i]:  # near tie: settle exactly
                arg = _exact_nearest(x[r], c64, row, lo, hi, best + window[i], buf)
                sec_arg = (
                    -1
                )  # the settled label may be any near one: only the minimum bounds the others
                sec = third = best
            _set_bounds(
                labels,
                dmin,
                upper,
                lower,
                second,
                r,
                runs[p],
                arg,
                lo,
                max(row[arg] + xsq[i], zero),
                sec_arg,
                max(sec + xsq[i], zero),
                max(third + xsq[i], zero),
            )
            if cbound.shape[0] > 0:
                c0 = col0[p] - lo
                for j in range(lo, hi):
                    cbound[r, c0 + j] = _down32(
                        np.sqrt(max(np.float64(row[j]) + np.float64(xsq[i]), 0.0))
                    )


def reassign(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    runs: np.ndarray,
    need: np.ndarray,
    coef: float,
    labels: np.ndarray,
    dmin: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    second: np.ndarray,
) -> None:
    """Hamerly's second step for the (row, run) pairs of ``need`` in stack positions ``runs``, in place.

    A pair whose bounds failed first gets its distance to the assigned
    centroid, computed as one GEMM entry would be (one dot product, off by at
    most :func:`error_bound`, as the computed distance the lower bound came
    from): when the lower bounds (:func:`moved_bounds`) still clear it by the
    error window (``coef`` · (‖x‖² + 2 max‖c‖² of the run), the window of
    :func:`error_bound` doubled), the label stays and the upper bound
    tightens. When only the runner-up's bound fails, its distance alone
    decides between the two. Otherwise the row is compared with every
    centroid of the run: float32 dot products in any order (the error bound
    holds for every order), then near ties settled exactly and the bounds
    renewed as in :func:`assign_rows`. Per pair, no GEMM: the cost follows
    the pairs, not rows × stack.
    """
    c64 = centroids.astype(np.float64)
    csq = np.einsum("ij,ij->i", centroids, centroids)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    _reassign(
        x,
        xsq,
        centroids,
        csq,
        c64,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(runs, dtype=np.int64),
        need,
        coef,
        csq_max,
        labels,
        dmin,
        upper,
        lower,
        second,
    )


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
def _load_row(x, i, buf, loaded):  # pragma: no cover - compiled
    """Row i of x into ``buf`` in its dtype unless ``loaded`` (once for all the row's runs); returns True."""
    if not loaded:
        for q in range(x.shape[1]):
            buf[q] = x[i, q]
    return True


@numba.njit(cache=True, nogil=True)
def _computed_sq(buf, cent, csq, xsq_i, j):  # pragma: no cover - compiled
    """‖x − c_j‖² as a GEMM entry computes it (one dot product in the centroids' dtype), clipped at 0: off by at
    most :func:`error_bound`, as the distances the bounds came from."""
    return max(csq[j] - cent.dtype.type(2) * _dot(buf, cent[j]) + xsq_i, cent.dtype.type(0))


@numba.njit(cache=True, nogil=True)
def _pair_start(
    buf, cent, csq, xsq_i, csq_max_p, coef, offsets, p, label
):  # pragma: no cover - compiled
    """What both per-pair steps start from for row ``buf`` in stack position p: its columns ``lo, hi``, the error
    ``window``, the assigned column ``a`` and the computed distance ``e`` to it (as :func:`_computed_sq`)."""
    lo, hi = offsets[p], offsets[p + 1]
    a = lo + label
    return (
        lo,
        hi,
        coef * (np.float64(xsq_i) + 2.0 * csq_max_p),
        a,
        _computed_sq(buf, cent, csq, xsq_i, a),
    )


@numba.njit(cache=True, nogil=True)
def _reassign(
    x,
    xsq,
    cent,
    csq,
    c64,
    offsets,
    runs,
    need,
    coef,
    csq_max,  # pragma: no cover - compiled
    labels,
    dmin,
    upper,
    lower,
    second,
):
    n, d = x.shape
    buf = np.empty(d, dtype=cent.dtype)
    buf64 = np.empty(d)
    dots = np.empty(cent.shape[0], dtype=cent.dtype)
    zero = cent.dtype.type(0)
    two = cent.dtype.type(2)
    for i in range(n):
        loaded = False
        for p in runs:
            if not need[i, p]:
                continue
            loaded = _load_row(x, i, buf, loaded)
            lo, hi, window, a, e = _pair_start(
                buf, cent, csq, xsq[i], csq_max[p], coef, offsets, p, labels[i, p]
            )
            l0, l1 = lower[i, p, 0], lower[i, p, 1]
            rest_clear = l1 > 0 and l1 * l1 - e > window
            if (
                rest_clear and l0 > 0 and l0 * l0 - e > window
            ):  # the label stays: tighten the upper bound
                upper[i, p] = np.sqrt(np.float64(e))
                dmin[i, p] = e
                continue
            if (
                rest_clear and second[i, p] >= 0
            ):  # only the runner-up may be nearer: one more distance
                b = lo + second[i, p]
                v = _computed_sq(buf, cent, csq, xsq[i], b)
                tie = abs(np.float64(v) - np.float64(e)) <= window
                if tie:  # settle exactly, the lower index first
                    ta, tb = _exact_sq(x[i], c64[a], buf64), _exact_sq(x[i], c64[b], buf64)
                    win_b = tb < ta or (tb == ta and b < a)
                else:
                    win_b = v < e
                near, far = (v, e) if win_b else (e, v)
                labels[i, p] = (b if win_b else a) - lo
                dmin[i, p] = near
                upper[i, p] = np.sqrt(np.float64(near))
                if tie:  # as after any settled tie: the smaller computed distance bounds both, l1 the rest
                    second[i, p] = -1
                    lower[i, p, 0] = lower[i, p, 1] = min(np.sqrt(np.float64(min(v, e))), l1)
                else:  # the other one is the runner-up; the rest keep their bound
                    second[i, p] = (a if win_b else b) - lo
                    lower[i, p, 0] = np.sqrt(np.float64(far))
                continue
            _dots(buf, cent, lo, hi, dots)
            for j in range(lo, hi):
                dots[j - lo] = csq[j] - two * dots[j - lo]
            arg, best, sec_arg, sec, third = _best_three(dots, 0, hi - lo)
            arg += lo
            sec_arg = sec_arg + lo if sec_arg >= 0 else -1
            if sec - best <= window:  # near tie: settle exactly
                limit = best + window
                top = np.inf
                for j in range(lo, hi):
                    if dots[j - lo] <= limit:
                        t = _exact_sq(x[i], c64[j], buf64)
                        if t < top:
                            top = t
                            arg = j
                sec_arg = -1
                sec = third = best
            _set_bounds(
                labels,
                dmin,
                upper,
                lower,
                second,
                i,
                p,
                arg,
                lo,
                max(dots[arg - lo] + xsq[i], zero),
                sec_arg,
                max(sec + xsq[i], zero),
                max(third + xsq[i], zero),
            )


def reassign_centroids(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    runs: np.ndarray,
    need: np.ndarray,
    coef: float,
    labels: np.ndarray,
    dmin: np.ndarray,
    upper: np.ndarray,
    cbound: np.ndarray,
) -> None:
    """Elkan's second step for the (row, run) pairs of ``need``, with per-centroid lower bounds, in place.

    The distance to the assigned centroid comes first (one dot product, as
    in :func:`reassign`); then only the run's centroids whose bound in
    ``cbound`` (n, ΣK) does not clear it by the error window get theirs, which
    also renews their bound. The label is the nearest of those computed,
    near ties settled exactly (lowest index first), as in
    :func:`assign_rows`. With many centroids per run few of them fail their
    bound: the cost follows those, not the run's k.
    """
    c64 = centroids.astype(np.float64)
    csq = np.einsum("ij,ij->i", centroids, centroids)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    _reassign_centroids(
        x,
        xsq,
        centroids,
        csq,
        c64,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(runs, dtype=np.int64),
        need,
        coef,
        csq_max,
        labels,
        dmin,
        upper,
        cbound,
    )


@numba.njit(cache=True, nogil=True)
def _reassign_centroids(
    x,
    xsq,
    cent,
    csq,
    c64,
    offsets,
    runs,
    need,
    coef,
    csq_max,  # pragma: no cover - compiled
    labels,
    dmin,
    upper,
    cbound,
):
    n, d = x.shape
    buf = np.empty(d, dtype=cent.dtype)
    buf64 = np.empty(d)
    vals = np.empty(
        cent.shape[0]
    )  # computed squared distances of the checked centroids (inf: proven farther)
    cand = np.empty(cent.shape[0], dtype=np.int64)  # the centroids to check
    dots = np.empty(cent.shape[0], dtype=cent.dtype)
    zero = cent.dtype.type(0)
    two = cent.dtype.type(2)
    for i in range(n):
        loaded = False
        for p in runs:
            if not need[i, p]:
                continue
            loaded = _load_row(x, i, buf, loaded)
            lo, hi, window, a, e = _pair_start(
                buf, cent, csq, xsq[i], csq_max[p], coef, offsets, p, labels[i, p]
            )
            e = np.float64(e)
            best = e
            # centroid j is proven farther than the assigned one when its bound exceeds √(e + window) (then
            # bound² − e > window): compared in float32 with that limit rounded up, branch-free
            limit = _up32(np.sqrt(e + window))
            m = 0
            for j in range(
                lo, hi
            ):  # the others than the assigned one whose bound does not clear the limit
                vals[j] = np.inf
                cand[m] = j
                m += (cbound[i, j] <= limit) & (j != a)
            _dots_at(buf, cent, cand, m, dots)
            for t in range(m):
                j = cand[t]
                v = np.float64(max(csq[j] - two * dots[t] + xsq[i], zero))
                vals[j] = v
                cbound[i, j] = _down32(np.sqrt(v))
                best = min(best, v)
            vals[a] = e
            cbound[i, a] = _down32(np.sqrt(e))
            limit = best + window
            arg = -1
            ties = 0
            for j in range(lo, hi):
                if vals[j] <= limit:
                    ties += 1
                    if arg < 0 or vals[j] < vals[arg]:
                        arg = j
            if ties > 1:  # near tie: settle exactly, the lowest index first
                top = np.inf
                for j in range(lo, hi):
                    if vals[j] <= limit:
                        t = _exact_sq(x[i], c64[j], buf64)
                        if t < top:
                            top = t
                            arg = j
            labels[i, p] = arg - lo
            dmin[i, p] = vals[arg]
            upper[i, p] = np.sqrt(vals[arg])


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dots_at(buf, cent, idx, m, out):  # pragma: no cover - compiled
    """out[t] = buf · cent[idx[t]] for t < m, four centroids per sweep over ``buf`` (as :func:`_dots`)."""
    d = buf.size
    t = 0
    while t + 4 <= m:
        c0, c1, c2, c3 = cent[idx[t]], cent[idx[t + 1]], cent[idx[t + 2]], cent[idx[t + 3]]
        s0 = s1 = s2 = s3 = cent.dtype.type(0)
        for q in range(d):
            v = buf[q]
            s0 += v * c0[q]
            s1 += v * c1[q]
            s2 += v * c2[q]
            s3 += v * c3[q]
        out[t] = s0
        out[t + 1] = s1
        out[t + 2] = s2
        out[t + 3] = s3
        t += 4
    while t < m:
        out[t] = _dot(buf, cent[idx[t]])
        t += 1


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(buf, c):  # pragma: no cover - compiled
    """buf · c in their dtype, any order (the error bound holds for every order)."""
    s = c.dtype.type(0)
    for q in range(buf.size):
        s += buf[q] * c[q]
    return s


def pixel_distances(x: np.ndarray, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(m, KT) ‖c‖² − 2x·c of uint8 rows ``x[rows]`` against ``centroids``, in the centroids' dtype.

    What a GEMM of the converted rows gives, off by at most :func:`error_bound`
    as well (sums in any order), from a compiled kernel: six rows converted
    into a small buffer, then four centroids at a time, 24 sums held in
    registers. For thin stacks (a run of k=20) it does 1.3× the flops of
    OpenBLAS's product of converted blocks (which packs the whole block for
    20 columns); stacks of 256 and 1,200 centroids are on a par (the 96-run
    grid as fast). A row's values do not depend on the other rows.
    """
    kt = centroids.shape[0]
    ct2 = np.zeros((-(-kt // 4) * 4, x.shape[1]), dtype=centroids.dtype)
    ct2[:kt] = centroids * -2.0  # exact
    csq = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty((rows.size, kt), dtype=centroids.dtype)
    _pixel_distances(x, np.asarray(rows, dtype=np.int64), ct2, csq, out)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _pixel_distances(x, rows, ct2, csq, out):  # pragma: no cover - compiled
    m, kt = out.shape
    d = x.shape[1]
    zero = ct2.dtype.type(0)
    buf = np.zeros((6, d), dtype=ct2.dtype)
    tile = np.empty((6, 4), dtype=ct2.dtype)
    for i0 in range(0, m, 6):
        h = min(6, m - i0)
        for r in range(h):
            src = x[rows[i0 + r]]  # one row index, not one per element: the copy then vectorises
            for q in range(d):
                buf[r, q] = src[q]
        for r in range(h, 6):  # the last rows: zeros, not written out
            buf[r, :] = zero
        b0, b1, b2, b3, b4, b5 = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5]
        for j0 in range(0, ct2.shape[0], 4):
            c0, c1, c2, c3 = ct2[j0], ct2[j0 + 1], ct2[j0 + 2], ct2[j0 + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = zero
            s30 = s31 = s32 = s33 = s40 = s41 = s42 = s43 = s50 = s51 = s52 = s53 = zero
            for q in range(d):
                w0, w1, w2, w3 = c0[q], c1[q], c2[q], c3[q]
                v = b0[q]
                s00 += v * w0
                s01 += v * w1
                s02 += v * w2
                s03 += v * w3  # noqa: E702
                v = b1[q]
                s10 += v * w0
                s11 += v * w1
                s12 += v * w2
                s13 += v * w3  # noqa: E702
                v = b2[q]
                s20 += v * w0
                s21 += v * w1
                s22 += v * w2
                s23 += v * w3  # noqa: E702
                v = b3[q]
                s30 += v * w0
                s31 += v * w1
                s32 += v * w2
                s33 += v * w3  # noqa: E702
                v = b4[q]
                s40 += v * w0
                s41 += v * w1
                s42 += v * w2
                s43 += v * w3  # noqa: E702
                v = b5[q]
                s50 += v * w0
                s51 += v * w1
                s52 += v * w2
                s53 += v * w3  # noqa: E702
            if h == 6 and j0 + 4 <= kt:
                _put4(out, i0, j0, csq, s00, s01, s02, s03)
                _put4(out, i0 + 1, j0, csq, s10, s11, s12, s13)
                _put4(out, i0 + 2, j0, csq, s20, s21, s22, s23)
                _put4(out, i0 + 3, j0, csq, s30, s31, s32, s33)
                _put4(out, i0 + 4, j0, csq, s40, s41, s42, s43)
                _put4(out, i0 + 5, j0, csq, s50, s51, s52, s53)
                continue
            tile[0, 0], tile[0, 1], tile[0, 2], tile[0, 3] = s00, s01, s02, s03
            tile[1, 0], tile[1, 1], tile[1, 2], tile[1, 3] = s10, s11, s12, s13
            tile[2, 0], tile[2, 1], tile[2, 2], tile[2, 3] = s20, s21, s22, s23
            tile[3, 0], tile[3, 1], tile[3, 2], tile[3, 3] = s30, s31, s32, s33
            tile[4, 0], tile[4, 1], tile[4, 2], tile[4, 3] = s40, s41, s42, s43
            tile[5, 0], tile[5, 1], tile[5, 2], tile[5, 3] = s50, s51, s52, s53
            for r in range(h):  # the last rows or centroids
                for j in range(j0, min(j0 + 4, kt)):
                    out[i0 + r, j] = tile[r, j - j0] + csq[j]


@numba.njit(cache=True, nogil=True)
def _put4(out, i, j0, csq, s0, s1, s2, s3):  # pragma: no cover - compiled
    out[i, j0] = s0 + csq[j0]
    out[i, j0 + 1] = s1 + csq[j0 + 1]
    out[i, j0 + 2] = s2 + csq[j0 + 2]
    out[i, j0 + 3] = s3 + csq[j0 + 3]


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
    return _squared_errors(
        np.ascontiguousarray(x),
        np.ascontiguousarray(centroids, dtype=np.float64),
        np.ascontiguousarray(labels, dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
def _squared_errors(x, c64, labels):  # pragma: no cover - compiled
    out = np.empty(x.shape[0])
    buf = np.empty(x.shape[1])
    for i in range(x.shape[0]):
        out[i] = _exact_sq(x[i], c64[labels[i]], buf)
    return out


def exact_sum(v: np.ndarray) -> Fraction:
    """The exact sum of float64 values, as a Fraction (no rounding: the same whatever the order or grouping).

    Each value is an integer mantissa times a power of two; mantissas are
    added in int64 per exponent (split in two halves: no overflow below 2**36
    values), then joined exactly. Sums of chunks add up to the sum of the
    whole whatever the chunking, which lets chunk sizes follow the thread
    count without changing a bit of J. Non-finite values give their float sum.
    """
    v = np.ascontiguousarray(v, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        return float(v.sum())
    hi, lo = _exact_sum(v)
    used = np.flatnonzero(hi | lo)
    if not used.size:
        return Fraction(0)
    low = int(used[0]) - _EXP_OFFSET - 53  # every touched bucket is a multiple of 2**low
    total = sum(((int(hi[b]) << 26) + int(lo[b])) << (int(b) - int(used[0])) for b in used)
    return Fraction(total << low) if low >= 0 else Fraction(total, 1 << -low)


_EXP_OFFSET = 1100  # frexp's exponents of finite float64 lie in [-1073, 1024]


@numba.njit(cache=True, nogil=True)
def _exact_sum(v):  # pragma: no cover - compiled
    hi = np.zeros(2 * _EXP_OFFSET, dtype=np.int64)
    lo = np.zeros(2 * _EXP_OFFSET, dtype=np.int64)
    for t in range(v.size):
        m, e = math.frexp(v[t])
        q = np.int64(m * 9007199254740992.0)  # m · 2**53: exact, |q| < 2**53
        hi[e + _EXP_OFFSET] += q >> 26
        lo[e + _EXP_OFFSET] += q & 67108863  # q = hi · 2**26 + lo, lo ≥ 0
    return hi, lo


def moved_bounds(
    labels: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    second: np.ndarray,
    moved: np.ndarray,
    offsets: np.ndarray,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds after the centroids moved by ``moved`` (ΣK,), and which (row, run) need a recompute.

    The assigned centroid got farther by at most its own move (``upper``
    (n, R) grows by it). Two lower bounds (``lower`` (n, R, 2)): the
    second-nearest centroid (``second``, local index) came closer by at most
    its own move, every other one by at most the largest move among the
    centroids other than those two (−1 in ``second``: both bounds cover every
    centroid but the assigned one and shrink by the largest move among
    those). Tracking the second-nearest apart keeps a row whose runner-up
    barely moved from paying for the run's largest move (Hamerly's single
    bound). A label is kept only when the smaller bound's square minus
    upper² exceeds ``row_slack[i] + run_slack[p]`` (twice the error bound of
    the computed distances the bounds started from).
    """
    return _moved_bounds(
        labels,
        upper,
        lower,
        second,
        moved,
        np.asarray(offsets, dtype=np.int64),
        row_slack,
        run_slack,
    )


@numba.njit(cache=True, nogil=True)
def _moved_bounds(
    labels, upper, lower, second, moved, offsets, row_slack, run_slack
):  # pragma: no cover
    n, r = labels.shape
    top = np.zeros(
        (r, 3)
    )  # the three largest moves of each run (0: none) and the columns of the first two
    col = np.full((r, 2), -1, dtype=np.int64)
    for p in range(r):
        for j in range(offsets[p], offsets[p + 1]):
            v = moved[j]
            if col[p, 0] < 0 or v > top[p, 0]:
                top[p, 2], top[p, 1], col[p, 1], top[p, 0], col[p, 0] = (
                    top[p, 1],
                    top[p, 0],
                    col[p, 0],
                    v,
                    j,
                )
            elif col[p, 1] < 0 or v > top[p, 1]:
                top[p, 2], top[p, 1], col[p, 1] = top[p, 1], v, j
            elif v > top[p, 2]:
                top[p, 2] = v
    new_upper = np.empty((n, r))
    new_lower = np.empty((n, r, 2))
    need = np.empty((n, r), dtype=np.bool_)
    for i in range(n):
        for p in range(r):
            lo = offsets[p]
            a = lo + labels[i, p]
            u = upper[i, p] + moved[a]
            c1, c2 = col[p, 0], col[p, 1]
            if second[i, p] >= 0:  # the largest move among the others than a and b
                b = lo + second[i, p]
                rest = (
                    top[p, 0]
                    if c1 != a and c1 != b
                    else (top[p, 1] if c2 != a and c2 != b else top[p, 2])
                )
                l0 = lower[i, p, 0] - moved[b]
            else:  # ... than a
                rest = top[p, 1] if c1 == a else top[p, 0]
                l0 = lower[i, p, 0] - rest
            l1 = lower[i, p, 1] - rest
            new_upper[i, p] = u
            new_lower[i, p, 0] = l0
            new_lower[i, p, 1] = l1
            low = min(l0, l1)
            need[i, p] = not (
                np.isfinite(u) and low > u and low * low - u * u > row_slack[i] + run_slack[p]
            )
    return new_upper, new_lower, need


def moved_centroid_bounds(
    labels: np.ndarray,
    upper: np.ndarray,
    cbound: np.ndarray,
    moved: np.ndarray,
    offsets: np.ndarray,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elkan's bounds after the centroids moved by ``moved`` (ΣK,), and which (row, run) need a recompute.

    The assigned centroid got farther by at most its own move (``upper`` (n,
    R) grows by it: returned new); every centroid j came closer by at most
    its own move (``cbound`` (n, ΣK) float32 shrinks by it *in place*,
    rounded down: a bound lowered twice, as by a retried task, is still a
    bound). A label is kept when every other centroid's bound² − upper²
    exceeds ``row_slack[i] + run_slack[p]``, as in :func:`moved_bounds`.
    Returns the new upper bounds, ``need`` (n, R) and per pair how many
    centroids failed (what :func:`reassign_centroids` would compute besides
    the assigned one).
    """
    return _moved_centroid_bounds(
        labels, upper, cbound, moved, np.asarray(offsets, dtype=np.int64), row_slack, run_slack
    )


@numba.njit(cache=True, nogil=True)
def _moved_centroid_bounds(
    labels, upper, cbound, moved, offsets, row_slack, run_slack
):  # pragma: no cover
    n, r = labels.shape
    new_upper = np.empty((n, r))
    need = np.empty((n, r), dtype=np.bool_)
    fails = np.empty((n, r), dtype=np.int32)
    shift = moved.astype(np.float32)
    for j in range(
        shift.size
    ):  # float32 moves rounded up: the float32 difference below only rounds down more
        if np.float64(shift[j]) < moved[j]:
            shift[j] = np.nextafter(shift[j], np.float32(np.inf))
    down = np.float32(1.0 - 2.0**-22)
    zero = np.float32(0)
    for i in range(n):
        row = cbound[i]
        for p in range(r):
            lo, hi = offsets[p], offsets[p + 1]
            a = lo + labels[i, p]
            u = upper[i, p] + moved[a]
            new_upper[i, p] = u
            # a bound clears when it exceeds √(u² + slack) (then it exceeds u and its square clears u² by the
            # slack), compared in float32 with that limit rounded up
            limit = _up32(np.sqrt(u * u + row_slack[i] + run_slack[p]))
            bad = 0
            for j in range(lo, hi):
                low = max((row[j] - shift[j]) * down, zero)  # float32, rounded down by the factor
                row[j] = low
                bad += low <= limit
            bad -= row[a] <= limit
            fails[i, p] = bad
            need[i, p] = bad > 0 or not np.isfinite(u)
    return new_upper, need, fails


def signed_row_sums(
    x: np.ndarray, rows: np.ndarray, slots: np.ndarray, signs: np.ndarray, n_slots: int
) -> np.ndarray:
    """(n_slots, D) int32: Σ signs[t] · x[rows[t]] into row ``slots[t]``, for uint8 ``x``.

    Integer accumulators (int32: a chunk of fewer than 2**31 / 255 rows
    cannot overflow), so the sums are exact in any order; one compiled pass
    over the pairs, no sparse matrix to build. Kept int32: half the bytes of
    float64 to move from a worker to the driver.
    """
    return _signed_row_sums(
        np.ascontiguousarray(x),
        np.asarray(rows, dtype=np.int64),
        np.asarray(slots, dtype=np.int64),
        np.asarray(signs, dtype=np.int8),
        n_slots,
    )


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
