"""Per-chunk Lloyd work for a stack of runs: numpy and the compiled loops of :mod:`kmclust.nearest`, no dask.

A *stack* holds the centroids of R runs one above the other (ΣK × D) with
``offsets`` (R + 1,) marking where each run's block starts. One GEMM of the
chunk against the whole stack serves every run; the rest is vectorised over
runs or compiled (no Python loop over samples in the hot path).

Units: the kernel works in the data's own units (0–255 for uint8 images).
uint8 rows are computed in float32; per-cluster sums of uint8 data are exact
integers in float32 as long as a chunk has fewer than ``EXACT_UINT8_ROWS``
rows (255 · n < 2**24), so partial sums do not depend on chunking or on the
reduction order. Float input is computed in its own precision with float64
sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse

from kmclust import nearest as _nearest

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
    for relocating empty clusters. ``eval_*`` are exact float64 sums for the
    runs flagged for evaluation, and ``labels`` their labels by chunk start.
    """

    sums: np.ndarray  # (KT, D) float64
    counts: np.ndarray  # (KT,) int64
    sqnorm: float  # Σ‖x‖² over the rows, float64
    cand_d: np.ndarray  # (R, m) float64
    cand_i: np.ndarray  # (R, m) int64, global row index (-1: none)
    cand_l: np.ndarray  # (R, m) int64, local label of the candidate
    eval_sse: np.ndarray  # (R,) float64
    eval_dist: np.ndarray  # (R,) float64, Σ‖x − z‖
    labels: list[tuple[int, np.ndarray]] = field(default_factory=list)
    delta: bool = False  # sums/counts are changes since the previous pass
    pruned: bool = False  # some rows were skipped: cand_d are upper bounds


def assign(
    xf: np.ndarray, centroids: np.ndarray, offsets: np.ndarray, second: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid of each run for each row.

    Returns ``labels`` (n, R) int64 local to each run's block, the exact
    nearest (:mod:`kmclust.nearest`), and ``dmin`` (n, R) the computed squared
    distance ‖x‖² + ‖c‖² − 2x·c in ``xf``'s dtype (approximate: used for
    relocation candidates and bounds, never for J). ``second=True`` also
    returns a lower bound on the squared distance to every other centroid of
    the run (inf when k = 1), which lets later passes skip rows.
    """
    dist = distances(xf, centroids)
    xsq = np.einsum("ij,ij->i", xf, xf)
    labels, d2 = nearest(dist, offsets, xf, centroids, xsq)
    dmin = min_distances(dist, labels, offsets, xsq, np.arange(offsets.size - 1))
    if not second:
        return labels, dmin
    d2 += xsq[:, None]
    np.maximum(d2, 0, out=d2)
    return labels, dmin, d2


def distances(xf: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, KT) ‖c‖² − 2x·c: the one GEMM against the whole stack (×(−2) is exact); ‖x‖² left out."""
    dist = xf @ (centroids * -2.0).T
    dist += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return dist


