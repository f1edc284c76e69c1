"""Per-chunk Lloyd work for a stack of runs: numpy and the compiled loops of :mod:`kmclust.lloyd.nearest`, no dask.

A *stack* holds the centroids of R runs one above the other (ΣK × D) with
``offsets`` (R + 1,) marking where each run's block starts. One GEMM of the
chunk against the whole stack serves every run still moving; runs whose
bounds clear most rows get compiled per-pair work instead; the rest is
vectorised over runs or compiled (no Python loop over samples in the hot path).
Bounds: two lower bounds per (row, run) (runner-up and the rest), or for a
stack of one run or of large runs one per (row, centroid) (Elkan; see
:func:`centroid_bounds`).

Units: the kernel works in the data's own units (0–255 for uint8 images).
uint8 rows stay uint8 and are converted to float32 ``BLOCK_ROWS`` at a time
for the GEMMs; per-cluster sums of uint8 data are exact
integers in float32 as long as a chunk has fewer than ``EXACT_UINT8_ROWS``
rows (255 · n < 2**24), so partial sums do not depend on chunking or on the
reduction order. Float input is computed in its own precision with float64
sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import scipy.sparse

from kmclust.lloyd import nearest as _nearest

#: Largest chunk whose uint8 per-cluster sums stay exact in float32.
EXACT_UINT8_ROWS = (2**24 - 1) // 255


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for float64 input, float32 for everything else (as scikit-learn)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


@dataclass
class Partial:
    """What one chunk (or a reduction of chunks) contributes for a stack.

    ``cand_*`` hold, per run, the ``m`` points farthest from their assigned
    centroid in decreasing distance (ties by global index): the candidates
    for relocating empty clusters. ``eval_*`` are, for the runs flagged for
    evaluation, the exact sums (Fractions, :func:`kmclust.lloyd.nearest.exact_sum`)
    of the rows' float64 distances: the same however the rows are chunked.
    ``labels`` are those runs' labels by chunk start.
    """

    sums: (
        np.ndarray
    )  # (KT, D) float64; int32 (exact) from uint8 chunks, int64 once those are added up
    counts: np.ndarray  # (KT,) int64
    sqnorm: float  # Σ‖x‖² over the rows, float64
    cand_d: np.ndarray  # (R, m) float64
    cand_i: np.ndarray  # (R, m) int64, global row index (-1: none)
    cand_l: np.ndarray  # (R, m) int64, local label of the candidate
    eval_sse: np.ndarray  # (R,) object: Fraction Σ‖x − z‖² (int 0 where not evaluated)
    eval_dist: np.ndarray  # (R,) object: Fraction Σ‖x − z‖
    labels: list[tuple[int, np.ndarray]] = field(default_factory=list)
    delta: bool = False  # sums/counts are changes since the previous pass
    pruned: bool = False  # some rows were skipped: cand_d are upper bounds
    sum_cols: np.ndarray | None = (
        None  # sums holds only these stacked columns (the others are 0); None: all
    )

    def dense_sums(self) -> np.ndarray:
        """(KT, D) sums, zeros filled in where a sparse partial left columns out."""
        return dense_columns(self.sum_cols, self.sums, self.counts.size)


def dense_columns(cols: np.ndarray | None, sums: np.ndarray, kt: int) -> np.ndarray:
    """(kt, D) from the rows ``sums`` of columns ``cols`` (None: already all columns)."""
    if cols is None:
        return sums
    out = np.zeros((kt, sums.shape[1]))
    out[cols] = sums
    return out


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
        _nearest.take_rows(x, np.arange(lo, hi) if rows is None else rows[lo:hi], blk)
        yield lo, hi, blk


def distances(x: np.ndarray, centroids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(m, KT) ‖c‖² − 2x·c of rows ``rows`` (default all) against the stack, in the centroids' dtype.

    The one GEMM against the whole stack (×(−2) is exact); ‖x‖² left out.
    uint8 rows go to a compiled kernel instead
    (:func:`kmclust.lloyd.nearest.pixel_distances`: faster for thin stacks, and
    each row's distances are the same bits wherever the row sits, so chunk
    sizes cannot change a relocation candidate).
    """
    if x.dtype == np.uint8:
        return _nearest.pixel_distances(
            x, np.arange(x.shape[0]) if rows is None else rows, centroids
        )
    ct = (centroids * -2.0).T
    m = x.shape[0] if rows is None else rows.size
    dist = np.empty((m, centroids.shape[0]), dtype=centroids.dtype)
    for lo, hi, blk in blocks(x, rows, centroids.dtype):
        np.matmul(blk, ct, out=dist[lo:hi])
    dist += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return dist


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    bounds: bool = False,
    xsq: np.ndarray | None = None,
    cbound: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Nearest centroid of each run for each row.

    Returns ``labels`` (n, R) int32 local to each run's block, the exact
    nearest (:mod:`kmclust.lloyd.nearest`), and ``dmin`` (n, R) float64 the
    computed squared distance ‖x‖² + ‖c‖² − 2x·c, clipped at 0 (approximate:
    used for relocation candidates and bounds, never for J). ``bounds=True``
    also returns ``upper`` = √dmin and the lower bounds ``lower`` (n, R, 2)
    and ``second`` (n, R) of :func:`kmclust.lloyd.nearest.assign_rows`, which let
    later passes skip rows. ``xsq``: the rows' ‖x‖² if known. ``cbound``
    (n, ΣK) float32, if given, receives per-centroid lower bounds
    (:func:`kmclust.lloyd.nearest.moved_centroid_bounds`).
    """
    n, r = x.shape[0], offsets.size - 1
    if xsq is None:
        xsq = _nearest.row_norms(x, centroids.dtype)
    out = (
        np.empty((n, r), dtype=np.int32),
        np.empty((n, r)),
        np.empty((n, r)),
        np.empty((n, r, 2)),
        np.empty((n, r), dtype=np.int32),
    )
    place(x, centroids, offsets, None, np.arange(r), xsq, *out, cbound=cbound, col0=offsets[:-1])
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
) -> None:
    """Assign rows ``rows`` (all if None) for a (sub)stack; results go to columns ``runs`` of the (n, R) outputs
    (per-centroid bounds, if ``cbound``, to its columns from ``col0[p]`` on for sub-stack position p)."""
    dist = distances(x, centroids, rows)
    c64 = centroids.astype(np.float64)
    if rows is None:
        rows = np.arange(x.shape[0])
    xs = xsq[rows]
    window = 2.0 * _nearest.error_bound(
        xs, np.einsum("ij,ij->i", c64, c64).max(), x.shape[1], dist.dtype
    )
    _nearest.assign_rows(
        dist,
        offsets,
        x,
        rows,
        runs,
        c64,
        window,
        xs,
        labels,
        dmin,
        upper,
        lower,
        second,
        cbound,
        col0,
    )


def runs_with_empty_cluster(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stack positions of the runs with a cluster no row of this chunk is in.

    A cluster empty over the whole data set is empty in every chunk, so these
    are the only runs whose relocation candidates can ever be needed.
    """
    return np.flatnonzero(_nearest.runs_missing_a_label(labels, np.diff(offsets)))


