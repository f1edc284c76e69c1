"""Bounds that skip rows: which rows of a chunk can change label after the centroids moved.

Hamerly-style bounds per (row, run) — the distance to the assigned centroid is
at most ``upper``, to the runner-up and to the others at least two lower
bounds — or, for a stack of one run or of large runs, one lower bound per
(row, centroid) (Elkan; :func:`centroid_bounds`), or past
``CENTROID_BOUNDS_MAX_K`` centroids one per (row, group of centroids)
(Yinyang; :func:`group_bounds`, :mod:`kmclust.lloyd.groups`). A row keeps its label when
its bounds clear twice the distances' error bound, so labels stay the exact
nearest centroid and results are bit-identical to a pass without bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kmclust.lloyd import bounds as _bounds
from kmclust.lloyd import distance as _distance
from kmclust.lloyd import nearest as _nearest
from kmclust.lloyd.chunk import place
from kmclust.lloyd.float_sums import Grid
from kmclust.lloyd.groups import Groups, pruned_assign_groups
from kmclust.lloyd.partial import ChunkState

#: Runs needing more than this share of a chunk's rows share one GEMM; the others get compiled
#: per-pair work.
BUSY_SHARE = 0.15
#: Cost of one (row, centroid) distance in the compiled per-pair step, in units of the same in a
#: stacked GEMM.
PAIR_COST = 3.0
#: A stack of one run, or of runs that all have at least this many centroids, keeps a lower bound
#: per (row, centroid) (Elkan) ...
CENTROID_BOUNDS_MIN_K = 64
#: ... while it has at most this many centroids: 4 bytes of state per row and centroid (2 KB a row
#: at most).
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


def group_bounds(offsets: np.ndarray) -> bool:
    """Whether a stack keeps a lower bound per (row, group of centroids) (Yinyang,
    :mod:`kmclust.lloyd.groups`): one run, or runs of at least ``CENTROID_BOUNDS_MIN_K``
    centroids each, too many for per-centroid bounds."""
    ks = np.diff(offsets)
    if not ks.size or int(offsets[-1]) <= CENTROID_BOUNDS_MAX_K:
        return False
    return ks.size == 1 or int(ks.min()) >= CENTROID_BOUNDS_MIN_K


@dataclass
class Prior:
    """A chunk's memory of the previous pass for every run of the stack."""

    labels: np.ndarray  # (n, R) int32, relocation patches applied (read only)
    upper: np.ndarray | None  # (n, R) float64 distance bounds, None when not pruning (read only)
    lower: np.ndarray | None  # (n, R, 2)
    second: np.ndarray | None  # (n, R)
    cbound: np.ndarray | None = None  # (n, ΣK) float32 per-centroid bounds; lowered in place
    grid: Grid | None = None  # float rows: how ``sums`` are kept (kmclust.lloyd.float_sums)
    sums: np.ndarray | None = None  # float rows: exact sums per stacked cluster (read only)
    sum_labels: np.ndarray | None = None  # the labels ``sums`` are of (before any patch)
    gbound: np.ndarray | None = None  # (n, G) float32 per-group bounds (read only)
    groups: Groups | None = None  # the stack's groups, with gbound