def nearest(
    dist: np.ndarray, offsets: np.ndarray, xf: np.ndarray, centroids: np.ndarray, xsq: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid (n, R) of each run and the second-nearest computed value (n, R), ‖x‖² left out."""
    c64 = centroids.astype(np.float64)
    bound = _nearest.error_bound(xsq, np.einsum("ij,ij->i", c64, c64).max(), xf.shape[1], dist.dtype)
    return _nearest.nearest(dist, offsets, xf, centroids, bound)


def min_distances(
    dist: np.ndarray, labels: np.ndarray, offsets: np.ndarray, xsq: np.ndarray, runs: np.ndarray
) -> np.ndarray:
    """(n, len(runs)) squared distance of each row to its centroid in the given runs, clipped at 0."""
    cols = labels[:, runs] + offsets[runs][None, :]
    dmin = np.take_along_axis(dist, cols, axis=1)
    dmin += xsq[:, None]
    np.maximum(dmin, 0, out=dmin)
    return dmin


def runs_with_empty_cluster(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stack positions of the runs with a cluster no row of this chunk is in.

    A cluster empty over the whole data set is empty in every chunk, so these
    are the only runs whose relocation candidates can ever be needed.
    """
    counts = np.bincount((labels + offsets[:-1][None, :]).ravel(), minlength=int(offsets[-1]))
    return np.flatnonzero(np.minimum.reduceat(counts, offsets[:-1]) == 0)


#: Above one entry per this many cells of the (n × kt) one-hot, its dense GEMM beats the sparse product.
DENSE_SHARE = 20


def signed_sums(
    data: np.ndarray, rows: np.ndarray, cols: np.ndarray, signs: np.ndarray, kt: int
) -> np.ndarray:
    """Σ signs · data[rows] into columns ``cols`` of a (kt, D) float64 result; (row, col) pairs are unique.

    A sparse (kt × n) matrix of the ±1 entries times the chunk: the cost
    scales with the number of entries, not with n · kt as a dense one-hot
    GEMM would, except when entries are so many that the dense GEMM's
    speed wins. Sums of integer values below 2**24 are exact in float32
    whatever the order, so integer chunks keep their exact sums.
    """
    n = data.shape[0]
    if cols.size * DENSE_SHARE >= n * kt:  # one-hot GEMM: ~20× faster per entry than the sparse product
        onehot = np.zeros((n, kt), dtype=data.dtype)
        onehot[rows, cols] = signs
        return (onehot.T @ data).astype(np.float64, copy=False)
    mat = scipy.sparse.csr_matrix((signs.astype(data.dtype), (cols, rows)), shape=(kt, n))
    return np.asarray(mat @ data, dtype=np.float64)


def cluster_sums(
    x: np.ndarray, xf: np.ndarray, labels: np.ndarray, offsets: np.ndarray, integer: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (KT, D) float64 and counts (KT,).

    Integer-valued chunks (uint8 pixels) below ``EXACT_UINT8_ROWS`` rows sum
    in float32, whose integer results are exact; anything else accumulates
    in float64.
    """
    n, r = labels.shape
    kt = int(offsets[-1])
    cols = (labels + offsets[:-1][None, :]).ravel()  # (n · R) stacked cluster index, row-major
    rows = np.repeat(np.arange(n), r)
    counts = np.bincount(cols, minlength=kt).astype(np.int64)
    exact32 = integer and n <= EXACT_UINT8_ROWS
    data = xf if exact32 else x.astype(np.float64, copy=False)
    return signed_sums(data, rows, cols, np.ones(cols.size, dtype=data.dtype), kt), counts


def delta_sums(
    xf: np.ndarray, labels: np.ndarray, old: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Change of the per-cluster sums and counts when labels go from ``old`` to ``labels``.

    Only the (row, run) pairs whose label changed take part (+row into the
    new cluster, −row out of the old one), so late iterations cost almost
    nothing. Exact for integer-valued chunks below ``EXACT_UINT8_ROWS`` rows.
    """
    kt = int(offsets[-1])
    rr, runs = np.nonzero(labels != old)
    new_cols = offsets[runs] + labels[rr, runs]
    old_cols = offsets[runs] + old[rr, runs]
    counts = np.bincount(new_cols, minlength=kt) - np.bincount(old_cols, minlength=kt)
    if rr.size == 0:
        return np.zeros((kt, xf.shape[1])), counts.astype(np.int64)
    signs = np.concatenate([np.ones(rr.size), -np.ones(rr.size)])
    sums = signed_sums(xf, np.concatenate([rr, rr]), np.concatenate([new_cols, old_cols]), signs, kt)
    return sums, counts.astype(np.int64)


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
) -> dict[int, tuple[float, float]]:
    """Σ‖x − z‖² and Σ‖x − z‖ in float64 for the runs at stack positions ``evals``.

    Each row's distance to its own centroid is summed directly in float64
    (compiled loop): no float32 cancellation, no float64 copy of the chunk.
    """
    out = {}
    for p in sorted(evals):
        sq = _nearest.squared_errors(x, evals[p], labels[:, p])
        out[p] = (float(sq.sum()), float(np.sqrt(sq).sum()))
    return out


#: Runs needing more than this share of a chunk's rows are computed apart from the settled ones.
BUSY_SHARE = 0.15


@dataclass
class _Prior:
    """A chunk's memory of the previous pass for every run of the stack."""

    labels: np.ndarray  # (n, R) int64, relocation patches applied
    upper: np.ndarray | None  # (n, R) float64 distance bounds, or None when not pruning
    lower: np.ndarray | None


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
    prev: list[dict] | None = None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    drift: dict[int, np.ndarray] | None = None,
    prune: bool = False,
) -> tuple[Partial, dict[int, tuple]]:
    """One chunk's contribution to one Lloyd iteration of a stack of runs.

    ``centroids`` (KT, D) are in the compute dtype; ``run_ids`` name the
    stack's runs; ``eval_centroids`` maps a stack position to float64
    centroids when that run is being evaluated (final labels, exact J); ``m``
    is how many relocation candidates to keep per run. For integer-valued
    data the chunk's labels are returned as state (run id → (labels, upper,
    lower)) and, when ``prev`` holds every run's previous state (after the
    driver's relocation ``patches``), the partial carries *changes* of the
    sums (``delta=True``). With ``prune`` and the centroids' ``drift`` since
    the previous pass, Hamerly-style bounds (distance to the assigned
    centroid ≤ upper, to any other ≥ lower) skip the rows whose label cannot
    change in any run; relocation candidates are then only upper bounds
    (``pruned=True``). Trusts its inputs.
    """
    xf = x.astype(compute_dtype(x.dtype), copy=False)
    prior = _previous(prev, patches, run_ids, start, x.shape[0]) if integer else None
    pruned = prune and prior is not None and prior.upper is not None and drift is not None
    if pruned:
        labels, dmin, upper, lower = _pruned_assign(xf, centroids, offsets, run_ids, prior, drift)
    elif prune and integer:
        labels, dmin, d2 = assign(xf, centroids, offsets, second=True)
        upper, lower = np.sqrt(dmin.astype(np.float64)), np.sqrt(d2.astype(np.float64))
    else:
        dist = distances(xf, centroids)
        xsq = np.einsum("ij,ij->i", xf, xf)
        labels, _ = nearest(dist, offsets, xf, centroids, xsq)
        upper = lower = dmin = None
    if prior is not None:
        sums, counts = delta_sums(xf, labels, prior.labels, offsets)
    else:
        sums, counts = cluster_sums(x, xf, labels, offsets, integer)
    # Σ‖x‖² never changes: integer data send it with the first pass only (the driver keeps it)
    sqnorm = _sqnorm(x) if prior is None else math.nan
    r = offsets.size - 1
    needy = runs_with_empty_cluster(labels, offsets)
    cand_d, cand_i, cand_l = np.full((r, m), -np.inf), np.full((r, m), -1), np.full((r, m), -1)
    if needy.size:
        if dmin is None:
            dmin = min_distances(dist, labels, offsets, xsq, needy)
        else:
            dmin = dmin[:, needy]
        cand_d[needy], cand_i[needy], cand_l[needy] = farthest(dmin, labels[:, needy], start, m)
    eval_sse = np.zeros(r)
    eval_dist = np.zeros(r)
    out_labels: list[tuple[int, np.ndarray]] = []
    if want_errors and eval_centroids:
        for pos, (sse, dist) in exact_errors(x, eval_centroids, labels).items():
            eval_sse[pos], eval_dist[pos] = sse, dist
    if want_labels and eval_centroids:
        cols = sorted(eval_centroids)
        out_labels.append((start, labels[:, cols].astype(np.int32)))
    state: dict[int, tuple] = {}
    if integer:
        for p, rid in enumerate(run_ids):
            bounds = (upper[:, p].copy(), lower[:, p].copy()) if upper is not None else (None, None)
            state[int(rid)] = (labels[:, p].astype(np.int32), *bounds)
    part = Partial(sums, counts, sqnorm, cand_d, cand_i, cand_l, eval_sse, eval_dist, out_labels,
                   prior is not None, pruned)
    return part, state


