"""One chunk task: what it is asked (:class:`ChunkArgs`) and what it does (:func:`lloyd_chunk`).

Numpy and compiled loops, no dask: the
building blocks are in :mod:`kmclust.lloyd.chunk`, the bounds that skip rows
in :mod:`kmclust.lloyd.prune`, the outputs in :mod:`kmclust.lloyd.partial`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import numpy as np

from kmclust.lloyd import distance as _distance
from kmclust.lloyd import weighted
from kmclust.lloyd.chunk import (
    assign,
    blocks,
    cluster_sums,
    delta_sums,
    exact_errors,
    farthest,
    runs_with_empty_cluster,
)
from kmclust.lloyd.partial import ChunkState, Partial
from kmclust.lloyd.prune import centroid_bounds, previous, pruned_assign
from kmclust.lloyd.weighted import WeightSpec


@dataclass(frozen=True, eq=False)
class ChunkArgs:
    """What every chunk task of one group of runs computes (the same for each chunk of a pass).

    Dask knows it by ``token``, fresh every pass: nothing in it is ever hashed.
    """

    centroids: np.ndarray  # IN (KT, D) the stack of the runs' centroids, in the compute dtype
    offsets: np.ndarray  # IN (R + 1,) int64 where each run's block of the stack starts
    run_ids: np.ndarray  # IN (R,) the runs' indices in the batch (the keys of their states)
    evals: dict[int, np.ndarray]  # IN stack position → float64 centroids of a run being evaluated
    m: int  # IN relocation candidates kept per run
    integer: bool  # IN integer-valued data: exact sums; labels kept as state
    want_labels: bool  # OUT the evaluated runs' labels
    want_errors: bool = True  # OUT the evaluated runs' exact Σ‖x − z‖² and Σ‖x − z‖
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None  # IN run → (rows, new labels)
    drift: dict[int, np.ndarray] | None = None  # IN run → each centroid's last move (bounds)
    prune: bool = False  # IN skip rows by bounds (integer data with states)
    weights: WeightSpec | None = None  # IN how the chunk's sample weights are summed (None: none)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __dask_tokenize__(self) -> str:
        return self.token

    @property
    def nbytes(self) -> int:
        """Bytes of the centroids carried (the stack and the evaluated runs' float64 copies)."""
        return self.centroids.nbytes + sum(c.nbytes for c in self.evals.values())


def lloyd_chunk(
    x: np.ndarray,
    start: int,
    args: ChunkArgs,
    prev: list[ChunkState] | None = None,
    w: np.ndarray | None = None,
) -> tuple[Partial, ChunkState | None]:
    """One chunk's contribution to one Lloyd iteration of a stack of runs.

    ``x`` (rows ``start`` on of the data) stays in its own dtype (uint8
    pixels are converted a block at a time). For integer-valued data the
    chunk's labels are returned as state and, when ``prev`` holds every
    run's previous state (after the driver's relocation ``patches``), the
    partial carries *changes* of the sums (``delta=True``). With ``prune``
    and the centroids' ``drift`` since the previous pass, Hamerly-style
    bounds (:mod:`kmclust.lloyd.prune`) skip the rows whose label cannot
    change in any run; relocation candidates are then only upper bounds
    (``pruned=True``). With ``args.weights``, ``w`` holds the chunk's float64
    sample weights: sums, counts, J and candidates are weighted
    (:mod:`kmclust.lloyd.weighted`). Trusts its inputs.
    """
    centroids, offsets, run_ids, integer = args.centroids, args.offsets, args.run_ids, args.integer
    eval_centroids, prune, m = args.evals, args.prune, args.m
    known = [st.xsq for st in prev or [] if st.xsq is not None and st.xsq.dtype == centroids.dtype]
    exact = None  # uint8 rows' integer ‖x‖², computed once for both ‖x‖² and Σ‖x‖²
    if known:
        xsq = known[0]
    elif x.dtype == np.uint8:
        exact = _distance.row_norms(x, np.int64)
        xsq = exact.astype(centroids.dtype)
    else:
        xsq = _distance.row_norms(x, centroids.dtype)
    per_centroid = prune and integer and centroid_bounds(offsets)
    prior = None
    if integer:
        prior = previous(prev, args.patches, run_ids, per_centroid, start, x.shape[0])
    pruned = prune and prior is not None and prior.upper is not None and args.drift is not None
    if pruned:
        labels, dmin, upper, lower, second, cbound = pruned_assign(
            x, xsq, centroids, offsets, run_ids, prior, args.drift
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
    sum_cols, ws, wsqnorm = None, args.weights, None
    if ws is not None:
        w = w.reshape(-1)  # the chunk's (n, 1) column of weights
    if ws is not None:
        sum_cols, sums, counts, wsqnorm = _weighted_sums(x, labels, prior, offsets, w, ws, exact)
    elif prior is not None:
        sum_cols, sums, counts = delta_sums(x, labels, prior.labels, offsets)
    else:
        sums, counts = cluster_sums(x, labels, offsets, integer)
    # Σ‖x‖² never changes: integer data send it with the first pass only (the driver keeps it)
    sqnorm = math.nan
    if prior is None and ws is None:
        sqnorm = float(exact.sum()) if exact is not None else _sqnorm(x)
    r = offsets.size - 1
    kept = labels if ws is None else weighted.positive_labels(labels, w)
    needy = runs_with_empty_cluster(kept, offsets)
    cand_d, cand_i, cand_l = np.full((r, m), -np.inf), np.full((r, m), -1), np.full((r, m), -1)
    if needy.size:
        dn = dmin[:, needy] if ws is None else weighted.candidate_distances(dmin[:, needy], w)
        cand_d[needy], cand_i[needy], cand_l[needy] = farthest(dn, labels[:, needy], start, m)
    # exact: int 0, Fractions where evaluated (adding ints is far cheaper than adding Fractions)
    eval_sse = np.full(r, 0, dtype=object)
    eval_dist = np.full(r, 0, dtype=object)
    out_labels: list[tuple[int, np.ndarray]] = []
    if args.want_errors and eval_centroids:
        found = (
            exact_errors(x, eval_centroids, labels)
            if ws is None
            else weighted.errors(x, eval_centroids, labels, w)
        )
        for pos, (sse, dist) in found.items():
            eval_sse[pos], eval_dist[pos] = sse, dist
    if args.want_labels and eval_centroids:
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
        labels=out_labels,
        delta=prior is not None and (ws is None or ws.exact),
        pruned=pruned,
        sum_cols=sum_cols,
        wsqnorm=wsqnorm,
    )
    return part, state


def _weighted_sums(x, labels, prior, offsets, w, ws: WeightSpec, xsq=None) -> tuple:
    """(columns, packed sums, counts, Σ w‖x‖² or None): deltas from the prior's labels when the
    sums are exact, else full sums (float products would round differently). ``xsq``: uint8
    rows' exact ‖x‖², if computed."""
    if prior is not None and ws.exact:
        return (*weighted.delta_sums(x, labels, prior.labels, offsets, w, ws), None)
    sums, counts = weighted.cluster_sums(x, labels, offsets, w, ws)
    return None, sums, counts, weighted.sqnorm(x, w, xsq)


def _sqnorm(x: np.ndarray) -> float:
    """Σ‖x‖² of a chunk in float64 (exact for integer pixels), a block of rows at a time."""
    if x.dtype == np.uint8:
        return float(_distance.row_norms(x, np.int64).sum())
    return float(
        sum(
            np.einsum("ij,ij->", blk, blk)
            for _, _, blk in blocks(x, np.arange(x.shape[0]), np.float64)
        )
    )
