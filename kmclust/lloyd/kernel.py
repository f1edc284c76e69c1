"""One chunk task: what it is asked (:class:`ChunkArgs`) and what it does (:func:`lloyd_chunk`).

Numpy and compiled loops, no dask: the
building blocks are in :mod:`kmclust.lloyd.chunk`, the bounds that skip rows
in :mod:`kmclust.lloyd.prune`, the outputs in :mod:`kmclust.lloyd.partial`.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from kmclust.lloyd import distance as _distance
from kmclust.lloyd import exact as _exact
from kmclust.lloyd import float_sums, weighted
from kmclust.lloyd.chunk import (
    WIDE_STACK,
    assign,
    cluster_sums,
    delta_sums,
    exact_errors,
    farthest,
    pixel_farthest,
    runs_with_empty_cluster,
)
from kmclust.lloyd.groups import Groups, assign_groups, make_groups
from kmclust.lloyd.partial import ChunkState, Partial
from kmclust.lloyd.prune import centroid_bounds, group_bounds, previous, pruned_assign
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
    integer: bool  # IN integer-valued data: sums exact in the compute dtype, sent as deltas
    want_labels: bool  # OUT the evaluated runs' labels
    want_errors: bool = True  # OUT the evaluated runs' exact Σ‖x − z‖² and Σ‖x − z‖
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None  # IN run → (rows, new labels)
    drift: dict[int, np.ndarray] | None = None  # IN run → each centroid's last move (bounds)
    prune: bool = False  # IN skip rows by bounds (with states)
    weights: WeightSpec | None = None  # IN how the chunk's sample weights are summed (None: none)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __dask_tokenize__(self) -> str:
        return self.token

    @functools.cached_property
    def groups(self) -> Groups:
        """The stack's centroids in groups (:mod:`kmclust.lloyd.groups`), formed once per pass
        and process: every chunk of a first pass asks for the same."""
        return make_groups(self.centroids, self.offsets)

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
    pixels are converted a block at a time). The chunk's labels are returned
    as state; when ``prev`` holds every run's previous state (after the
    driver's relocation ``patches``), integer-valued data send *changes* of
    the sums (``delta=True``), and float rows change the exact sums they kept
    (:mod:`kmclust.lloyd.float_sums`) and send them whole. With ``prune``
    and the centroids' ``drift`` since the previous pass, Hamerly-style
    bounds (:mod:`kmclust.lloyd.prune`) skip the rows whose label cannot
    change in any run; relocation candidates are then only upper bounds
    (``pruned=True``). With ``args.weights``, ``w`` holds the chunk's float64
    sample weights: sums, counts, J and candidates are weighted
    (:mod:`kmclust.lloyd.weighted`). Trusts its inputs.
    """
    centroids, offsets, run_ids, integer = args.centroids, args.offsets, args.run_ids, args.integer
    eval_centroids, prune, m = args.evals, args.prune, args.m
    grid, c64 = None, None  # float rows: how sums are kept; exact centroids if rounded to float32
    if not integer and x.dtype.kind == "f":
        grid = next((st.grid for st in prev or [] if getattr(st, "grid", None)), None)
        grid = grid or float_sums.grid_of(x)
        if centroids.dtype == np.float64 and float_sums.fits32(grid, centroids):
            c64, centroids = centroids, centroids.astype(np.float32)
    known = [st.xsq for st in prev or [] if st.xsq is not None and st.xsq.dtype == centroids.dtype]
    exact = None  # uint8 rows' integer ‖x‖², computed once for both ‖x‖² and Σ‖x‖²
    if known:
        xsq = known[0]
    elif x.dtype == np.uint8:
        exact = _distance.row_norms(x, np.int64)
        xsq = exact.astype(centroids.dtype)
    else:
        xsq = _distance.row_norms(x, centroids.dtype)
    per_centroid = prune and centroid_bounds(offsets)
    grouped = prune and not per_centroid and group_bounds(offsets)  # Yinyang: kmclust.lloyd.groups
    prior = previous(prev, args.patches, run_ids, per_centroid, start, x.shape[0], grouped)
    if prior is not None and len(known) < len(prev):  # bounds from distances in another dtype
        prior = replace(prior, upper=None, lower=None, second=None, cbound=None, gbound=None)
    pruned = prune and prior is not None and prior.upper is not None and args.drift is not None
    groups, gbound = None, None
    if pruned:
        labels, dmin, upper, lower, second, cbound = pruned_assign(
            x, xsq, centroids, offsets, run_ids, prior, args.drift, c64
        )
        if grouped:  # pruned_assign gave the group bounds in cbound's place
            groups, gbound, cbound = prior.groups, cbound, None
    elif grouped:
        groups = args.groups
        labels, dmin, upper, gbound = assign_groups(x, centroids, offsets, xsq, c64, groups)
        lower = second = cbound = None
    elif prune:
        cbound = (
            np.empty((x.shape[0], int(offsets[-1])), dtype=np.float32) if per_centroid else None
        )
        labels, dmin, upper, lower, second = assign(
            x, centroids, offsets, bounds=True, xsq=xsq, cbound=cbound, c64=c64
        )
        if per_centroid:
            lower = second = None
    else:  # no bounds kept: labels and distances only
        labels, dmin = assign(x, centroids, offsets, xsq=xsq, c64=c64)
        upper = lower = second = cbound = None
    sum_cols, ws, wsqnorm, kept = None, args.weights, None, None
    if ws is not None:
        w = w.reshape(-1)  # the chunk's (n, 1) column of weights
        sum_cols, sums, counts, wsqnorm = _weighted_sums(x, labels, prior, offsets, w, ws, exact)
        delta = prior is not None and ws.exact
    elif not integer:  # full sums, from exact ones kept and changed by deltas where possible
        kept, sums, counts = _float_sums(x, labels, prior, offsets, grid)
        delta = False
    elif prior is not None:
        sum_cols, sums, counts = delta_sums(x, labels, prior.labels, offsets)
        delta = True
    else:
        sums, counts = cluster_sums(x, labels, offsets, integer)
        delta = False
    # Σ‖x‖² never changes: sent with the first pass only (the driver keeps it)
    sqnorm = math.nan
    if prior is None and ws is None:
        sqnorm = float(exact.sum()) if exact is not None else _sqnorm(x)
    r = offsets.size - 1
    present = labels if ws is None else weighted.positive_labels(labels, w)
    needy = runs_with_empty_cluster(present, offsets)
    cand_d, cand_i, cand_l = np.full((r, m), -np.inf), np.full((r, m), -1), np.full((r, m), -1)
    if needy.size:
        dn = dmin[:, needy] if ws is None else weighted.candidate_distances(dmin[:, needy], w)
        if x.dtype == np.uint8 and not pruned and offsets[-1] >= WIDE_STACK:  # from a GEMM
            found = pixel_farthest(x, centroids, offsets, labels, xsq, dn, needy, start, m)
        else:
            found = farthest(dn, labels[:, needy], start, m)
        cand_d[needy], cand_i[needy], cand_l[needy] = found
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
    state = ChunkState(
        np.asarray(run_ids),
        labels,
        upper if prune else None,
        lower if prune else None,
        xsq,
        second if prune else None,
        cbound if prune else None,
        np.asarray(offsets),
        gbound,
        groups,
    )
    if grid is not None:
        state = float_sums.FloatState(**vars(state), grid=grid, sums=kept)
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
        delta=delta,
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