#: Above one entry per this many cells of the (n × kt) one-hot, its dense GEMM beats the sparse product.
DENSE_SHARE = 20
#: uint8 chunks up to this many rows are summed in int32 (255 · rows < 2**31).
SCATTER_MAX_ROWS = (2**31 - 1) // 255


def signed_sums(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, signs: np.ndarray, kt: int, dtype: np.dtype
) -> tuple[np.ndarray | None, np.ndarray]:
    """Σ signs · x[rows] into stacked columns ``cols``, computed in ``dtype``: (columns, sums).

    (row, col) pairs are unique. uint8 rows are scattered into int32 sums by
    a compiled loop (exact; 2-4x a one-hot GEMM even when every row takes
    part, 3-5x the sparse product for deltas), returned as int32 (half the
    bytes of float64 to send). Other rows, summed into float64, go through a
    sparse matrix of the ±1 entries: the cost scales with the number of
    entries, not with n · kt as a dense one-hot GEMM would, and the result
    holds only the columns touched (columns None: all ``kt``, from the
    one-hot GEMM, used when entries are so many that its speed wins). Sums
    of integer values below 2**24 are exact in float32 whatever the order,
    so integer chunks keep their exact sums.
    """
    n, d = x.shape
    if (
        x.dtype == np.uint8 and n <= SCATTER_MAX_ROWS
    ):  # compiled scatter into int32 sums: exact, fastest
        touched = np.flatnonzero(np.bincount(cols, minlength=kt))
        slot_of = np.empty(kt, dtype=np.int64)
        slot_of[touched] = np.arange(touched.size)
        sums = _nearest.signed_row_sums(x, rows, slot_of[cols], signs, touched.size)
        return (
            None if touched.size == kt else touched
        ), sums  # every column touched: a dense result
    if (
        cols.size * DENSE_SHARE >= n * kt
    ):  # one-hot GEMM: ~20× faster per entry than the sparse product
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
    rr, runs = np.nonzero(labels != old)
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
    (:func:`kmclust.lloyd.nearest.exact_sum`).
    """
    out = {}
    for p in sorted(evals):
        sq = _nearest.squared_errors(x, evals[p], labels[:, p])
        out[p] = (_nearest.exact_sum(sq), _nearest.exact_sum(np.sqrt(sq)))
    return out


#: Runs needing more than this share of a chunk's rows share one GEMM; the others get compiled per-pair work.
BUSY_SHARE = 0.15
#: Cost of one (row, centroid) distance in the compiled per-pair step, in units of the same in a stacked GEMM.
PAIR_COST = 3.0
#: A stack of one run, or of runs that all have at least this many centroids, keeps a lower bound per (row,
#: centroid) (Elkan) ...
CENTROID_BOUNDS_MIN_K = 64
#: ... while it has at most this many centroids: 4 bytes of state per row and centroid (2 KB a row at most).
CENTROID_BOUNDS_MAX_K = 512


def centroid_bounds(offsets: np.ndarray) -> bool:
    """Whether a stack keeps per-centroid lower bounds (Elkan) rather than two per run.

    Few of a run's centroids fail their own bound, so the per-pair step
    computes a handful of distances per row instead of the run's k (k=256 on
    Fashion-MNIST: 2-9 % of the pairs after the first pass). A stack of many
    small runs (the k ≤ 20 grid) keeps two bounds per run: there the n × ΣK
    upkeep cost more than it saved (BENCHMARKS.md).
    """
    ks = np.diff(offsets)
    if not ks.size or int(offsets[-1]) > CENTROID_BOUNDS_MAX_K:
        return False
    return ks.size == 1 or int(ks.min()) >= CENTROID_BOUNDS_MIN_K


@dataclass
class ChunkState:
    """What a chunk task leaves on its worker for the next pass: labels and bounds of its stack's runs."""

    run_ids: np.ndarray  # (R,)
    labels: np.ndarray  # (n, R) int32
    upper: np.ndarray | None  # (n, R) float64 distance bounds, or None when not pruning
    lower: np.ndarray | None  # (n, R, 2) float64 (see kmclust.lloyd.nearest.moved_bounds)
    xsq: np.ndarray | None = None  # (n,) the rows' ‖x‖² in the compute dtype (they never change)
    second: np.ndarray | None = (
        None  # (n, R) int32 second-nearest centroid of each run (−1: none known)
    )
    cbound: np.ndarray | None = (
        None  # (n, ΣK) float32 per-centroid lower bounds (then no lower, second)
    )
    offsets: np.ndarray | None = (
        None  # (R + 1,) the stack's offsets (the runs' columns of ``cbound``)
    )


