"""The exact nearest-centroid rules, and the per-pair steps that apply them where bounds failed.

The GEMM gives each distance with a rounding error that depends on how the
BLAS tiles the product, so two computations over different row sets (a whole
chunk, the few rows a bound could not clear) may disagree where two
centroids are almost equally near. Here every label is the *exact* nearest:
where the best computed distances lie within twice the proven error bound
(:func:`kmclust.lloyd.distance.error_bound`), the near ones are compared by
direct float64 ‖x − c‖² sums (:func:`settle_tie`), ties going to the lowest
index. Labels then depend on the data and the centroids only, never on
chunking, row subsets or BLAS, which is what lets distance bounds
(:mod:`kmclust.lloyd.bounds`) skip rows without changing a result. The same
rules (:func:`best_three`, :func:`settle_tie`, :func:`set_bounds`) serve the
whole chunk's assignment from its distance matrix
(:func:`kmclust.lloyd.assign.assign_rows`) and the two second steps here.

Hamerly's second step (:func:`reassign`): for a (row, run) pair whose bounds
failed, the distance to its centroid first, then the runner-up's or the
whole run's, pair by pair with no GEMM. Elkan's (:func:`reassign_centroids`):
with a lower bound per centroid, only the distances of the centroids whose
bound failed.

Compiled with numba; ``nogil`` so chunk tasks run in parallel threads.
numba's cache follows each function's own file only, and a caller's cached
code holds its compiled callees: after editing a compiled helper here, in
:mod:`~kmclust.lloyd.distance`, :mod:`~kmclust.lloyd.exact` or
:mod:`~kmclust.lloyd.bounds`, delete ``kmclust/lloyd/__pycache__``.
"""

from __future__ import annotations

import numba
import numpy as np

from kmclust.lloyd.bounds import down32, up32
from kmclust.lloyd.distance import computed_sq, dots, dots_at
from kmclust.lloyd.exact import exact_sq


@numba.njit(cache=True, nogil=True)
def best_three(row, lo, hi):  # pragma: no cover - compiled
    """The three smallest of row[lo:hi]: (i1, v1, i2, v2, v3), indices of the first two.

    i1 is the first of equal minima; where there is no second or third
    entry, i2 is −1 and the value inf. Branch-free (selects): the
    comparisons follow the data, which no branch predictor guesses.
    """
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
def settle_tie(xrow, c64, vals, shift, lo, hi, limit, arg, buf):  # pragma: no cover - compiled
    """A near tie settled: the exact nearest of the centroids whose computed value is ≤ ``limit``.

    Centroid j in [lo, hi) has its computed value at ``vals[j - shift]``;
    those within ``limit`` are compared by float64 sums
    (:func:`~kmclust.lloyd.exact.exact_sq`), the lowest index among equals.
    Returns ``arg`` if none is within the limit (or no sum is finite). The
    one rule for every near tie, whichever computation gave the values, so
    a label never depends on which step settled it.
    """
    best = np.inf
    for j in range(lo, hi):
        if vals[j - shift] <= limit:
            s = exact_sq(xrow, c64[j], buf)
            if s < best:
                best = s
                arg = j
    return arg


@numba.njit(cache=True, nogil=True)
def set_bounds(  # pragma: no cover - compiled
    labels,  # OUT (n, R) int: the label, local index
    dmin,  # OUT (n, R) float: the computed squared distance to it
    upper,  # OUT (n, R) float64: its root, an upper bound
    lower,  # OUT (n, R, 2) float64: the roots of d2 and d3, lower bounds
    second,  # OUT (n, R) int: the runner-up, local index (−1: none kept)
    r,  # IN int: the row
    s,  # IN int: the output column (run)
    arg,  # IN int: the nearest centroid, stack column
    lo,  # IN int: the run's first stack column
    d1,  # IN float: computed squared distance to ``arg``
    sec_arg,  # IN int: the runner-up, stack column (−1: none kept)
    d2,  # IN float: computed squared distance to it (or a bound below it)
    d3,  # IN float: the third-nearest's (or a bound below every other centroid)
):
    """Write one (row, run)'s label, computed squared distance, upper bound and two lower bounds."""
    labels[r, s] = arg - lo
    dmin[r, s] = d1
    upper[r, s] = np.sqrt(np.float64(d1))
    second[r, s] = sec_arg - lo if sec_arg >= 0 else -1
    lower[r, s, 0] = np.sqrt(np.float64(d2))
    lower[r, s, 1] = np.sqrt(np.float64(d3))


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
    c64: np.ndarray | None = None,
) -> None:
    """Hamerly's second step for the (row, run) pairs of ``need`` in stack positions ``runs``.

    In place. A pair whose bounds failed first gets its distance to the assigned
    centroid, computed as one GEMM entry would be (one dot product, off by at
    most :func:`~kmclust.lloyd.distance.error_bound`, as the computed distance
    the lower bound came from): when the lower bounds
    (:func:`~kmclust.lloyd.bounds.moved_bounds`) still clear it by the error
    window (``coef`` · (‖x‖² + 2 max‖c‖² of the run), the window of
    ``error_bound`` doubled), the label stays and the upper bound tightens.
    When only the runner-up's bound fails, its distance alone decides between
    the two. Otherwise the row is compared with every centroid of the run:
    float32 dot products in any order (the error bound holds for every
    order), then near ties settled exactly and the bounds renewed as in
    :func:`assign_rows`. Per pair, no GEMM: the cost follows the pairs, not
    rows × stack. ``c64``: the exact (float64) centroids ``centroids`` were rounded from, if any.
    """
    c64 = centroids.astype(np.float64) if c64 is None else c64
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


