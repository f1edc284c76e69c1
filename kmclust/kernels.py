"""Per-chunk Lloyd work for a stack of runs: pure numpy, no dask.

A *stack* holds the centroids of R runs one above the other (ΣK × D) with
``offsets`` (R + 1,) marking where each run's block starts. One GEMM of the
chunk against the whole stack serves every run; the rest is vectorised over
runs (no Python loop over samples or runs in the hot path).

Units: the kernel works in the data's own units (0–255 for uint8 images).
uint8 rows are computed in float32; per-cluster sums of uint8 data are exact
integers in float32 as long as a chunk has fewer than ``EXACT_UINT8_ROWS``
rows (255 · n < 2**24), so partial sums do not depend on chunking or on the
reduction order. Float input is computed in its own precision with float64
sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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


def _segments(ks: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal k in stack order: (first run, number of runs, k)."""
    cuts = np.flatnonzero(np.diff(ks)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [ks.size]])
    return [(int(a), int(b - a), int(ks[a])) for a, b in zip(starts, stops)]


def assign(
    xf: np.ndarray, centroids: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each run for each row.

    Returns ``labels`` (n, R) int64 local to each run's block and ``dmin``
    (n, R) the squared distance ‖x‖² + min(‖c‖² − 2x·c) in ``xf``'s dtype
    (approximate: used for choosing relocation candidates, never for J).
    Runs of equal k that sit next to each other in the stack are handled as
    one (n, runs, k) view, so the engine orders stacks by k.
    """
    ks = np.diff(offsets)
    n, r = xf.shape[0], ks.size
    dist = xf @ (centroids * -2.0).T  # (n, KT): the one GEMM; ×(−2) is exact
    dist += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    labels = np.empty((n, r), dtype=np.int64)
    dmin = np.empty((n, r), dtype=dist.dtype)
    for first, count, k in _segments(ks):
        block = dist[:, offsets[first] : offsets[first + count]].reshape(n, count, k)
        lab = block.argmin(axis=2)
        labels[:, first : first + count] = lab
        dmin[:, first : first + count] = np.take_along_axis(block, lab[:, :, None], axis=2)[:, :, 0]
    dmin += np.einsum("ij,ij->i", xf, xf)[:, None]
    np.maximum(dmin, 0, out=dmin)
    return labels, dmin


def cluster_sums(
    x: np.ndarray, xf: np.ndarray, labels: np.ndarray, offsets: np.ndarray, integer: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (KT, D) float64 and counts (KT,) via a one-hot GEMM.

    Integer-valued chunks (uint8 pixels) below ``EXACT_UINT8_ROWS`` rows use a
    float32 GEMM whose integer results are exact; anything else accumulates
    in float64.
    """
    n = x.shape[0]
    kt = int(offsets[-1])
    cols = labels + offsets[:-1][None, :]  # (n, R) stacked cluster index
    counts = np.bincount(cols.ravel(), minlength=kt).astype(np.int64)
    exact32 = integer and n <= EXACT_UINT8_ROWS
    dt = np.float32 if exact32 else np.float64
    onehot = np.zeros((n, kt), dtype=dt)
    np.put_along_axis(onehot, cols, 1.0, axis=1)
    data = xf if exact32 else x.astype(np.float64, copy=False)
    sums = (onehot.T @ data).astype(np.float64, copy=False)
    return sums, counts


def delta_sums(
    xf: np.ndarray, labels: np.ndarray, old: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Change of the per-cluster sums and counts when labels go from ``old`` to ``labels``.

    Only rows whose label changed for some run take part (one small GEMM of
    ±1 entries), so late iterations cost almost nothing. Exact for
    integer-valued chunks below ``EXACT_UINT8_ROWS`` rows.
    """
    kt = int(offsets[-1])
    changed = labels != old
    rows = np.flatnonzero(changed.any(axis=1))
    sums = np.zeros((kt, xf.shape[1]))
    counts = np.zeros(kt, dtype=np.int64)
    if rows.size == 0:
        return sums, counts
    rr, runs = np.nonzero(changed[rows])
    new_cols = offsets[runs] + labels[rows[rr], runs]
    old_cols = offsets[runs] + old[rows[rr], runs]
    signed = np.zeros((rows.size, kt), dtype=xf.dtype)
    signed[rr, new_cols] = 1.0  # a run's old and new column differ, runs' blocks are disjoint
    signed[rr, old_cols] = -1.0
    sums[:] = signed.T @ xf[rows]
    counts += np.bincount(new_cols, minlength=kt) - np.bincount(old_cols, minlength=kt)
    return sums, counts


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

    One float64 GEMM against all their centroids; ‖x‖² − 2x·z + ‖z‖² in
    float64 loses ~1e-16·‖x‖² per point, far below float32's cancellation.
    """
    x64 = x.astype(np.float64, copy=False)
    xsq = np.einsum("ij,ij->i", x64, x64)
    cents = [evals[p] for p in sorted(evals)]
    stack = np.concatenate(cents)
    gram = x64 @ stack.T
    csq = np.einsum("ij,ij->i", stack, stack)
    rows = np.arange(x.shape[0])
    out, lo = {}, 0
    for p, c in zip(sorted(evals), cents):
        cols = lo + labels[:, p]
        sq = np.maximum(xsq - 2.0 * gram[rows, cols] + csq[cols], 0.0)
        out[p] = (float(sq.sum()), float(np.sqrt(sq).sum()))
        lo += c.shape[0]
    return out


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
    prev: list[dict[int, np.ndarray]] | None = None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[Partial, dict[int, np.ndarray]]:
    """One chunk's contribution to one Lloyd iteration of a stack of runs.

    ``centroids`` (KT, D) are in the compute dtype; ``run_ids`` name the
    stack's runs; ``eval_centroids`` maps a stack position to float64
    centroids when that run is being evaluated (final labels, exact J); ``m``
    is how many relocation candidates to keep per run. For integer-valued
    data the chunk's labels are returned as state (run id → labels) and, when
    ``prev`` holds every active run's previous labels (after the driver's
    relocation ``patches``), the partial carries *changes* of the sums
    (``delta=True``) instead of the sums. Trusts its inputs.
    """
    xf = x.astype(compute_dtype(x.dtype), copy=False)
    labels, dmin = assign(xf, centroids, offsets)
    old = _previous(prev, patches, run_ids, eval_centroids, start, labels) if integer else None
    if old is not None:
        sums, counts = delta_sums(xf, labels, old, offsets)
    else:
        sums, counts = cluster_sums(x, xf, labels, offsets, integer)
    x64 = x.astype(np.float64, copy=False)
    sqnorm = float(np.einsum("ij,ij->", x64, x64))
    cand_d, cand_i, cand_l = farthest(dmin, labels, start, m)
    r = offsets.size - 1
    eval_sse = np.zeros(r)
    eval_dist = np.zeros(r)
    out_labels: list[tuple[int, np.ndarray]] = []
    if want_errors and eval_centroids:
        for pos, (sse, dist) in exact_errors(x, eval_centroids, labels).items():
            eval_sse[pos], eval_dist[pos] = sse, dist
    if want_labels and eval_centroids:
        cols = sorted(eval_centroids)
        out_labels.append((start, labels[:, cols].astype(np.int32)))
    state = {}
    if integer:
        state = {int(rid): labels[:, p].astype(np.int32) for p, rid in enumerate(run_ids) if p not in eval_centroids}
    part = Partial(sums, counts, sqnorm, cand_d, cand_i, cand_l, eval_sse, eval_dist, out_labels, old is not None)
    return part, state


def _previous(
    prev: list[dict[int, np.ndarray]] | None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None,
    run_ids: np.ndarray,
    evals: dict[int, np.ndarray],
    start: int,
    labels: np.ndarray,
) -> np.ndarray | None:
    """Previous labels (n, R) with relocation patches applied; None unless every active run has them."""
    if not prev:
        return None
    known: dict[int, np.ndarray] = {}
    for d in prev:
        known.update(d)
    old = labels.copy()  # evaluated runs: "unchanged" (their sums are not used)
    n = labels.shape[0]
    for p, rid in enumerate(run_ids):
        if p in evals:
            continue
        if int(rid) not in known:
            return None
        old[:, p] = known[int(rid)]
        if patches and int(rid) in patches:
            idx, lab = patches[int(rid)]
            inside = (idx >= start) & (idx < start + n)
            old[idx[inside] - start, p] = lab[inside]
    return old


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
    )