def lloyd_chunk(
    x: np.ndarray,
    start: int,
    centroids: np.ndarray,
    offsets: np.ndarray,
    run_ids: np.ndarray,
    eval_centroids: dict[int, np.ndarray],
    m: int,
    integer: bool,
    want_labels: bool,
    want_errors: bool = True,
    prev: list[ChunkState] | None = None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    drift: dict[int, np.ndarray] | None = None,
    prune: bool = False,
) -> tuple[Partial, ChunkState | None]:
    """One chunk's contribution to one Lloyd iteration of a stack of runs.

    ``x`` stays in its own dtype (uint8 pixels are converted a block at a
    time); ``centroids`` (KT, D) are in the compute dtype; ``run_ids`` name
    the stack's runs; ``eval_centroids`` maps a stack position to float64
    centroids when that run is being evaluated (final labels, exact J); ``m``
    is how many relocation candidates to keep per run. For integer-valued
    data the chunk's labels are returned as state and, when ``prev`` holds
    every run's previous state (after the driver's relocation ``patches``),
    the partial carries *changes* of the sums (``delta=True``). With
    ``prune`` and the centroids' ``drift`` since the previous pass,
    Hamerly-style bounds (distance to the assigned centroid ≤ upper, to the
    second-nearest and to the others ≥ two lower bounds) skip the rows whose
    label cannot change in any run;
    relocation candidates are then only upper bounds (``pruned=True``).
    Trusts its inputs.
    """
    known = [st.xsq for st in prev or [] if st.xsq is not None and st.xsq.dtype == centroids.dtype]
    exact = None  # uint8 rows' integer ‖x‖², computed once for both ‖x‖² and Σ‖x‖²
    if known:
        xsq = known[0]
    elif x.dtype == np.uint8:
        exact = _nearest.row_norms(x, np.int64)
        xsq = exact.astype(centroids.dtype)
    else:
        xsq = _nearest.row_norms(x, centroids.dtype)
    per_centroid = prune and integer and centroid_bounds(offsets)
    prior = _previous(prev, patches, run_ids, per_centroid, start, x.shape[0]) if integer else None
    pruned = prune and prior is not None and prior.upper is not None and drift is not None
    if pruned:
        labels, dmin, upper, lower, second, cbound = _pruned_assign(
            x, xsq, centroids, offsets, run_ids, prior, drift
        )
    else:
        cbound = (
            np.empty((x.shape[0], int(offsets[-1])), dtype=np.float32) if per_centroid else None
        )
        labels, dmin, upper, lower, second = assign(
            x, centroids, offsets, bounds=True, xsq=xsq, cbound=cbound
        )
        if per_centroid:
            lower = second = None
    sum_cols = None
    if prior is not None:
        sum_cols, sums, counts = delta_sums(x, labels, prior.labels, offsets)
    else:
        sums, counts = cluster_sums(x, labels, offsets, integer)
    # Σ‖x‖² never changes: integer data send it with the first pass only (the driver keeps it)
    sqnorm = math.nan
    if prior is None:
        sqnorm = float(exact.sum()) if exact is not None else _sqnorm(x)
    r = offsets.size - 1
    needy = runs_with_empty_cluster(labels, offsets)
    cand_d, cand_i, cand_l = np.full((r, m), -np.inf), np.full((r, m), -1), np.full((r, m), -1)
    if needy.size:
        cand_d[needy], cand_i[needy], cand_l[needy] = farthest(
            dmin[:, needy], labels[:, needy], start, m
        )
    eval_sse = np.full(
        r, 0, dtype=object
    )  # exact: int 0, Fractions where evaluated (int + int is 50× faster)
    eval_dist = np.full(r, 0, dtype=object)
    out_labels: list[tuple[int, np.ndarray]] = []
    if want_errors and eval_centroids:
        for pos, (sse, dist) in exact_errors(x, eval_centroids, labels).items():
            eval_sse[pos], eval_dist[pos] = sse, dist
    if want_labels and eval_centroids:
        cols = sorted(eval_centroids)
        out_labels.append((start, labels[:, cols]))
    keep_bounds = prune and integer
    state = (
        ChunkState(
            np.asarray(run_ids),
            labels,
            upper if keep_bounds else None,
            lower if keep_bounds else None,
            xsq,
            second if keep_bounds else None,
            cbound if keep_bounds else None,
            np.asarray(offsets),
        )
        if integer
        else None
    )
    part = Partial(
        sums,
        counts,
        sqnorm,
        cand_d,
        cand_i,
        cand_l,
        eval_sse,
        eval_dist,
        out_labels,
        prior is not None,
        pruned,
        sum_cols,
    )
    return part, state