@numba.njit(cache=True, nogil=True)
def _load_row(x, i, buf, loaded):  # pragma: no cover - compiled
    """Row i of x into ``buf`` in its dtype unless ``loaded`` (once for all the row's runs).

    Returns True (the new ``loaded``).
    """
    if not loaded:
        for q in range(x.shape[1]):
            buf[q] = x[i, q]
    return True


@numba.njit(cache=True, nogil=True)
def _pair_start(
    buf, cent, csq, xsq_i, csq_max_p, coef, offsets, p, label
):  # pragma: no cover - compiled
    """What both per-pair steps start from for row ``buf`` in stack position p.

    Its columns ``lo, hi``, the error ``window``, the assigned column ``a``
    and the computed distance ``e`` to it (as
    :func:`~kmclust.lloyd.distance.computed_sq`).
    """
    lo, hi = offsets[p], offsets[p + 1]
    a = lo + label
    window = coef * (np.float64(xsq_i) + 2.0 * csq_max_p)
    return lo, hi, window, a, computed_sq(buf, cent, csq, xsq_i, a)


@numba.njit(cache=True, nogil=True)
def _reassign(  # pragma: no cover - compiled
    x,  # IN (n, D) uint8/float: the chunk's rows
    xsq,  # IN (n,) cent's dtype: the rows' ‖x‖²
    cent,  # IN (ΣK, D) float32/64: the stacked centroids
    csq,  # IN (ΣK,) cent's dtype: their ‖c‖²
    c64,  # IN (ΣK, D) float64: the centroids for exact sums
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    runs,  # IN (P,) int64: the stack positions to visit
    need,  # IN (n, R) bool: the pairs whose bounds failed
    coef,  # IN float: error window per unit of ‖x‖² + 2 max‖c‖²
    csq_max,  # IN (R,) float64: max‖c‖² per run
    labels,  # INOUT (n, R) int: label per pair, local index
    dmin,  # OUT (n, R) float: computed squared distance to it
    upper,  # OUT (n, R) float64: its root, an upper bound
    lower,  # INOUT (n, R, 2) float64: the two lower bounds (see assign_rows)
    second,  # INOUT (n, R) int: the runner-up, local index (−1: none kept)
):
    n, d = x.shape
    buf = np.empty(d, dtype=cent.dtype)
    buf64 = np.empty(d)
    vals = np.empty(cent.shape[0], dtype=cent.dtype)
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
            if rest_clear and l0 > 0 and l0 * l0 - e > window:
                # the label stays: tighten the upper bound
                upper[i, p] = np.sqrt(np.float64(e))
                dmin[i, p] = e
                continue
            if rest_clear and second[i, p] >= 0:
                # only the runner-up may be nearer: one more distance
                b = lo + second[i, p]
                v = computed_sq(buf, cent, csq, xsq[i], b)
                tie = abs(np.float64(v) - np.float64(e)) <= window
                if tie:  # settle exactly, the lower index first
                    ta, tb = exact_sq(x[i], c64[a], buf64), exact_sq(x[i], c64[b], buf64)
                    win_b = tb < ta or (tb == ta and b < a)
                else:
                    win_b = v < e
                near, far = (v, e) if win_b else (e, v)
                labels[i, p] = (b if win_b else a) - lo
                dmin[i, p] = near
                upper[i, p] = np.sqrt(np.float64(near))
                if tie:  # as after any settled tie: the smaller computed distance bounds both
                    second[i, p] = -1
                    lower[i, p, 0] = lower[i, p, 1] = min(np.sqrt(np.float64(min(v, e))), l1)
                else:  # the other one is the runner-up; the rest keep their bound
                    second[i, p] = (a if win_b else b) - lo
                    lower[i, p, 0] = np.sqrt(np.float64(far))
                continue
            dots(buf, cent, lo, hi, vals)
            for j in range(lo, hi):
                vals[j - lo] = csq[j] - two * vals[j - lo]
            arg, best, sec_arg, sec, third = best_three(vals, 0, hi - lo)
            arg += lo
            sec_arg = sec_arg + lo if sec_arg >= 0 else -1
            if sec - best <= window:  # near tie: settle exactly
                arg = settle_tie(x[i], c64, vals, lo, lo, hi, best + window, arg, buf64)
                sec_arg = -1
                sec = third = best
            set_bounds(
                labels,
                dmin,
                upper,
                lower,
                second,
                i,
                p,
                arg,
                lo,
                max(vals[arg - lo] + xsq[i], zero),
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
    c64: np.ndarray | None = None,
) -> None:
    """Elkan's second step for the (row, run) pairs of ``need``, with per-centroid lower bounds.

    In place. The distance to the assigned centroid comes first (one dot
    product, as in :func:`reassign`); then only the run's centroids whose
    bound in ``cbound`` (n, ΣK) does not clear it by the error window get
    theirs, which also renews their bound. The label is the nearest of those
    computed, near ties settled exactly (lowest index first), as in
    :func:`assign_rows`. With many centroids per run few of them fail their
    bound: the cost follows those, not the run's k. ``c64`` as in :func:`reassign`.
    """
    c64 = centroids.astype(np.float64) if c64 is None else c64
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
def _reassign_centroids(  # pragma: no cover - compiled
    x,  # IN (n, D) uint8/float: the chunk's rows
    xsq,  # IN (n,) cent's dtype: the rows' ‖x‖²
    cent,  # IN (ΣK, D) float32/64: the stacked centroids
    csq,  # IN (ΣK,) cent's dtype: their ‖c‖²
    c64,  # IN (ΣK, D) float64: the centroids for exact sums
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    runs,  # IN (P,) int64: the stack positions to visit
    need,  # IN (n, R) bool: the pairs whose bounds failed
    coef,  # IN float: error window per unit of ‖x‖² + 2 max‖c‖²
    csq_max,  # IN (R,) float64: max‖c‖² per run
    labels,  # INOUT (n, R) int: label per pair, local index
    dmin,  # OUT (n, R) float: computed squared distance to it
    upper,  # OUT (n, R) float64: its root, an upper bound
    cbound,  # INOUT (n, ΣK) float32: lower bound per centroid, renewed where computed
):
    n, d = x.shape
    buf = np.empty(d, dtype=cent.dtype)
    buf64 = np.empty(d)
    vals = np.empty(cent.shape[0])  # computed squared distances (inf: proven farther)
    cand = np.empty(cent.shape[0], dtype=np.int64)  # the centroids to check
    dot_vals = np.empty(cent.shape[0], dtype=cent.dtype)
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
            # centroid j is proven farther than the assigned one when its bound exceeds
            # √(e + window) (then bound² − e > window): compared in float32 with that limit
            # rounded up, branch-free
            limit = up32(np.sqrt(e + window))
            m = 0
            for j in range(lo, hi):  # the others whose bound does not clear the limit
                vals[j] = np.inf
                cand[m] = j
                m += (cbound[i, j] <= limit) & (j != a)
            dots_at(buf, cent, cand, m, dot_vals)
            for t in range(m):
                j = cand[t]
                v = np.float64(max(csq[j] - two * dot_vals[t] + xsq[i], zero))
                vals[j] = v
                cbound[i, j] = down32(np.sqrt(v))
                best = min(best, v)
            vals[a] = e
            cbound[i, a] = down32(np.sqrt(e))
            limit = best + window
            arg = -1
            ties = 0
            for j in range(lo, hi):
                if vals[j] <= limit:
                    ties += 1
                    if arg < 0 or vals[j] < vals[arg]:
                        arg = j
            if ties > 1:  # near tie: settle exactly, the lowest index first
                arg = settle_tie(x[i], c64, vals, 0, lo, hi, limit, arg, buf64)
            labels[i, p] = arg - lo
            dmin[i, p] = vals[arg]
            upper[i, p] = np.sqrt(vals[arg])