def _sqnorm(x: np.ndarray) -> float:
    """Σ‖x‖² of a chunk in float64 (exact for integer pixels), a block of rows at a time."""
    total = 0.0
    for lo in range(0, x.shape[0], 4096):
        blk = x[lo : lo + 4096].astype(np.float64)
        total += float(np.einsum("ij,ij->", blk, blk))
    return total


def _pruned_assign(
    xf: np.ndarray, centroids: np.ndarray, offsets: np.ndarray, run_ids: np.ndarray,
    prior: _Prior, drift: dict[int, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels with bounds: recompute only rows where some run's label might change.

    After the centroids moved by ``drift`` (per cluster), a row keeps its
    label in run r if lower² − upper² clears twice the distances' error bound; the
    remaining rows get the full GEMM against the whole stack (all runs).
    """
    n = xf.shape[0]
    labels = prior.labels.copy()
    ks = np.diff(offsets)
    moved = np.concatenate([np.asarray(drift.get(int(rid), np.full(k, np.inf)), dtype=np.float64)
                            for rid, k in zip(run_ids, ks)])  # (KT,) how far each centroid moved
    c64 = centroids.astype(np.float64)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    xsq = np.einsum("ij,ij->i", xf, xf).astype(np.float64)
    # the bounds started from computed squared distances, each off by at most error_bound
    slack = 2.0 * _nearest.error_bound(1.0, 0.0, xf.shape[1], xf.dtype)  # per unit of ‖x‖² + 2 max‖c‖²
    upper, lower, need = _nearest.moved_bounds(labels, prior.upper, prior.lower, moved, offsets,
                                               slack * xsq, slack * 2.0 * csq_max)
    dmin = np.square(upper)  # upper bounds for rows that keep their label
    # Runs still moving need most rows: one fat GEMM over the union of their rows. Settled runs
    # need a few rows each, mostly different ones: each gets a thin GEMM over its own rows.
    share = need.mean(axis=0)
    busy = np.flatnonzero(share > BUSY_SHARE)
    jobs = [(busy, np.flatnonzero(need[:, busy].any(axis=1)))] if busy.size else []
    jobs += [(np.array([p]), np.flatnonzero(need[:, p])) for p in np.flatnonzero(share <= BUSY_SHARE)]
    for sel, rows in jobs:
        if rows.size == 0:
            continue
        if rows.size > 0.9 * n:  # nearly all rows: no gather
            rows = np.arange(n)
        cols = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in sel])
        sub_offsets = np.concatenate([[0], np.cumsum(ks[sel])])
        lab, d1, d2 = assign(xf[rows] if rows.size < n else xf, centroids[cols], sub_offsets, second=True)
        at = np.ix_(rows, sel)
        labels[at] = lab
        dmin[at] = d1
        upper[at] = np.sqrt(d1.astype(np.float64))
        lower[at] = np.sqrt(d2.astype(np.float64))
    return labels, dmin, upper, lower


def _previous(
    prev: list[dict] | None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None,
    run_ids: np.ndarray,
    start: int,
    n: int,
) -> _Prior | None:
    """Every run's previous labels (and bounds) with relocation patches applied; None if any is missing."""
    if not prev:
        return None
    known: dict[int, tuple] = {}
    for d in prev:
        known.update(d)
    if any(int(rid) not in known for rid in run_ids):
        return None
    labels = np.stack([known[int(rid)][0] for rid in run_ids], axis=1).astype(np.int64)
    has_bounds = all(known[int(rid)][1] is not None for rid in run_ids)
    upper = np.stack([known[int(rid)][1] for rid in run_ids], axis=1) if has_bounds else None
    lower = np.stack([known[int(rid)][2] for rid in run_ids], axis=1) if has_bounds else None
    for p, rid in enumerate(run_ids):
        if patches and int(rid) in patches:
            idx, lab = patches[int(rid)]
            inside = (idx >= start) & (idx < start + n)
            labels[idx[inside] - start, p] = lab[inside]
            if upper is not None:
                upper[idx[inside] - start, p] = np.inf  # moved by the driver: recompute
    return _Prior(labels, upper, lower)


def combine(parts: list[Partial]) -> Partial:
    """Add partials of disjoint row sets (order fixed by the caller: deterministic)."""
    first = parts[0]
    m = first.cand_d.shape[1]
    cd = np.concatenate([p.cand_d for p in parts], axis=1)
    ci = np.concatenate([p.cand_i for p in parts], axis=1)
    cl = np.concatenate([p.cand_l for p in parts], axis=1)
    order = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), -cd), axis=1)[:, :m]
    return Partial(
        sums=np.sum([p.sums for p in parts], axis=0),
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
    )
