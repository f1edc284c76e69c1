"""Yinyang bounds for large k: a lower bound per (row, group of centroids), not per centroid.

Elkan's bound per (row, centroid) (:func:`kmclust.lloyd.prune.centroid_bounds`)
costs 4 bytes per row and centroid and a pass over them all every iteration;
past ``CENTROID_BOUNDS_MAX_K`` centroids that memory traffic and the state
itself (1.1 GB at k=4,096 on Fashion-MNIST) outweigh what it saves. Here a
run's centroids are split once into groups of about ``GROUP_SIZE`` near ones
(a few Lloyd steps on the centroids themselves, :func:`make_groups`), and each
(row, group) keeps a float32 lower bound on the distance to every centroid of
the group but the row's own (Ding et al., "Yinyang K-means", ICML 2015). After
the centroids moved, a group's bound drops by its largest move; a row keeps
its label when every group clears the upper bound by the error window (the
global filter); otherwise it gets the distance to its own centroid, and only
the groups that fail against that are opened: every centroid of an opened
group gets a distance, computed for all the rows that opened the group at once
by a compiled thin-stack kernel (:func:`kmclust.lloyd.distance.narrow_distances`;
Yinyang's per-centroid local filter would leave each row a different subset,
and distances one by one cost about five GEMM distances each). Rows that would
need more than a GEMM's worth go to one GEMM over the stack
(:func:`kmclust.lloyd.chunk.place`).

As everywhere in the engine, a bound clears only by twice the distances'
error bound and near ties are settled exactly (:mod:`kmclust.lloyd.nearest`),
so labels stay the exact nearest centroid and a pass with these bounds gives
the same bits as one without. Bounds are rounded down to float32
(:func:`kmclust.lloyd.bounds.down32`); the previous pass's bounds are read,
never written (a retried task starts from the same state).

Compiled with numba; ``nogil`` so chunk tasks run in parallel threads.
numba's cache follows each function's own file only: after editing a compiled
helper of :mod:`~kmclust.lloyd.nearest`, :mod:`~kmclust.lloyd.distance` or
:mod:`~kmclust.lloyd.bounds`, delete ``kmclust/lloyd/__pycache__``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from kmclust.lloyd.bounds import down32, up32
from kmclust.lloyd.chunk import BLOCK_ROWS, DIST_BLOCK, place
from kmclust.lloyd.distance import computed_sq, narrow_distances
from kmclust.lloyd.nearest import settle_tie

#: Centroids per group (about): 4 bytes of state per row and group, a sixteenth of Elkan's.
GROUP_SIZE = 16
#: Lloyd steps on the centroids that form the groups (any grouping is correct; near ones prune).
GROUP_STEPS = 3
#: Cost of one distance of an opened group (the compiled thin-stack kernel
#: :func:`kmclust.lloyd.distance.pixel_distances` over the rows that opened it), in units of the
#: same in a GEMM over the stack.
GROUP_COST = 1.5


@dataclass(frozen=True)
class Groups:
    """A stack's centroids in groups: group ``gid[j]`` holds stacked centroid j.

    Run p's groups are ``goffs[p]`` … ``goffs[p + 1]`` − 1; group g's centroids
    are ``cols[ptr[g]:ptr[g + 1]]``.
    """

    gid: np.ndarray  # (ΣK,) int64
    goffs: np.ndarray  # (R + 1,) int64
    ptr: np.ndarray  # (G + 1,) int64
    cols: np.ndarray  # (ΣK,) int64, stacked columns ordered by group

    @property
    def n_groups(self) -> int:
        return int(self.goffs[-1])


def make_groups(centroids: np.ndarray, offsets: np.ndarray) -> Groups:
    """Each run's centroids in ⌈k / GROUP_SIZE⌉ groups of near ones (deterministic).

    A few Lloyd steps on the centroids, seeded by every (k / t)-th centroid;
    groups left empty stay empty (their bound is inf). Near centroids share a
    group so that a group's largest move is close to each member's.
    """
    gid = np.empty(int(offsets[-1]), dtype=np.int64)
    goffs = [0]
    for p in range(offsets.size - 1):
        lo, hi = int(offsets[p]), int(offsets[p + 1])
        c = centroids[lo:hi].astype(np.float32)
        t = -(-(hi - lo) // GROUP_SIZE)
        seeds = c[(np.arange(t) * (hi - lo)) // t]
        csq = np.einsum("ij,ij->i", c, c)
        for _ in range(GROUP_STEPS):
            d = np.einsum("ij,ij->i", seeds, seeds)[None, :] - 2.0 * (c @ seeds.T)
            own = np.argmin(d + csq[:, None], axis=1)
            counts = np.bincount(own, minlength=t)
            sums = np.zeros_like(seeds)
            np.add.at(sums, own, c)
            seeds = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], seeds)
        gid[lo:hi] = goffs[-1] + own
        goffs.append(goffs[-1] + t)
    cols = np.argsort(gid, kind="stable")
    ptr = np.searchsorted(gid[cols], np.arange(goffs[-1] + 1))
    return Groups(gid, np.asarray(goffs, dtype=np.int64), ptr.astype(np.int64), cols)


def group_shift(moved: np.ndarray, groups: Groups) -> np.ndarray:
    """(G,) float32 the largest move of each group, rounded up (0 for an empty group)."""
    top = np.zeros(groups.n_groups)
    np.maximum.at(top, groups.gid, moved)
    return _up32_all(top)


def _up32_all(v: np.ndarray) -> np.ndarray:
    """float32 values at least ``v`` (float64) each."""
    f = v.astype(np.float32)
    low = f.astype(np.float64) < v
    f[low] = np.nextafter(f[low], np.float32(np.inf))
    return f


def assign_groups(
    x: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    xsq: np.ndarray,
    c64: np.ndarray | None,
    groups: Groups,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A pass over every row (GEMM over the stack): labels, dmin, upper and group bounds."""
    n, r = x.shape[0], offsets.size - 1
    labels, dmin, upper = np.empty((n, r), np.int32), np.empty((n, r)), np.empty((n, r))
    gbound = np.empty((n, groups.n_groups), dtype=np.float32)
    scratch = (np.empty((n, r, 2)), np.empty((n, r), dtype=np.int32))
    place(x, centroids, offsets, None, np.arange(r), xsq, labels, dmin, upper, *scratch,
          c64=c64, gbound=gbound, groups=groups)  # fmt: skip
    return labels, dmin, upper, gbound