def pruned_assign(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    run_ids: np.ndarray,
    prior: Prior,
    drift: dict[int, np.ndarray],
    c64: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Labels with bounds: recompute only rows where some run's label might change.

    After the centroids moved by ``drift`` (per cluster), a row keeps its
    label in run r if lower² − upper² clears twice the distances' error bound
    (:func:`kmclust.lloyd.bounds.moved_bounds`). Runs
    needing more than ``BUSY_SHARE`` of the rows share one GEMM (:func:`place`)
    over the rows whose pairs in those runs would cost more in the compiled
    per-pair step (:func:`kmclust.lloyd.nearest.reassign`, ``PAIR_COST`` times a GEMM
    distance); every other pair goes through that step (putting all rows a
    busy run needs in the GEMM made the bench grid slower). Stacks
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
    c64 = centroids.astype(np.float64) if c64 is None else c64  # exact, if rounded from float64
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    # the bounds started from computed squared distances, each off by at most error_bound
    # per unit of ‖x‖² + 2 max‖c‖²
    terms = _distance.dot_terms(x.dtype, centroids.dtype, x.shape[1])
    slack = 2.0 * _distance.error_bound(1.0, 0.0, terms, centroids.dtype)
    row_slack, run_slack = slack * xsq.astype(np.float64), slack * 2.0 * csq_max
    if prior.cbound is not None:
        return _pruned_assign_centroids(
            x, xsq, centroids, offsets, labels, prior, moved, slack, row_slack, run_slack, c64
        )
    if prior.gbound is not None:  # the group bounds come back in the last place
        labels, dmin, upper, gbound = pruned_assign_groups(
            x, xsq, centroids, offsets, labels, prior.upper, prior.gbound, prior.groups, moved,
            slack, row_slack, run_slack, c64,
        )  # fmt: skip
        return labels, dmin, upper, None, None, gbound
    upper, lower, need = _bounds.moved_bounds(
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
                c64=c64[cols],
            )
        if rows.size <= 0.9 * n:
            pairs = need.copy()
            pairs[rows[:, None], busy[None, :]] = False
        else:
            pairs = need * (share <= BUSY_SHARE)[None, :]
    rest = np.flatnonzero(pairs.any(axis=0))
    if rest.size:
        _nearest.reassign(
            x, xsq, centroids, offsets, rest, pairs, slack, labels, dmin, upper, lower, second, c64
        )
    return labels, dmin, upper, lower, second, None


def _pruned_assign_centroids(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    prior: Prior,
    moved: np.ndarray,
    slack: float,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
    c64: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """:func:`pruned_assign` with a lower bound per (row, centroid) (Elkan; ``labels`` in place).

    A row whose pairs would need more distances in the per-pair step
    (:func:`kmclust.lloyd.nearest.reassign_centroids`: the assigned centroid's and
    those whose bound failed, ``PAIR_COST`` times a GEMM distance each) than
    the stack's ΣK joins one GEMM over the whole stack (the first passes,
    when every centroid moves far); every other pair goes through that step.
    """
    n, r = labels.shape
    cbound = prior.cbound  # lowered in place (see kmclust.lloyd.bounds.moved_centroid_bounds)
    upper, need, fails = _bounds.moved_centroid_bounds(
        labels, prior.upper, cbound, moved, offsets, row_slack, run_slack
    )
    dmin = np.square(upper)  # upper bounds for rows that keep their label
    rows = np.flatnonzero(((fails + 2) * need).sum(axis=1) * PAIR_COST >= offsets[-1])
    pairs = need
    if rows.size:
        # two-bound outputs this stack does not keep
        scratch = (np.empty((n, r, 2)), np.empty((n, r), dtype=np.int32))
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
            c64=c64,
        )
        # > 0.9 n: the GEMM took every row
        pairs = np.zeros_like(need) if rows.size > 0.9 * n else need.copy()
        pairs[rows] = False
    rest = np.flatnonzero(pairs.any(axis=0))
    if rest.size:
        _nearest.reassign_centroids(
            x, xsq, centroids, offsets, rest, pairs, slack, labels, dmin, upper, cbound, c64
        )
    return labels, dmin, upper, None, None, cbound


def previous(
    prev: list[ChunkState] | None,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None,
    run_ids: np.ndarray,
    per_centroid: bool,
    start: int,
    n: int,
    grouped: bool = False,
) -> Prior | None:
    """Every run's previous labels with relocation patches applied; None if any is missing.

    Also the bounds, when every run kept those the stack uses now (two per
    run, per centroid: ``per_centroid``, or per group: ``grouped``, kept only while the
    stack stays the same); otherwise none (a full pass renews them).
    """
    if not prev:
        return None
    where = {int(rid): (st, col) for st in prev for col, rid in enumerate(st.run_ids)}
    if any(int(rid) not in where for rid in run_ids):
        return None
    held = [where[int(rid)] for rid in run_ids]
    kind = "gbound" if grouped else "cbound" if per_centroid else "lower"
    has_bounds = all(st.upper is not None and getattr(st, kind) is not None for st, _ in held)
    names = ("upper", "cbound") if per_centroid else ("upper", "lower", "second")
    if grouped:  # group bounds only for the same stack (below): runs leaving cost a full pass
        names, has_bounds = ("upper", "gbound", "groups"), has_bounds and len(prev) == 1
        has_bounds = has_bounds and np.array_equal(prev[0].run_ids, run_ids)
    bounds: dict[str, np.ndarray] = {}
    if len(prev) == 1 and np.array_equal(prev[0].run_ids, run_ids):  # the usual case: same stack
        st = prev[0]
        labels = st.labels
        if has_bounds:
            bounds = {name: getattr(st, name) for name in names}
    elif len({id(st) for st, _ in held}) == 1:  # runs left the stack: one gather of columns
        st = held[0][0]
        cols = np.array([col for _, col in held])
        labels = np.take(st.labels, cols, axis=1)  # np.take: faster than fancy column indexing
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
    grid, sums = _kept_sums(prev, held, run_ids)
    raw = labels  # what the kept sums are of: patches go to a copy
    touched = [
        (p, patches[int(rid)]) for p, rid in enumerate(run_ids) if patches and int(rid) in patches
    ]
    if touched:  # the states are shared (threaded scheduler, retries): patch copies
        labels = labels.copy()
        bounds = {k: a if k in ("cbound", "groups") else a.copy() for k, a in bounds.items()}
    for p, (idx, lab) in touched:
        inside = (idx >= start) & (idx < start + n)
        rows = idx[inside] - start
        labels[rows, p] = lab[inside]
        if bounds:  # moved by the driver to another centroid: no bound on that distance
            bounds["upper"][rows, p] = np.inf
            if grouped:  # the old label, now one of its group's others, is in no group bound
                grp = bounds["groups"]
                bounds["gbound"][rows, grp.goffs[p] : grp.goffs[p + 1]] = 0.0
            elif not per_centroid:  # and the old nearest, now one of the others, is below any bound
                bounds["lower"][rows, p] = 0.0
                bounds["second"][rows, p] = -1
            # (per-centroid bounds hold whatever the label: the relocated centroid's jump is in
            # its move)
    return Prior(
        labels,
        bounds.get("upper"),
        bounds.get("lower"),
        bounds.get("second"),
        bounds.get("cbound"),
        grid,
        sums,
        raw if sums is not None else None,
        bounds.get("gbound"),
        bounds.get("groups"),
    )


def _kept_sums(
    prev: list, held: list, run_ids: np.ndarray
) -> tuple[Grid | None, np.ndarray | None]:
    """The exact sums float chunks keep (:mod:`kmclust.lloyd.float_sums`) for the stack
    ``run_ids``, gathered as the labels are; (grid, None) if some run's are missing."""
    grid = getattr(prev[0], "grid", None)
    if grid is None or any(getattr(st, "sums", None) is None for st, _ in held):
        return grid, None
    if len(prev) == 1 and np.array_equal(prev[0].run_ids, run_ids):
        return grid, prev[0].sums
    return grid, np.concatenate(
        [st.sums[st.offsets[col] : st.offsets[col + 1]] for st, col in held], axis=0
    )


def _columns(offsets: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """The stacked centroid columns of stack positions ``runs``, in that order."""
    return np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in runs])
