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
#: Rows per block for the exact float64 evaluation (bounds temporary memory).
_EVAL_BLOCK = 2048


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


def assign(
    xf: np.ndarray, centroids: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each run for each row.

    Returns ``labels`` (n, R) int64 local to each run's block and ``dmin``
    (n, R) the squared distance ‖x‖² + min(‖c‖² − 2x·c) in ``xf``'s dtype
    (approximate: used for choosing relocation candidates, never for J).
    """
    ks = np.diff(offsets)
    n, r = xf.shape[0], ks.size
    dist = xf @ centroids.T  # (n, KT): the one GEMM
    dist *= -2.0
    dist += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    kmax = int(ks.max())
    if np.all(ks == kmax):
        blocks = dist.reshape(n, r, kmax)
    else:  # pad every run's block to kmax with +inf columns
        col = offsets[:-1, None] + np.arange(kmax)[None, :]
        col = np.where(np.arange(kmax)[None, :] < ks[:, None], col, dist.shape[1])
        padded = np.concatenate([dist, np.full((n, 1), np.inf, dist.dtype)], axis=1)
        blocks = padded[:, col]
    labels = blocks.argmin(axis=2)
    dmin = np.take_along_axis(blocks, labels[:, :, None], axis=2)[:, :, 0]
    dmin += np.einsum("ij,ij->i", xf, xf)[:, None]
    np.maximum(dmin, 0, out=dmin)
    return labels, dmin


def cluster_sums(
    x: np.ndarray, xf: np.ndarray, labels: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (KT, D) float64 and counts (KT,) via a one-hot GEMM.

    uint8 chunks below ``EXACT_UINT8_ROWS`` rows use a float32 GEMM whose
    integer results are exact; anything else accumulates in float64.
    """
    n = x.shape[0]
    kt = int(offsets[-1])
    cols = labels + offsets[:-1][None, :]  # (n, R) stacked cluster index
    counts = np.bincount(cols.ravel(), minlength=kt).astype(np.int64)
    exact32 = x.dtype == np.uint8 and n <= EXACT_UINT8_ROWS
    dt = np.float32 if exact32 else np.float64
    onehot = np.zeros((n, kt), dtype=dt)
    np.put_along_axis(onehot, cols, 1.0, axis=1)
    data = xf if exact32 else x.astype(np.float64, copy=False)
    sums = (onehot.T @ data).astype(np.float64, copy=False)
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
    x: np.ndarray, centroids64: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    """Σ‖x − z‖² and Σ‖x − z‖ for one run in float64, by direct differences."""
    sse = 0.0
    dist = 0.0
    for lo in range(0, x.shape[0], _EVAL_BLOCK):
        diff = x[lo : lo + _EVAL_BLOCK].astype(np.float64) - centroids64[labels[lo : lo + _EVAL_BLOCK]]
        sq = np.einsum("ij,ij->i", diff, diff)
        sse += float(sq.sum())
        dist += float(np.sqrt(sq).sum())
    return sse, dist


def lloyd_chunk(
    x: np.ndarray,
    start: int,
    centroids: np.ndarray,
    offsets: np.ndarray,
    eval_centroids: dict[int, np.ndarray],
    m: int,
    want_labels: bool,
    want_errors: bool = True,
) -> Partial:
    """One chunk's contribution to one Lloyd iteration of a stack of runs.

    ``centroids`` (KT, D) are in the compute dtype; ``eval_centroids`` maps a
    run's position in the stack to its float64 centroids when that run is
    being evaluated (final labels, exact J); ``m`` is how many relocation
    candidates to keep per run; ``want_errors=False`` skips the exact
    evaluation (labels only). Trusts its inputs (the engine validates).
    """
    xf = x.astype(compute_dtype(x.dtype), copy=False)
    labels, dmin = assign(xf, centroids, offsets)
    sums, counts = cluster_sums(x, xf, labels, offsets)
    x64 = x.astype(np.float64, copy=False)
    sqnorm = float(np.einsum("ij,ij->", x64, x64))
    cand_d, cand_i, cand_l = farthest(dmin, labels, start, m)
    r = offsets.size - 1
    eval_sse = np.zeros(r)
    eval_dist = np.zeros(r)
    out_labels: list[tuple[int, np.ndarray]] = []
    for pos, c64 in eval_centroids.items() if want_errors else ():
        eval_sse[pos], eval_dist[pos] = exact_errors(x, c64, labels[:, pos])
    if want_labels and eval_centroids:
        cols = sorted(eval_centroids)
        out_labels.append((start, labels[:, cols].astype(np.int32)))
    return Partial(sums, counts, sqnorm, cand_d, cand_i, cand_l, eval_sse, eval_dist, out_labels)


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
    )
