"""Per-chunk building blocks for a stack of runs: distances, labels, sums, relocation candidates.

Numpy and the compiled loops of :mod:`~kmclust.lloyd.distance`,
:mod:`~kmclust.lloyd.assign` and :mod:`~kmclust.lloyd.exact`, no dask; one
chunk task puts them together (:func:`kmclust.lloyd.kernel.lloyd_chunk`).
A *stack* holds the centroids of R runs one above the other (ΣK × D), ``offsets`` (R + 1,)
marking where each run's block starts. One GEMM of the chunk against the whole stack serves
every run still moving; runs whose bounds clear most rows get compiled per-pair work
instead; the rest is vectorised over runs or compiled (no Python loop over rows).
Bounds: two lower bounds per (row, run) (runner-up and the rest), or for a
stack of one run or of large runs one per (row, centroid) (Elkan; see
:func:`kmclust.lloyd.prune.centroid_bounds`).

Units: the data's own (0–255 for uint8 images). uint8 rows stay uint8, converted to float32
``BLOCK_ROWS`` at a time for the GEMMs; their per-cluster sums are exact integers in float32
while a chunk has fewer than ``EXACT_UINT8_ROWS`` rows (255 · n < 2**24), so partial sums do
not depend on chunking or on the reduction order. Float rows' sums are exact too
(:mod:`kmclust.lloyd.float_sums`); float64 rows get their distances in float32 where their
range allows (the error bound then counts the rounding of the rows, near ties are settled
against the float64 centroids), else in float64.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import scipy.sparse

from kmclust.lloyd import assign as _assign
from kmclust.lloyd import distance as _distance
from kmclust.lloyd import exact as _exact

#: Largest chunk whose uint8 per-cluster sums stay exact in float32.
EXACT_UINT8_ROWS = (2**24 - 1) // 255


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for float64 input, float32 for everything else (as scikit-learn)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def dense_columns(cols: np.ndarray | None, sums: np.ndarray, kt: int) -> np.ndarray:
    """(kt, D) from the rows ``sums`` of columns ``cols`` (None: already all columns)."""
    if cols is None:
        return sums
    out = np.zeros((kt, sums.shape[1]), dtype=np.int64 if sums.dtype == np.int64 else np.float64)
    out[cols] = sums
    return out


#: Stacks of at least this many centroids get uint8 rows' distances from a GEMM of converted blocks.
WIDE_STACK = 64
#: Distances computed at a time when a whole chunk is assigned (rows × ΣK): a block's matrix
#: (32 MB in float32) rather than the chunk's.
DIST_BLOCK = 2**23
#: Rows converted to the compute dtype at a time: uint8 chunks stay uint8 in memory, a block's float
#: copy stays in cache while its GEMM runs, and gathering rows moves a quarter of the bytes.
BLOCK_ROWS = 1024


def blocks(x: np.ndarray, rows: np.ndarray | None, dtype: np.dtype):
    """Yield ``(lo, hi, block)``: rows ``rows[lo:hi]`` of ``x`` (``x[lo:hi]`` if None) in ``dtype``.

    A chunk already in ``dtype`` comes as one block (no copy); otherwise one
    reused buffer of ``BLOCK_ROWS`` rows receives each block in turn.
    """
    m = x.shape[0] if rows is None else rows.size
    if rows is None and x.dtype == dtype:
        yield 0, m, x
        return
    buf = np.empty((min(BLOCK_ROWS, m), x.shape[1]), dtype=dtype)
    for lo in range(0, m, BLOCK_ROWS):
        hi = min(lo + BLOCK_ROWS, m)
        blk = buf[: hi - lo]
        _distance.take_rows(x, np.arange(lo, hi) if rows is None else rows[lo:hi], blk)
        yield lo, hi, blk


def distances(x: np.ndarray, centroids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(m, KT) ‖c‖² − 2x·c of rows ``rows`` (default all) against the stack (:func:`products`)."""
    dist, csq = products(x, centroids, rows)
    return dist + csq[None, :] if csq.size else dist


