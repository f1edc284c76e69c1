"""Labels and distance bounds of every (row, run) from a chunk's distances (the GEMM path).

The rows a pass computes in full (every row in a first pass, the rows that
too many runs need later) get their distances from one GEMM or from
:func:`kmclust.lloyd.distance.pixel_distances`; here each (row, run) gets its
exact nearest centroid by the rules of :mod:`kmclust.lloyd.nearest` (near ties
settled by float64 sums), and the bounds that let later passes skip it
(:mod:`kmclust.lloyd.bounds`). One compiled pass over the (m, ΣK) matrix
instead of numpy's argmin and partition over small axes.

Float rows whose bounds nobody keeps (the estimator's lloyd) take another way,
:func:`nearest`: their distances lie (ΣK, rows) in cache-sized blocks and each run's
two least are folded in across the rows with selects, which vectorises where a pass
row after row cannot; the same exact rules decide every label.

Compiled with numba; ``nogil`` so chunk tasks run in parallel threads.
numba's cache follows each function's own file only, and a caller's cached
code holds its compiled callees: after editing a compiled helper of
:mod:`~kmclust.lloyd.nearest` or :mod:`~kmclust.lloyd.bounds`, delete
``kmclust/lloyd/__pycache__``.
"""

from __future__ import annotations

import numba
import numpy as np

from kmclust.lloyd.bounds import down32
from kmclust.lloyd.nearest import best_three, set_bounds, settle_tie


def assign_rows(
    dist: np.ndarray,
    csq: np.ndarray,
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
    gbound: np.ndarray | None = None,
    groups=None,
    bounds: bool = True,
) -> None:
    """Exact nearest centroid of every (row, run) of a stacked ``dist`` (m, ΣK), written in place.

    ``dist`` holds −2x·c, plus ``csq`` = ‖c‖² (added here, as each row is read; empty: already
    in ``dist``) (‖x‖² left out), for rows ``rows`` of ``x``
    against the stacked centroids ``c64`` (float64) with ``offsets``;
    ``window`` is twice each row's error bound, ``xsq`` the rows' ‖x‖² in
    ``dist``'s dtype. For stack position p, column ``runs[p]`` of the (n, R)
    outputs receives: the label, the computed squared distance to it
    (clipped at 0), in float64 its root (an upper bound), and the two lower
    bounds of :func:`kmclust.lloyd.bounds.moved_bounds`: ``second``, the
    second-nearest centroid (local index), with the root of its computed
    distance in ``lower[..., 0]``, and the root of the third-nearest in
    ``lower[..., 1]`` (below every centroid but those two). When a near tie
    was settled, ``second`` is −1 and both hold the nearest computed distance
    (below every other centroid). inf where the run has no such centroid.
    With ``cbound`` (n, ΣK) float32, stack position p's centroids also get
    per-centroid lower bounds (the roots of their computed distances, rounded
    down) in the columns from ``col0[p]`` on
    (:func:`kmclust.lloyd.bounds.moved_centroid_bounds`). With ``gbound`` (n, G) float32
    (the whole stack, ``runs`` every position), each group of ``groups``
    (:class:`kmclust.lloyd.groups.Groups`) gets the rounded-down root of the least computed
    distance among its centroids but the label. ``bounds=False``: only ``labels`` and ``dmin``
    (a pass without pruning keeps no bounds; ``upper``, ``lower`` and ``second`` untouched).
    """
    if cbound is None:
        cbound, col0 = np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    gid, goffs = np.zeros(0, dtype=np.int64), np.zeros(len(offsets), dtype=np.int64)
    if gbound is None:
        gbound = np.zeros((0, 0), dtype=np.float32)
    else:
        gid, goffs = groups.gid, groups.goffs
    _assign_rows(
        dist,
        csq,
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
        gbound,
        gid,
        goffs,
        bounds,
    )