def _sqnorm(x: np.ndarray) -> float:
    """Σ‖x‖² of a chunk in float64 (exact for integer pixels), a block of rows at a time."""
    if x.dtype == np.uint8:
        return float(_nearest.row_norms(x, np.int64).sum())
    return float(
        sum(
            np.einsum("ij,ij->", blk, blk)
            for _, _, blk in blocks(x, np.arange(x.shape[0]), np.float64)
        )
    )


@dataclass
class _Prior:
    """A chunk's memory of the previous pass for every run of the stack."""

    labels: np.ndarray  # (n, R) int32, relocation patches applied (read only)
    upper: np.ndarray | None  # (n, R) float64 distance bounds, or None when not pruning (read only)
    lower: np.ndarray | None  # (n, R, 2)
    second: np.ndarray | None  # (n, R)
    cbound: np.ndarray | None = (
        None  # (n, ΣK) float32 per-centroid bounds (then no lower, second); lowered in place
    )


def _pruned_assign(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    run_ids: np.ndarray,
    prior: _Prior,
    drift: dict[int, np.ndarray],
) -> tuple[np.ndarray, ...]:
    """Labels with bounds: recompute only rows where some run's label might change.

    After the centroids moved by ``drift`` (per cluster), a row keeps its
    label in run r if lower² − upper² clears twice the distances' error bound
    (:func:`kmclust.lloyd.nearest.moved_bounds`). Runs
    needing more than ``BUSY_SHARE`` of the rows share one GEMM (:func:`place`)
    over the rows whose pairs in those runs would cost more in the compiled
    per-pair step (:func:`kmclust.lloyd.nearest.reassign`, ``PAIR_COST`` times a GEMM
    distance); every other pair goes through that step. (All rows needed by
    a busy run in the GEMM: the 96-run bench grid took ~4 % longer.) Stacks
    with per-centroid bounds (:func:`centroid_bounds`) go to
    :func:`_pruned_assign_centroids`. Returns labels, dmin, upper, lower,
    second and the per-centroid bounds (None here).
    """
    n = x.shape[0]
    labels = prior.labels.copy()
    ks = np.diff(offsets)
    moved = np.concatenate(
        [
            np.asarray(drift.get(int(rid), np.full(k, np.inf)), dtype=np.float64)
            for rid, k in zip(run_ids, ks)
        ]
    )  # (KT,) how far each centroid moved
    c64 = centroids.astype(np.float64)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    # the bounds started from computed squared distances, each off by at most error_bound
    slack = 2.0 * _nearest.error_bound(
        1.0, 0.0, x.shape[1], centroids.dtype
    )  # per unit of ‖x‖² + 2 max‖c‖²
    row_slack, run_slack = slack * xsq.astype(np.float64), slack * 2.0 * csq_max
    if prior.cbound is not None:
        return _pruned_assign_centroids(
            x, xsq, centroids, offsets, labels, prior, moved, slack, row_slack, run_slack
        )
    upper, lower, need = _nearest.moved_bounds(
        labels, prior.upper, prior.lower, prior.second, moved, offsets, row_slack, run_slack
    )
    second = prior.second.copy()
    dmin = np.square(upper)  # upper bounds for rows that keep their label
    # Runs still moving need many rows: one fat GEMM over the rows that many of them need. Settled
    # runs need a few rows each, mostly different ones: compiled per-pair work, no GEMM.
    share = need.mean(axis=0)
    busy = np.flatnonzero(share > BUSY_SHARE)
    pairs = need
    if busy.size:
        # a row joins the GEMM (every busy run's centroids) only when its own pairs would cost more
        per_pair = need[:, busy] @ ((ks[busy] + 2) * PAIR_COST)
        rows = np.flatnonzero(per_pair >= ks[busy].sum())
        cols = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in busy])
        if rows.size:
            place(
                x,
                centroids[cols],
                np.concatenate([[0], np.cumsum(ks[busy])]),
                None if rows.size > 0.9 * n else rows,
                busy,
                xsq,
                labels,
                dmin,
                upper,
                lower,
                second,
            )
        if rows.size <= 0.9 * n:
            pairs = need.copy()
            pairs[rows[:, None], busy[None, :]] = False
        else:
            pairs = need * (share <= BUSY_SHARE)[None, :]
    rest = np.flatnonzero(pairs.any(axis=0))
    if rest.size:
        _nearest.reassign(
            x, xsq, centroids, offsets, rest, pairs, slack, labels, dmin, upper, lower, second
        )
    return labels, dmin, upper, lower, second, None