def products(
    x: np.ndarray, centroids: np.ndarray, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(m, KT) −2x·c of rows ``rows`` (default all) against the stack, and the (KT,) ‖c‖² still
    to add (empty: added already), in the centroids' dtype; ‖x‖² left out.

    One GEMM against the whole stack (×(−2) is exact); ‖c‖² is added as each row is assigned
    (:func:`~kmclust.lloyd.assign.assign_rows`: a pass over the (m, KT) matrix took longer than
    the GEMM at small d and k). uint8 rows against a thin stack (< ``WIDE_STACK``) go to
    :func:`kmclust.lloyd.distance.pixel_distances` (faster there, ‖c‖² included, a row's values
    the same wherever it sits; relocation candidates always take theirs from it).
    """
    if x.dtype == np.uint8 and centroids.shape[0] < WIDE_STACK:
        dist = _distance.pixel_distances(
            x, np.arange(x.shape[0]) if rows is None else rows, centroids
        )
        return dist, np.zeros(0, dtype=dist.dtype)
    ct = (centroids * -2.0).T
    m = x.shape[0] if rows is None else rows.size
    dist = np.empty((m, centroids.shape[0]), dtype=centroids.dtype)
    for lo, hi, blk in blocks(x, rows, centroids.dtype):
        np.matmul(blk, ct, out=dist[lo:hi])
    return dist, np.einsum("ij,ij->i", centroids, centroids)


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    bounds: bool = False,
    xsq: np.ndarray | None = None,
    cbound: np.ndarray | None = None,
    c64: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Nearest centroid of each run for each row.

    Returns ``labels`` (n, R) int32 local to each run's block, the exact
    nearest (:mod:`kmclust.lloyd.assign`), and ``dmin`` (n, R) float64 the
    computed squared distance ‖x‖² + ‖c‖² − 2x·c, clipped at 0 (approximate:
    used for relocation candidates and bounds, never for J). ``bounds=True``
    also returns ``upper`` = √dmin and the lower bounds ``lower`` (n, R, 2)
    and ``second`` (n, R) of :func:`kmclust.lloyd.assign.assign_rows`, which let
    later passes skip rows. ``xsq``: the rows' ‖x‖² if known. ``cbound``
    (n, ΣK) float32, if given, receives per-centroid lower bounds
    (:func:`kmclust.lloyd.bounds.moved_centroid_bounds`). ``c64``: the exact centroids that
    ``centroids`` were rounded from (float64 rows computed in float32), if any.
    """
    n, r = x.shape[0], offsets.size - 1
    if xsq is None:
        xsq = _distance.row_norms(x, centroids.dtype)
    shape = (n, r) if bounds else (0, 0)  # without bounds, only labels and dmin are written
    out = (
        np.empty((n, r), dtype=np.int32),
        np.empty((n, r)),
        np.empty(shape),
        np.empty((*shape, 2)),
        np.empty(shape, dtype=np.int32),
    )
    col0 = offsets[:-1]
    place(
        x,
        centroids,
        offsets,
        None,
        np.arange(r),
        xsq,
        *out,
        cbound=cbound,
        col0=col0,
        c64=c64,
        bounds=bounds,
    )
    return out if bounds else out[:2]


def place(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray | None,
    runs: np.ndarray,
    xsq: np.ndarray,
    labels: np.ndarray,
    dmin: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    second: np.ndarray,
    cbound: np.ndarray | None = None,
    col0: np.ndarray | None = None,
    c64: np.ndarray | None = None,
    gbound: np.ndarray | None = None,
    groups=None,
    bounds: bool = True,
) -> None:
    """Assign rows ``rows`` (all if None) for a (sub)stack into columns ``runs`` of the outputs.

    Per-centroid bounds go to ``cbound``'s columns from ``col0[p]`` on for sub-stack position p,
    per-group bounds to ``gbound`` (whole stack, ``groups``); ``c64``: the exact centroids, if any.
    """
    c64 = centroids.astype(np.float64) if c64 is None else c64
    terms = _distance.dot_terms(x.dtype, centroids.dtype, x.shape[1])
    csq_max = np.einsum("ij,ij->i", c64, c64).max()
    if not bounds and rows is None and x.dtype.kind == "f":  # labels and distances of every row
        coef = 2.0 * _distance.error_coef(terms, centroids.dtype)
        _assign.nearest(x, centroids, offsets, runs, c64, xsq, coef, csq_max, labels, dmin)
        return
    if rows is None:
        rows = np.arange(x.shape[0])
    step = max(BLOCK_ROWS, DIST_BLOCK // max(centroids.shape[0], 1))
    outs = (labels, dmin, upper, lower, second, cbound, col0, gbound, groups, bounds)
    for lo in range(0, rows.size, step):  # a block of rows at a time: memory of (step, ΣK)
        part = rows[lo : lo + step]
        dist, csq = products(x, centroids, None if part.size == x.shape[0] else part)
        xs = xsq[part]
        window = 2.0 * _distance.error_bound(xs, csq_max, terms, dist.dtype)
        _assign.assign_rows(dist, csq, offsets, x, part, runs, c64, window, xs, *outs)


def runs_with_empty_cluster(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stack positions of the runs with a cluster no row of this chunk is in.

    A cluster empty over the whole data set is empty in every chunk, so these
    are the only runs whose relocation candidates can ever be needed.
    """
    return _exact.runs_missing_a_label(labels, offsets)


#: Above one entry per this many cells of the (n × kt) one-hot, its dense GEMM beats the sparse
#: product.
DENSE_SHARE = 20
#: uint8 chunks up to this many rows are summed in int32 (255 · rows < 2**31).
SCATTER_MAX_ROWS = (2**31 - 1) // 255


def signed_sums(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, signs: np.ndarray, kt: int, dtype: np.dtype
) -> tuple[np.ndarray | None, np.ndarray]:
    """Σ signs · x[rows] into stacked columns ``cols``, computed in ``dtype``: (columns, sums).

    (row, col) pairs are unique. uint8 rows are scattered into int32 sums by
    a compiled loop (exact; faster than a one-hot GEMM even when every row
    takes part, and than the sparse product for deltas), returned as int32
    (half the bytes of float64 to send). Other rows, summed into float64, go through a
    sparse matrix of the ±1 entries: the cost scales with the number of
    entries, not with n · kt as a dense one-hot GEMM would, and the result
    holds only the columns touched (columns None: all ``kt``, from the
    one-hot GEMM, used when entries are so many that its speed wins). Sums
    of integer values below 2**24 are exact in float32 whatever the order,
    so integer chunks keep their exact sums.
    """
    n, d = x.shape
    if x.dtype == np.uint8 and n <= SCATTER_MAX_ROWS:  # compiled scatter, int32 sums: exact
        touched = np.flatnonzero(np.bincount(cols, minlength=kt))
        slot_of = np.empty(kt, dtype=np.int64)
        slot_of[touched] = np.arange(touched.size)
        sums = _exact.signed_row_sums(x, rows, slot_of[cols], signs, touched.size)
        return (None if touched.size == kt else touched), sums  # every column touched: dense
    if cols.size * DENSE_SHARE >= n * kt:  # one-hot GEMM: much faster per entry than sparse
        onehot = np.zeros((n, kt), dtype=dtype)
        onehot[rows, cols] = signs
        out = np.zeros((kt, d), dtype=dtype)
        for lo, hi, blk in blocks(x, None, dtype):
            out += onehot[lo:hi].T @ blk
        return None, out.astype(np.float64, copy=False)
    touched, slot = np.unique(cols, return_inverse=True)
    if x.dtype == dtype:
        used, data = rows, x
    else:  # convert only the rows taking part
        uniq, used = np.unique(rows, return_inverse=True)
        data = x[uniq].astype(dtype)
    mat = scipy.sparse.csr_matrix(
        (signs.astype(dtype), (slot, used)), shape=(touched.size, data.shape[0])
    )
    return touched, np.asarray(mat @ data, dtype=np.float64)


def cluster_sums(
    x: np.ndarray, labels: np.ndarray, offsets: np.ndarray, integer: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (KT, D) (float64; int32 for uint8 chunks) and counts (KT,).

    Integer-valued chunks (uint8 pixels) below ``EXACT_UINT8_ROWS`` rows sum
    in the compute dtype (float32), whose integer results are exact;
    anything else accumulates in float64.
    """
    n, r = labels.shape
    kt = int(offsets[-1])
    cols = (labels + offsets[:-1][None, :]).ravel()  # (n · R) stacked cluster index, row-major
    rows = np.repeat(np.arange(n), r)
    counts = np.bincount(cols, minlength=kt).astype(np.int64)
    dtype = compute_dtype(x.dtype) if integer and n <= EXACT_UINT8_ROWS else np.dtype(np.float64)
    touched, sums = signed_sums(x, rows, cols, np.ones(cols.size), kt, dtype)
    return dense_columns(touched, sums, kt), counts


def delta_sums(
    x: np.ndarray, labels: np.ndarray, old: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Change of the per-cluster sums and counts when labels go from ``old`` to ``labels``.

    Only the (row, run) pairs whose label changed take part (+row into the
    new cluster, −row out of the old one), so late iterations cost almost
    nothing, and only the columns they touch are returned (columns, sums,
    counts; columns None: all). Exact for integer-valued chunks below
    ``EXACT_UINT8_ROWS`` rows.
    """
    kt = int(offsets[-1])
    rr, runs = np.divmod(np.flatnonzero(labels != old), labels.shape[1])  # as np.nonzero
    new_cols = offsets[runs] + labels[rr, runs]
    old_cols = offsets[runs] + old[rr, runs]
    counts = np.bincount(new_cols, minlength=kt) - np.bincount(old_cols, minlength=kt)
    if rr.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, x.shape[1])), counts.astype(np.int64)
    signs = np.concatenate([np.ones(rr.size), -np.ones(rr.size)])
    touched, sums = signed_sums(
        x,
        np.concatenate([rr, rr]),
        np.concatenate([new_cols, old_cols]),
        signs,
        kt,
        compute_dtype(x.dtype),
    )
    return touched, sums, counts.astype(np.int64)


def pixel_farthest(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    xsq: np.ndarray,
    dn: np.ndarray,
    runs: np.ndarray,
    start: int,
    m: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`farthest` for uint8 rows whose distances ``dn`` (n, len(runs)) came from a GEMM:
    ranked instead by the distances :func:`kmclust.lloyd.distance.pixel_distances` gives (as
    :func:`kmclust.lloyd.assign.assign_rows` writes them), the same bits however rows are chunked.

    Both are within the error bound of the true distance, so only rows whose GEMM distance is
    within twice that of the m-th largest can rank among the m farthest: those alone are
    recomputed. −inf in ``dn`` (rows of weight 0) stays −inf.
    """
    n = x.shape[0]
    out = (
        np.empty((runs.size, m)),
        np.empty((runs.size, m), np.int64),
        np.empty((runs.size, m), int),
    )
    for t, p in enumerate(runs):
        block = centroids[offsets[p] : offsets[p + 1]]
        c64 = block.astype(np.float64)
        err = 2.0 * _distance.error_bound(
            xsq, np.einsum("ij,ij->i", c64, c64).max(), x.shape[1], block.dtype
        )
        d = dn[:, t]
        low = d - err
        cut = np.partition(low, n - m)[n - m] if n > m else -np.inf
        rows = np.flatnonzero(d + err >= cut)
        lab = labels[rows, p]
        own = np.empty(rows.size, dtype=block.dtype)  # each row's entry for its own centroid only
        order = np.argsort(lab, kind="stable")
        edges = np.flatnonzero(np.diff(lab[order])) + 1
        for sel in np.split(order, edges) if rows.size else ():
            j = lab[sel[0]]
            own[sel] = _distance.pixel_distances(x, rows[sel], block[j : j + 1])[:, 0]
        exact = np.maximum(own + xsq[rows], block.dtype.type(0))
        exact = np.where(d[rows] == -np.inf, -np.inf, exact.astype(np.float64))
        cd, ci, cl = farthest(exact[:, None], lab[:, None], 0, m)
        out[0][t], out[1][t], out[2][t] = (
            cd[0],
            np.where(ci[0] >= 0, rows[ci[0]] + start, -1),
            cl[0],
        )
    return out


def farthest(
    dmin: np.ndarray, labels: np.ndarray, start: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run, the ``m`` rows farthest from their centroid (desc. distance, then index)."""
    n, r = dmin.shape
    m_eff = min(m, n)
    d = dmin.astype(np.float64).T  # (R, n)
    if m_eff < n:
        part = np.argpartition(-d, m_eff - 1, axis=1)[:, :m_eff]
    else:
        part = np.broadcast_to(np.arange(n), (r, n))
    pd = np.take_along_axis(d, part, axis=1)
    order = np.lexsort((part, -pd), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    cand_d = np.take_along_axis(pd, order, axis=1)
    cand_l = np.take_along_axis(labels.T, idx, axis=1)
    return _pad(cand_d, m, -np.inf), _pad(idx + start, m, -1), _pad(cand_l, m, -1)


def _pad(a: np.ndarray, m: int, fill: float) -> np.ndarray:
    if a.shape[1] == m:
        return a
    out = np.full((a.shape[0], m), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def exact_errors(
    x: np.ndarray, evals: dict[int, np.ndarray], labels: np.ndarray
) -> dict[int, tuple[Fraction, Fraction]]:
    """Σ‖x − z‖² and Σ‖x − z‖ for the runs at stack positions ``evals``, each summed exactly.

    Each row's distance to its own centroid is summed directly in float64
    (compiled loop): no float32 cancellation, no float64 copy of the chunk;
    the rows' values are then added without rounding
    (:func:`kmclust.lloyd.exact.exact_sum`).
    """
    out = {}
    for p in sorted(evals):
        sq = _exact.squared_errors(x, evals[p], labels[:, p])
        out[p] = (_exact.exact_sum(sq), _exact.exact_sum(np.sqrt(sq)))
    return out