def pruned_assign_groups(
    x: np.ndarray,
    xsq: np.ndarray,
    centroids: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    upper: np.ndarray,
    gbound: np.ndarray,
    groups: Groups,
    moved: np.ndarray,
    slack: float,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
    c64: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels with group bounds (``labels`` in place): (labels, dmin, upper, new group bounds).

    ``upper`` (n, R) and ``gbound`` (n, G) are the previous pass's bounds
    (read only); ``moved`` (ΣK,) each centroid's move since; ``slack`` the
    error window per unit of ‖x‖² + 2 max‖c‖², ``row_slack`` / ``run_slack``
    its shares (as :func:`kmclust.lloyd.bounds.moved_centroid_bounds`). A
    block of rows at a time: the filters (:func:`_filter`), every opened
    group's distances for the rows that opened it from the compiled
    thin-stack kernel (:func:`_group_distances`), then labels and bounds
    (:func:`_settle`). Rows whose opened groups would cost more than a GEMM
    over the stack (``GROUP_COST`` per distance) are assigned by that GEMM.
    """
    n, r = labels.shape
    csq = np.einsum("ij,ij->i", centroids, centroids)
    csq_max = np.maximum.reduceat(np.einsum("ij,ij->i", c64, c64), offsets[:-1])
    new_upper, dmin, near = np.empty((n, r)), np.empty((n, r)), np.empty((n, r))
    new_gbound = np.empty_like(gbound)
    gemm = np.zeros(n, dtype=np.bool_)
    moved = np.asarray(moved, dtype=np.float64)
    size = np.diff(groups.ptr)
    g4 = np.concatenate([[0], np.cumsum(-(-size // 4) * 4)])  # each group's rows padded to 4
    ct2 = np.zeros((int(g4[-1]), x.shape[1]), dtype=centroids.dtype)
    ct2[g4[:-1].repeat(size) + np.arange(size.sum()) - groups.ptr[:-1].repeat(size)] = (
        centroids[groups.cols] * -2.0  # exact
    )
    offsets = np.asarray(offsets, dtype=np.int64)
    vals = np.full(centroids.shape[0], np.inf)
    step = max(BLOCK_ROWS, DIST_BLOCK // max(centroids.shape[0], 1))
    for lo in range(0, n, step):  # a block of rows: its distances stay within DIST_BLOCK
        hi = min(lo + step, n)
        pg, rptr = _filter(
            x, xsq, centroids, csq, offsets, groups.goffs, size, moved, group_shift(moved, groups),
            slack, csq_max, row_slack, run_slack, GROUP_COST, lo, hi, labels, dmin, upper,
            new_upper, gbound, new_gbound, near, gemm,
        )  # fmt: skip
        gd, goff, pos = _group_distances(
            x, pg, rptr, lo, size, ct2, g4, csq[groups.cols], groups.ptr
        )
        _settle(
            x, xsq, c64, offsets, groups.goffs, groups.ptr, groups.cols, groups.gid, pg, rptr,
            pos, gd, goff, lo, slack, csq_max, labels, dmin, new_upper, new_gbound, near, gemm,
            vals,
        )  # fmt: skip
    rows = np.flatnonzero(gemm)
    if rows.size:
        scratch = (np.empty((n, r, 2)), np.empty((n, r), dtype=np.int32))
        place(x, centroids, offsets, rows, np.arange(r), xsq, labels, dmin, new_upper, *scratch,
              c64=c64, gbound=new_gbound, groups=groups)  # fmt: skip
    return labels, dmin, new_upper, new_gbound


@numba.njit(cache=True, nogil=True)
def _filter(  # pragma: no cover - compiled
    x,  # IN (n, D) uint8/float: the chunk's rows
    xsq,  # IN (n,) cent's dtype: the rows' ‖x‖²
    cent,  # IN (ΣK, D) float32/64: the stacked centroids
    csq,  # IN (ΣK,) cent's dtype: their ‖c‖²
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    goffs,  # IN (R + 1,) int64: run p's groups are goffs[p] … goffs[p + 1] − 1
    size,  # IN (G,) int64: centroids per group
    moved,  # IN (ΣK,) float64: how far each centroid moved
    gshift,  # IN (G,) float32: each group's largest move, rounded up
    coef,  # IN float: error window per unit of ‖x‖² + 2 max‖c‖²
    csq_max,  # IN (R,) float64: max‖c‖² per run
    row_slack,  # IN (n,) float64: the rows' share of the error window
    run_slack,  # IN (R,) float64: the runs' share of the error window
    cost,  # IN float: an opened group's distance in GEMM distances
    lo,  # IN int: the block's first row
    hi,  # IN int: one past its last
    labels,  # IN (n, R) int: label per pair, local index
    dmin,  # OUT (n, R) float64: upper² (the kept labels' computed distance bound)
    upper,  # IN (n, R) float64: last pass's upper bounds
    new_upper,  # OUT (n, R) float64: grown by the label's move
    gbound,  # IN (n, G) float32: last pass's group lower bounds
    new_gbound,  # OUT (n, G) float32: lowered by the groups' moves
    near,  # OUT (n, R) float64: computed distance to the label where a filter failed, else −1
    gemm,  # OUT (n,) bool: rows left to a GEMM over the stack
):
    """The filters for rows lo … hi − 1: (opened groups row by row, (hi − lo + 1,) row starts)."""
    d = x.shape[1]
    buf = np.empty(d, dtype=cent.dtype)
    pg = np.empty((hi - lo) * gshift.size, dtype=np.int64)
    rptr = np.zeros(hi - lo + 1, dtype=np.int64)
    tmp = np.empty(gshift.size, dtype=np.int64)
    down = np.float32(1.0 - 2.0**-22)
    zero32 = np.float32(0)
    count = 0
    for i in range(lo, hi):
        loaded = False
        t = 0
        for p in range(offsets.size - 1):
            a = offsets[p] + labels[i, p]
            u = upper[i, p] + moved[a]
            new_upper[i, p] = u
            dmin[i, p] = u * u
            near[i, p] = -1.0
            # global filter: every group clears √(u² + slack), compared in float32 rounded up
            limit = up32(np.sqrt(u * u + row_slack[i] + run_slack[p]))
            low = np.float32(np.inf)
            for g in range(goffs[p], goffs[p + 1]):
                v = max((gbound[i, g] - gshift[g]) * down, zero32)
                new_gbound[i, g] = v
                low = min(low, v)
            if np.isfinite(u) and low > limit:
                continue
            if not loaded:
                for q in range(d):
                    buf[q] = x[i, q]
                loaded = True
            e = np.float64(computed_sq(buf, cent, csq, xsq[i], a))
            near[i, p] = e
            # the groups whose bound does not clear √(e + window): their centroids get distances
            lim = up32(np.sqrt(e + coef * (np.float64(xsq[i]) + 2.0 * csq_max[p])))
            work = 0
            for g in range(goffs[p], goffs[p + 1]):
                if new_gbound[i, g] <= lim:
                    tmp[t] = g
                    t += 1
                    work += size[g]
            if work * cost >= offsets[p + 1] - offsets[p]:  # a GEMM costs less: all the row's runs
                gemm[i] = True
                t = 0
                break
        pg[count : count + t] = tmp[:t]
        count += t
        rptr[i - lo + 1] = count
    return pg[:count], rptr


@numba.njit(cache=True, nogil=True)
def _group_distances(x, pg, rptr, lo, size, ct2, g4, csqg, ptr):  # pragma: no cover - compiled
    """Each opened group's ‖c‖² − 2x·c for the rows that opened it (thin-stack kernel).

    ``pg``/``rptr``: the opened groups row by row (:func:`_filter`); ``ct2``: −2 × the centroids
    by group, group g's at rows ``g4[g]`` on (padded to 4); ``csqg``: their ‖c‖² by group.
    Returns the distances (flat; group g's block of (rows, size[g]) from ``goff[g]``), ``goff``
    and each (row, group)'s row in its group's block.
    """
    n_groups = size.size
    cnt = np.zeros(n_groups, dtype=np.int64)
    for t in range(pg.size):
        cnt[pg[t]] += 1
    goff = np.zeros(n_groups + 1, dtype=np.int64)
    start = np.zeros(n_groups + 1, dtype=np.int64)
    for g in range(n_groups):
        goff[g + 1] = goff[g] + cnt[g] * size[g]
        start[g + 1] = start[g] + cnt[g]
    fill = start[:-1].copy()
    grow = np.empty(pg.size, dtype=np.int64)
    pos = np.empty(pg.size, dtype=np.int64)
    for il in range(rptr.size - 1):
        for t in range(rptr[il], rptr[il + 1]):
            g = pg[t]
            pos[t] = fill[g] - start[g]
            grow[fill[g]] = lo + il
            fill[g] += 1
    gd = np.empty(goff[-1], dtype=ct2.dtype)
    for g in range(n_groups):
        if cnt[g]:
            out = gd[goff[g] : goff[g + 1]].reshape((cnt[g], size[g]))
            rows = grow[start[g] : start[g + 1]]
            narrow_distances(x, rows, ct2[g4[g] : g4[g + 1]], csqg[ptr[g] : ptr[g + 1]], out)
    return gd, goff, pos


@numba.njit(cache=True, nogil=True)
def _settle(  # pragma: no cover - compiled
    x,  # IN (n, D) uint8/float: the chunk's rows
    xsq,  # IN (n,) distances' dtype: the rows' ‖x‖²
    c64,  # IN (ΣK, D) float64: the centroids for exact sums
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    goffs,  # IN (R + 1,) int64: run p's groups are goffs[p] … goffs[p + 1] − 1
    ptr,  # IN (G + 1,) int64: group g's centroids are cols[ptr[g]:ptr[g + 1]]
    cols,  # IN (ΣK,) int64: stacked columns ordered by group
    gid,  # IN (ΣK,) int64: each centroid's group
    pg,  # IN the opened groups row by row (_filter)
    rptr,  # IN their row starts
    pos,  # IN each (row, group)'s row in its group's block (_group_distances)
    gd,  # IN the groups' computed ‖c‖² − 2x·c, flat
    goff,  # IN group g's block starts at goff[g]
    lo,  # IN int: the block's first row
    coef,  # IN float: error window per unit of ‖x‖² + 2 max‖c‖²
    csq_max,  # IN (R,) float64: max‖c‖² per run
    labels,  # INOUT (n, R) int: label per pair, local index
    dmin,  # OUT (n, R) float64: computed squared distance to it
    new_upper,  # OUT (n, R) float64: its root, an upper bound
    new_gbound,  # INOUT (n, G) float32: renewed for the opened groups
    near,  # IN (n, R) float64: computed distance to the label where a filter failed, else −1
    gemm,  # IN (n,) bool: rows left to a GEMM (skipped)
    vals,  # SCRATCH (ΣK,) float64, all inf (left so)
):
    """Labels and bounds of the (row, run) pairs whose filters failed: the nearest of the label
    and the opened groups' centroids, near ties settled exactly (lowest index first)."""
    buf64 = np.empty(x.shape[1])
    zero = gd.dtype.type(0)
    for il in range(rptr.size - 1):
        i = lo + il
        if gemm[i]:
            continue
        t = rptr[il]
        for p in range(offsets.size - 1):
            e = near[i, p]
            if e < 0:
                continue
            a = offsets[p] + labels[i, p]
            vals[a] = e
            best = e
            t0 = t
            while t < rptr[il + 1] and pg[t] < goffs[p + 1]:  # run p's opened groups
                g = pg[t]
                base = goff[g] + pos[t] * (ptr[g + 1] - ptr[g])
                for s in range(ptr[g + 1] - ptr[g]):
                    j = cols[ptr[g] + s]
                    if j != a:
                        vals[j] = np.float64(max(gd[base + s] + xsq[i], zero))
                        best = min(best, vals[j])
                t += 1
            within = best + coef * (np.float64(xsq[i]) + 2.0 * csq_max[p])
            arg, ties = a, 0
            for tt in range(t0 - 1, t):
                m0, m1 = (0, 1) if tt < t0 else (ptr[pg[tt]], ptr[pg[tt] + 1])
                for s in range(m0, m1):
                    j = a if tt < t0 else cols[s]
                    if (tt >= t0 and j == a) or vals[j] > within:
                        continue
                    ties += 1
                    if vals[j] < vals[arg] or (vals[j] == vals[arg] and j < arg):
                        arg = j
            if ties > 1:
                arg = settle_tie(x[i], c64, vals, 0, offsets[p], offsets[p + 1], within, arg, buf64)
            labels[i, p] = arg - offsets[p]
            dmin[i, p] = vals[arg]
            new_upper[i, p] = np.sqrt(vals[arg])
            own = False  # whether the old label's group was opened
            for tt in range(t0, t):  # the opened groups: the least of their others
                g = pg[tt]
                least = np.inf
                for s in range(ptr[g], ptr[g + 1]):
                    j = cols[s]
                    own = own or j == a
                    if j != arg:
                        least = min(least, vals[j])
                new_gbound[i, g] = down32(np.sqrt(least))
            if arg != a and not own:  # the old label is now one of its group's others
                new_gbound[i, gid[a]] = min(new_gbound[i, gid[a]], down32(np.sqrt(e)))
            vals[a] = np.inf
            for tt in range(t0, t):
                for s in range(ptr[pg[tt]], ptr[pg[tt] + 1]):
                    vals[cols[s]] = np.inf