def _pruned_assign_centroids(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    prior: _Prior,
    moved: np.ndarray,
    slack: float,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """:func:`_pruned_assign` with a lower bound per (row, centroid) (Elkan; ``labels`` are written in place).

    A row whose pairs would need more distances in the per-pair step
    (:func:`kmclust.lloyd.nearest.reassign_centroids`: the assigned centroid's and
    those whose bound failed, ``PAIR_COST`` times a GEMM distance each) than
    the stack's ΣK joins one GEMM over the whole stack (the first passes,
    when every centroid moves far); every other pair goes through that step.
    """
    n, r = labels.shape
    cbound = prior.cbound  # lowered in place (see kmclust.lloyd.nearest.moved_centroid_bounds)
    upper, need, fails = _nearest.moved_centroid_bounds(
        labels, prior.upper, cbound, moved, offsets, row_slack, run_slack
    )
    dmin = np.square(upper)  # upper bounds for rows that keep their label
    rows = np.flatnonzero(((fails + 2) * need).sum(axis=1) * PAIR_COST >= offsets[-1])
    pairs = need
    if rows.size:
        scratch = (
            np.empty((n, r, 2)),
            np.empty((n, r), dtype=np.int32),
        )  # two-bound outputs this stack does not keep
        place(
            x,
            centroids,
            offsets,
            None if rows.size > 0.9 * n else rows,
            np.arange(r),
            xsq,
            labels,
            dmin,
            upper,
            *scratch,
            cbound=cbound,
            col0=offsets[:-1],
        )
        pairs = (
            np.zeros_like(need) if rows.size > 0.9 * n else need.copy()
        )  # > 0.9 n: the GEMM took every row
        pairs[rows] = False
    rest = np.flatnonzero(pairs.any(axis=0))
    if rest.size:
        _nearest.reassign_centroids(
            x, xsq, centroids, offsets, rest, pairs, slack, labels, dmin, upper, cbound
        )
    return labels, dmin, upper, None, None, cbound


def _previous(
    prev: list[ChunkState] | None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None,
    run_ids: np.ndarray,
    per_centroid: bool,
    start: int,
    n: int,
) -> _Prior | None:
    """Every run's previous labels with relocation patches applied; None if any is missing.

    Also the bounds, when every run kept those the stack uses now (two per
    run, or per centroid: ``per_centroid``); otherwise none (a full pass renews them).
    """
    if not prev:
        return None
    where = {int(rid): (st, col) for st in prev for col, rid in enumerate(st.run_ids)}
    if any(int(rid) not in where for rid in run_ids):
        return None
    held = [where[int(rid)] for rid in run_ids]
    kind = "cbound" if per_centroid else "lower"
    has_bounds = all(st.upper is not None and getattr(st, kind) is not None for st, _ in held)
    names = ("upper", "cbound") if per_centroid else ("upper", "lower", "second")
    bounds: dict[str, np.ndarray] = {}
    if len(prev) == 1 and np.array_equal(
        prev[0].run_ids, run_ids
    ):  # the usual case: the same stack
        st = prev[0]
        labels = st.labels
        if has_bounds:
            bounds = {name: getattr(st, name) for name in names}
    elif len({id(st) for st, _ in held}) == 1:  # runs left the stack: one gather of columns
        st = held[0][0]
        cols = np.array([col for _, col in held])
        labels = np.take(
            st.labels, cols, axis=1
        )  # np.take: 2-9x numpy's fancy indexing of columns here
        if has_bounds:
            bounds = {
                name: np.take(
                    getattr(st, name),
                    _columns(st.offsets, cols) if name == "cbound" else cols,
                    axis=1,
                )
                for name in names
            }
    else:

        def column(st: ChunkState, col: int, name: str) -> np.ndarray:
            if name == "cbound":
                return st.cbound[:, st.offsets[col] : st.offsets[col + 1]]
            return getattr(st, name)[:, col]

        labels = np.stack([column(st, col, "labels") for st, col in held], axis=1)
        if has_bounds:
            bounds = {
                name: (np.concatenate if name == "cbound" else np.stack)(
                    [column(st, col, name) for st, col in held], axis=1
                )
                for name in names
            }
    touched = [
        (p, patches[int(rid)]) for p, rid in enumerate(run_ids) if patches and int(rid) in patches
    ]
    if touched:  # the states are shared (threaded scheduler, retries): patch copies
        labels = labels.copy()
        bounds = {name: a if name == "cbound" else a.copy() for name, a in bounds.items()}
    for p, (idx, lab) in touched:
        inside = (idx >= start) & (idx < start + n)
        rows = idx[inside] - start
        labels[rows, p] = lab[inside]
        if bounds:  # moved by the driver to another centroid: no bound on that distance
            bounds["upper"][rows, p] = np.inf
            if (
                not per_centroid
            ):  # and the old nearest, now one of the others, is below any bound kept
                bounds["lower"][rows, p] = 0.0
                bounds["second"][rows, p] = -1
            # (per-centroid bounds hold whatever the label: the relocated centroid's jump is in its move)
    return _Prior(
        labels, bounds.get("upper"), bounds.get("lower"), bounds.get("second"), bounds.get("cbound")
    )


def _columns(offsets: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """The stacked centroid columns of stack positions ``runs``, in that order."""
    return np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in runs])


