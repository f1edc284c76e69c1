"""What a chunk task gives back: its :class:`Partial` (added up over chunks) and its
:class:`ChunkState` (kept for the chunk's next pass), and :func:`combine`, which adds partials."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kmclust.lloyd import exact as _exact
from kmclust.lloyd.chunk import dense_columns


@dataclass
class Partial:
    """What one chunk (or a reduction of chunks) contributes for a stack.

    ``cand_*`` hold, per run, the ``m`` points farthest from their assigned
    centroid in decreasing distance (ties by global index): the candidates
    for relocating empty clusters. ``eval_*`` are, for the runs flagged for
    evaluation, the exact sums (Fractions, :func:`kmclust.lloyd.exact.exact_sum`)
    of the rows' float64 distances: the same however the rows are chunked.
    ``labels`` are those runs' labels by chunk start. With sample weights
    ``sums`` are packed weighted sums (:mod:`kmclust.lloyd.weighted`; int64 for
    uint8 rows) and ``counts`` count the rows of positive weight.
    """

    sums: np.ndarray  # (KT, D) float64; int32 (exact) from uint8 chunks, int64 once added up
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
    sum_cols: np.ndarray | None = None  # the stacked columns in sums (others 0); None: all
    wsqnorm: object = None  # weighted: Fraction Σ w‖x‖² (first pass; None otherwise)

    def dense_sums(self) -> np.ndarray:
        """(KT, D) sums, zeros filled in where a sparse partial left columns out."""
        return dense_columns(self.sum_cols, self.sums, self.counts.size)


@dataclass
class ChunkState:
    """What a chunk task leaves on its worker for the next pass: its stack's labels and bounds."""

    run_ids: np.ndarray  # (R,)
    labels: np.ndarray  # (n, R) int32
    upper: np.ndarray | None  # (n, R) float64 distance bounds, or None when not pruning
    lower: np.ndarray | None  # (n, R, 2) float64 (see kmclust.lloyd.bounds.moved_bounds)
    xsq: np.ndarray | None = None  # (n,) the rows' ‖x‖² in the compute dtype (they never change)
    second: np.ndarray | None = None  # (n, R) int32 each run's second-nearest centroid (−1: none)
    cbound: np.ndarray | None = None  # (n, ΣK) float32 per-centroid lower bounds (no lower, second)
    offsets: np.ndarray | None = None  # (R + 1,) the stack's offsets (the runs' cbound columns)
    gbound: np.ndarray | None = None  # (n, G) float32 per-group lower bounds (kmclust.lloyd.groups)
    groups: object = None  # the stack's Groups, with gbound


def combine(parts: list[Partial]) -> Partial:
    """Add partials of disjoint row sets (order fixed by the caller: deterministic)."""
    first = parts[0]
    sum_cols, sums = _add_sums(parts)
    cand_d, cand_i, cand_l = _candidates(parts)
    return Partial(
        sums=sums,
        counts=_added([p.counts for p in parts]),
        sqnorm=float(sum(p.sqnorm for p in parts)),
        cand_d=cand_d,
        cand_i=cand_i,
        cand_l=cand_l,
        eval_sse=_added([p.eval_sse for p in parts]),
        eval_dist=_added([p.eval_dist for p in parts]),
        labels=[lab for p in parts for lab in p.labels],
        delta=first.delta,
        pruned=any(p.pruned for p in parts),
        sum_cols=sum_cols,
        wsqnorm=None if any(p.wsqnorm is None for p in parts) else sum(p.wsqnorm for p in parts),
    )


def _added(arrays: list[np.ndarray]) -> np.ndarray:
    """Element-wise sum of exact values (int64 counts; ints and Fractions): the same in any order,
    so added in place rather than stacked and reduced (a pass's fixed cost, paid per group)."""
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def _candidates(parts: list[Partial]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run, the ``m`` farthest of the parts' candidates, in decreasing distance (ties by
    global index). While no part has any (no cluster empty: nearly every pass), the first part's
    empty rows are the answer, with no sort."""
    first = parts[0]
    if not any((p.cand_i[:, :1] >= 0).any() for p in parts):  # a run's first slot is filled first
        return first.cand_d, first.cand_i, first.cand_l
    m = first.cand_d.shape[1]
    cd = np.concatenate([p.cand_d for p in parts], axis=1)
    ci = np.concatenate([p.cand_i for p in parts], axis=1)
    cl = np.concatenate([p.cand_l for p in parts], axis=1)
    order = np.lexsort((np.where(ci < 0, np.iinfo(np.int64).max, ci), -cd), axis=1)[:, :m]
    return (
        np.take_along_axis(cd, order, axis=1),
        np.take_along_axis(ci, order, axis=1),
        np.take_along_axis(cl, order, axis=1),
    )


def _add_sums(parts: list[Partial]) -> tuple[np.ndarray | None, np.ndarray]:
    """The partials' sums added in the given order; sparse while some columns are untouched."""
    if all(p.sum_cols is None for p in parts):
        if all(p.sums.dtype.kind == "i" for p in parts):
            # exact in any order: add in place, no stacked copy
            out = parts[0].sums.astype(np.int64)
            for p in parts[1:]:
                out += p.sums
            return None, out
        return None, np.sum([p.sums for p in parts], axis=0)
    kt = parts[0].counts.size
    every = np.arange(kt)
    cols = np.unique(np.concatenate([every if p.sum_cols is None else p.sum_cols for p in parts]))
    exact = all(p.sums.dtype == np.int64 for p in parts)  # packed weighted sums stay integers
    out = np.zeros((cols.size, parts[0].sums.shape[1]), dtype=np.int64 if exact else np.float64)
    for p in parts:  # compiled: numpy's fancy-index add gathers, adds and scatters (slow here)
        _exact.add_rows(
            out, np.searchsorted(cols, every if p.sum_cols is None else p.sum_cols), p.sums
        )
    return (None if cols.size == kt else cols), out