def nearest(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    runs: np.ndarray,
    c64: np.ndarray,
    xsq: np.ndarray,
    coef: float,
    csq_max: float,
    labels: np.ndarray,
    dmin: np.ndarray,
) -> None:
    """:func:`assign_rows` without bounds (labels and ``dmin`` only) for every row of a float
    chunk, its distances vectorised across rows: the two least of each run folded in with selects
    over a (ΣK, rows) block of distances, row after row being what a compiler cannot vectorise
    (:func:`best_three` took ~33 ns a row at k=8, more than the distances). Rows of at most
    :data:`THIN_DIM` features get theirs computed on the way, a small block of rows at a time
    (a GEMM of so short a product is mostly packing); wider rows from a GEMM of a block of rows
    at a time, transposed (:data:`FOLD_ENTRIES` distances: in cache while folded). ``xsq``: the
    chunk's ‖x‖²; each row's near-tie window is ``coef`` · (‖x‖² + 2 ``csq_max``)
    (:func:`~kmclust.lloyd.distance.error_bound`).
    """
    c2 = centroids * -2.0  # exact
    csq = np.einsum("ij,ij->i", centroids, centroids)
    offsets, runs = np.asarray(offsets, dtype=np.int64), np.asarray(runs, dtype=np.int64)
    rest = (c64, xsq, coef, csq_max, labels, dmin)
    if x.shape[1] <= THIN_DIM:
        _nearest_thin(x, c2, csq, offsets, runs, *rest)
        return
    step = max(FOLD_ROWS, FOLD_ENTRIES // max(c2.shape[0], 1))
    buf = np.empty(c2.shape[0] * min(step, x.shape[0]), dtype=c2.dtype)  # one block's, reused
    for lo in range(0, x.shape[0], step):
        blk = x[lo : lo + step].astype(c2.dtype, copy=False)
        prod = buf[: c2.shape[0] * blk.shape[0]].reshape(c2.shape[0], blk.shape[0])
        np.matmul(c2, blk.T, out=prod)  # (ΣK, rows): −2c·x, a row's values side by side
        _nearest_products(prod, lo, x, csq, offsets, runs, *rest)


#: Float rows of at most this many features get their distances without a GEMM (:func:`nearest`).
THIN_DIM = 4
#: Rows folded at a time by :func:`nearest`'s compiled loops (their two least stay in cache).
FOLD_ROWS = 128
#: Distances (ΣK × rows) of a block :func:`nearest` computes and folds while it is in cache.
FOLD_ENTRIES = 2**16


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _nearest_thin(  # pragma: no cover - compiled
    x, c2, csq, offsets, runs, c64, xsq, coef, csq_max, labels, dmin
):  # fmt: skip
    """A block of rows at a time, transposed (a feature's values of the block side by side): each
    centroid's products with the whole block are a few vector sums (Σ_q (−2c_q) x_q, the dot
    product of a GEMM; ‖c‖² is added by :func:`_fold`, so
    :func:`~kmclust.lloyd.distance.error_bound` holds), then :func:`_fold`."""
    kt, d = c2.shape
    step = max(8, min(FOLD_ROWS, FOLD_ENTRIES // kt))
    xt = np.empty((d, step), dtype=c2.dtype)
    vals = np.empty((kt, step), dtype=c2.dtype)
    scratch = _scratch(step, kt, d, c2.dtype)
    for i0 in range(0, x.shape[0], step):
        h = min(step, x.shape[0] - i0)
        for t in range(h):
            for q in range(d):
                xt[q, t] = x[i0 + t, q]
        for j in range(kt):
            v = vals[j]
            cq, xq = c2[j, 0], xt[0]
            for t in range(h):
                v[t] = cq * xq[t]
            for q in range(1, d):
                cq, xq = c2[j, q], xt[q]
                for t in range(h):
                    v[t] += cq * xq[t]
        _fold(vals, 0, h, i0, x, csq, offsets, runs, c64, xsq, coef, csq_max, labels, dmin, scratch)


@numba.njit(cache=True, nogil=True)
def _nearest_products(  # pragma: no cover - compiled
    prod, r0, x, csq, offsets, runs, c64, xsq, coef, csq_max, labels, dmin
):  # fmt: skip
    """:func:`_fold` over ``prod`` (ΣK, m), the products −2c·x of rows r0 … r0 + m − 1."""
    step = FOLD_ROWS
    scratch = _scratch(step, prod.shape[0], x.shape[1], prod.dtype)
    for c0 in range(0, prod.shape[1], step):
        h = min(step, prod.shape[1] - c0)
        _fold(prod, c0, h, r0 + c0, x, csq, offsets, runs, c64, xsq, coef, csq_max, labels, dmin,
              scratch)  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _scratch(step, kt, d, dtype):  # pragma: no cover - compiled
    """:func:`_fold`'s buffers: two least and label of ``step`` rows (two of each: read from one,
    written to the other), a row's values, a row, and the rows' windows, near-tie flags and
    distances."""
    return (
        np.empty((2, step), dtype=dtype),
        np.empty((2, step), dtype=dtype),
        np.empty((2, step), dtype=np.int32),
        np.empty(kt, dtype=dtype),
        np.empty(d),
        np.empty(step),
        np.empty(step, dtype=np.bool_),
        np.empty(step, dtype=dtype),
    )


@numba.njit(cache=True, nogil=True)
def _fold(  # pragma: no cover - compiled
    vals, c0, h, r0, x, csq, offsets, runs, c64, xsq, coef, csq_max, labels, dmin, scratch
):  # fmt: skip
    """Rows r0 … r0 + h − 1, whose products −2c·x are in columns c0 … c0 + h − 1 of ``vals``
    (ΣK, ·): ‖c‖² added (in place), each run's least and runner-up found with selects (no
    branches), near ties settled by :func:`settle_tie`, labels and computed distances written, as
    :func:`_assign_rows` writes them. ``scratch``: :func:`_scratch`'s buffers. Each centroid reads
    the two least and the label from one buffer and writes them to the other: updated in place,
    the loop over the rows did not vectorise (numba 0.68; 5.0 -> 1.8 ns a row at k=8, 19.4 -> 6.5
    at k=32, the fold alone)."""
    zero, inf = vals.dtype.type(0), vals.dtype.type(np.inf)
    least, runner, label, col, buf, win, tie, dv = scratch
    cm2 = 2.0 * csq_max
    for p in range(offsets.size - 1):
        lo, hi = offsets[p], offsets[p + 1]
        for t in range(h):
            least[0, t], runner[0, t], label[0, t] = inf, inf, lo
        for j in range(lo, hi):
            v = vals[j, c0 : c0 + h]
            jj, cs = np.int32(j), csq[j]
            now, nxt = (j - lo) % 2, 1 - (j - lo) % 2
            b1, b2, arg = least[now], runner[now], label[now]
            n1, n2, na = least[nxt], runner[nxt], label[nxt]
            for t in range(h):
                s, o1, o2 = v[t] + cs, b1[t], b2[t]
                below = s < o1  # the first of equal minima is kept
                na[t] = jj if below else arg[t]
                m = o1 if below else s
                n2[t] = m if m < o2 else o2
                n1[t] = s if below else o1
            for t in range(h):
                v[t] += cs
        last = (hi - lo) % 2
        b1, b2, arg = least[last], runner[last], label[last]
        pr = runs[p]
        for t in range(h):  # the window, the near-tie test, the distance: vectorises
            r = r0 + t
            w = coef * (np.float64(xsq[r]) + cm2)
            win[t] = w
            tie[t] = b2[t] - b1[t] <= w
            dv[t] = max(b1[t] + xsq[r], zero)
        for t in range(h):
            if tie[t]:  # near tie: settle exactly
                r = r0 + t
                for j in range(lo, hi):
                    col[j] = vals[j, c0 + t]
                a = settle_tie(x[r], c64, col, 0, lo, hi, b1[t] + win[t], arg[t], buf)
                arg[t] = a
                dv[t] = max(vals[a, c0 + t] + xsq[r], zero)
        for t in range(h):
            labels[r0 + t, pr] = arg[t] - lo
            dmin[r0 + t, pr] = dv[t]


@numba.njit(cache=True, nogil=True)
def _assign_rows(  # pragma: no cover - compiled
    dist,  # IN (m, ΣK) float32/64: computed −2x·c of the m rows against the stack (+ ‖c‖²)
    csq,  # IN (ΣK,) dist's dtype: the ‖c‖² to add to each row of ``dist``; (0,): added already
    offsets,  # IN (P + 1,) int64: stack position p's columns are offsets[p] … offsets[p + 1] − 1
    x,  # IN (n, D) uint8/float: the chunk's rows
    rows,  # IN (m,) int64: the row of ``x`` (and of the outputs) of each row of ``dist``
    runs,  # IN (P,) int64: the output column of each stack position
    c64,  # IN (ΣK, D) float64: the stacked centroids
    window,  # IN (m,) float64: twice each row's error bound
    xsq,  # IN (m,) dist's dtype: the rows' ‖x‖²
    labels,  # OUT (n, R) int: label per (row, run), local index
    dmin,  # OUT (n, R) float: computed squared distance to it, clipped at 0
    upper,  # OUT (n, R) float64: its root, an upper bound
    lower,  # OUT (n, R, 2) float64: the runner-up's and the third's roots (lower bounds)
    second,  # OUT (n, R) int: the runner-up, local index (−1 after a settled tie)
    cbound,  # OUT (n, ·) float32: per-centroid lower bounds; (0, 0): none wanted
    col0,  # IN (P,) int64: position p's first column in ``cbound``
    gbound,  # OUT (n, G) float32: per-group lower bounds; (0, 0): none wanted
    gid,  # IN (ΣK,) int64: each stacked centroid's group
    goffs,  # IN (P + 1,) int64: position p's groups are goffs[p] … goffs[p + 1] − 1
    bounds,  # IN bool: write upper, lower and second (else labels and dmin only)
):
    zero = dist.dtype.type(0)
    buf = np.empty(x.shape[1])
    least = np.empty(goffs[-1])  # per group, the least computed value but the label's
    full = np.empty(dist.shape[1], dtype=dist.dtype)  # a row of dist with ‖c‖² added
    for i in range(dist.shape[0]):
        r = rows[i]
        row = dist[i]
        if csq.size:
            for j in range(row.size):
                full[j] = row[j] + csq[j]
            row = full
        for p in range(offsets.size - 1):
            lo, hi = offsets[p], offsets[p + 1]
            arg, best, sec_arg, sec, third = best_three(row, lo, hi)
            if sec - best <= window[i]:  # near tie: settle exactly
                arg = settle_tie(x[r], c64, row, 0, lo, hi, best + window[i], arg, buf)
                sec_arg = -1  # the label may be any near one: only the minimum bounds the others
                sec = third = best
            if not bounds:
                labels[r, runs[p]] = arg - lo
                dmin[r, runs[p]] = max(row[arg] + xsq[i], zero)
                continue
            set_bounds(
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
                    cbound[r, c0 + j] = down32(
                        np.sqrt(max(np.float64(row[j]) + np.float64(xsq[i]), 0.0))
                    )
            if gbound.shape[0] > 0:
                for g in range(goffs[p], goffs[p + 1]):
                    least[g] = np.inf
                for j in range(lo, hi):
                    if j != arg:
                        least[gid[j]] = min(least[gid[j]], np.float64(row[j]))
                for g in range(goffs[p], goffs[p + 1]):
                    gbound[r, g] = down32(np.sqrt(max(least[g] + np.float64(xsq[i]), 0.0)))