def combine(parts: list[Partial]) -> Partial:
    """Add partials of disjoint row sets (order fixed by the caller: deterministic)."""
    first = parts[0]
    m = first.cand_d.shape[1]
    cd = np.concatenate([p.cand_d for p in parts], axis=1)
    ci = np.concatenate([p.cand_i for p in parts], axis=1)
    cl = np.concatenate([p.cand_l for p in parts], axis=1)
    order = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), -cd), axis=1)[:, :m]
    sum_cols, sums = _add_sums(parts)
    return Partial(
        sums=sums,
        counts=np.sum([p.counts for p in parts], axis=0),
        sqnorm=float(sum(p.sqnorm for p in parts)),
        cand_d=np.take_along_axis(cd, order, axis=1),
        cand_i=np.take_along_axis(ci, order, axis=1),
        cand_l=np.take_along_axis(cl, order, axis=1),
        eval_sse=np.sum([p.eval_sse for p in parts], axis=0),
        eval_dist=np.sum([p.eval_dist for p in parts], axis=0),
        labels=[lab for p in parts for lab in p.labels],
        delta=first.delta,
        pruned=any(p.pruned for p in parts),
        sum_cols=sum_cols,
    )


def _add_sums(parts: list[Partial]) -> tuple[np.ndarray | None, np.ndarray]:
    """The partials' sums added in the given order, sparse while fewer than all columns are touched."""
    if all(p.sum_cols is None for p in parts):
        if all(
            p.sums.dtype.kind == "i" for p in parts
        ):  # exact in any order: add in place, no stacked copy
            out = parts[0].sums.astype(np.int64)
            for p in parts[1:]:
                out += p.sums
            return None, out
        return None, np.sum([p.sums for p in parts], axis=0)
    kt = parts[0].counts.size
    every = np.arange(kt)
    cols = np.unique(np.concatenate([every if p.sum_cols is None else p.sum_cols for p in parts]))
    out = np.zeros((cols.size, parts[0].sums.shape[1]))
    for p in (
        parts
    ):  # compiled: numpy's fancy-index add gathers, adds and scatters (~2 s of driver time a grid)
        _nearest.add_rows(
            out, np.searchsorted(cols, every if p.sum_cols is None else p.sum_cols), p.sums
        )
    return (None if cols.size == kt else cols), out