def _float_sums(x, labels, prior, offsets, grid) -> tuple:
    """(exact sums to keep or None, (ΣK, D) float64 sums, counts) of float rows: the kept sums
    changed by the rows whose label changed, else summed in full
    (:mod:`kmclust.lloyd.float_sums`); the same bits either way."""
    counts = _exact.label_counts(labels, offsets)
    if prior is not None and prior.sums is not None:
        exact = float_sums.changed_sums(prior.sums, x, labels, prior.sum_labels, offsets, grid)
    else:
        exact = float_sums.full_sums(x, labels, offsets, grid)
    # kept only while a quarter of the chunk at most (large k: summing the rows again costs little
    # beside the distances, and keeps a worker's memory to its chunks)
    keep = grid.exact and 4 * exact.nbytes <= x.nbytes
    return exact if keep else None, float_sums.as_float(exact, grid), counts


def _sqnorm(x: np.ndarray) -> float:
    """Σ‖x‖² of a chunk in float64 (exact for integer pixels; float rows in a fixed order)."""
    if x.dtype == np.uint8:
        return float(_distance.row_norms(x, np.int64).sum())
    zero = np.zeros((1, x.shape[1]))
    return float(_exact.squared_errors(x, zero, np.zeros(x.shape[0], np.int64)).sum())
