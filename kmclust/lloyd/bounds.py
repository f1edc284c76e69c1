"""Distance bounds after the centroids moved: which (row, run) pairs keep their label unseen.

After a pass, each (row, run) holds an upper bound on the distance to its
centroid and lower bounds on the others (:func:`kmclust.lloyd.assign.assign_rows`).
When the centroids move by ``moved``, the triangle inequality updates them
without touching the rows: Hamerly's bounds with the runner-up tracked apart
(:func:`moved_bounds`), or Elkan's one bound per centroid
(:func:`moved_centroid_bounds`). A label is kept only when the bounds clear
it by twice the error bound of the computed distances they came from, so a
kept label is the one the exact rules of :mod:`kmclust.lloyd.nearest` would
give; the other pairs go to :func:`kmclust.lloyd.nearest.reassign` or
:func:`kmclust.lloyd.nearest.reassign_centroids`.

Per-centroid bounds are float32 (half the bytes), rounded so that they stay
bounds (:func:`down32`, :func:`up32`). Compiled with numba; ``nogil`` so
chunk tasks run in parallel threads. numba's cache follows each function's
own file only: after editing :func:`down32` or :func:`up32`, delete
``kmclust/lloyd/__pycache__`` so that their callers in
:mod:`kmclust.lloyd.nearest` (which inline them) are compiled again.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def down32(v):  # pragma: no cover - compiled
    """A float32 at most max(v, 0): a lower bound stays a lower bound in half the bytes."""
    f = np.float32(max(v, 0.0) * (1.0 - 2.0**-22))
    return f if np.float64(f) <= v else np.float32(0)


@numba.njit(cache=True, nogil=True)
def up32(v):  # pragma: no cover - compiled
    """The smallest float32 at least v (inf beyond float32's range): a limit for float32 bounds."""
    f = np.float32(v) if v < 3.0e38 else np.float32(np.inf)
    return np.nextafter(f, np.float32(np.inf)) if np.float64(f) < v else f


def moved_bounds(
    labels: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    second: np.ndarray,
    moved: np.ndarray,
    offsets: np.ndarray,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds after the centroids moved by ``moved`` (ΣK,), and which (row, run) need a recompute.

    The assigned centroid got farther by at most its own move (``upper``
    (n, R) grows by it). Two lower bounds (``lower`` (n, R, 2)): the
    second-nearest centroid (``second``, local index) came closer by at most
    its own move, every other one by at most the largest move among the
    centroids other than those two (−1 in ``second``: both bounds cover every
    centroid but the assigned one and shrink by the largest move among
    those). Tracking the second-nearest apart keeps a row whose runner-up
    barely moved from paying for the run's largest move (Hamerly's single
    bound). A label is kept only when the smaller bound's square minus
    upper² exceeds ``row_slack[i] + run_slack[p]`` (twice the error bound of
    the computed distances the bounds started from). Returns the new upper
    and lower bounds and ``need`` (n, R).
    """
    return _moved_bounds(
        labels,
        upper,
        lower,
        second,
        moved,
        np.asarray(offsets, dtype=np.int64),
        row_slack,
        run_slack,
    )


@numba.njit(cache=True, nogil=True)
def _moved_bounds(  # pragma: no cover - compiled
    labels,  # IN (n, R) int: assigned centroid per (row, run), local index
    upper,  # IN (n, R) float64: upper bound on the distance to it
    lower,  # IN (n, R, 2) float64: lower bounds (runner-up's or all others', the rest's)
    second,  # IN (n, R) int: the runner-up, local index (−1: both bounds cover all others)
    moved,  # IN (ΣK,) float64: how far each centroid moved
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    row_slack,  # IN (n,) float64: the rows' share of the error window
    run_slack,  # IN (R,) float64: the runs' share of the error window
):
    n, r = labels.shape
    top = np.zeros((r, 3))  # the three largest moves of each run (0: none)
    col = np.full((r, 2), -1, dtype=np.int64)  # ... and the columns of the first two
    for p in range(r):
        for j in range(offsets[p], offsets[p + 1]):
            v = moved[j]
            if col[p, 0] < 0 or v > top[p, 0]:
                top[p, 2], top[p, 1], col[p, 1] = top[p, 1], top[p, 0], col[p, 0]
                top[p, 0], col[p, 0] = v, j
            elif col[p, 1] < 0 or v > top[p, 1]:
                top[p, 2], top[p, 1], col[p, 1] = top[p, 1], v, j
            elif v > top[p, 2]:
                top[p, 2] = v
    new_upper = np.empty((n, r))
    new_lower = np.empty((n, r, 2))
    need = np.empty((n, r), dtype=np.bool_)
    for i in range(n):
        for p in range(r):
            lo = offsets[p]
            a = lo + labels[i, p]
            u = upper[i, p] + moved[a]
            c1, c2 = col[p, 0], col[p, 1]
            if second[i, p] >= 0:  # the largest move among the others than a and b
                b = lo + second[i, p]
                if c1 != a and c1 != b:
                    rest = top[p, 0]
                else:
                    rest = top[p, 1] if c2 != a and c2 != b else top[p, 2]
                l0 = lower[i, p, 0] - moved[b]
            else:  # ... than a
                rest = top[p, 1] if c1 == a else top[p, 0]
                l0 = lower[i, p, 0] - rest
            l1 = lower[i, p, 1] - rest
            new_upper[i, p] = u
            new_lower[i, p, 0] = l0
            new_lower[i, p, 1] = l1
            low = min(l0, l1)
            need[i, p] = not (
                np.isfinite(u) and low > u and low * low - u * u > row_slack[i] + run_slack[p]
            )
    return new_upper, new_lower, need


def moved_centroid_bounds(
    labels: np.ndarray,
    upper: np.ndarray,
    cbound: np.ndarray,
    moved: np.ndarray,
    offsets: np.ndarray,
    row_slack: np.ndarray,
    run_slack: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elkan's bounds after the centroids moved by ``moved`` (ΣK,); which pairs need a recompute.

    One lower bound per (row, centroid). The assigned centroid got farther
    by at most its own move (``upper`` (n, R) grows by it: returned new);
    every centroid j came closer by at most its own move (``cbound`` (n, ΣK)
    float32 shrinks by it *in place*, rounded down: a bound lowered twice, as
    by a retried task, is still a bound). A label is kept when every other
    centroid's bound² − upper² exceeds ``row_slack[i] + run_slack[p]``, as in
    :func:`moved_bounds`.
    Returns the new upper bounds, ``need`` (n, R) and per pair how many
    centroids failed (what :func:`kmclust.lloyd.nearest.reassign_centroids`
    would compute besides the assigned one).
    """
    return _moved_centroid_bounds(
        labels, upper, cbound, moved, np.asarray(offsets, dtype=np.int64), row_slack, run_slack
    )


@numba.njit(cache=True, nogil=True)
def _moved_centroid_bounds(  # pragma: no cover - compiled
    labels,  # IN (n, R) int: assigned centroid per (row, run), local index
    upper,  # IN (n, R) float64: upper bound on the distance to it
    cbound,  # INOUT (n, ΣK) float32: lower bound per centroid, lowered by its move
    moved,  # IN (ΣK,) float64: how far each centroid moved
    offsets,  # IN (R + 1,) int64: run p's centroids are offsets[p] … offsets[p + 1] − 1
    row_slack,  # IN (n,) float64: the rows' share of the error window
    run_slack,  # IN (R,) float64: the runs' share of the error window
):
    n, r = labels.shape
    new_upper = np.empty((n, r))
    need = np.empty((n, r), dtype=np.bool_)
    fails = np.empty((n, r), dtype=np.int32)
    # float32 moves rounded up: the float32 difference below only rounds down more
    shift = moved.astype(np.float32)
    for j in range(shift.size):
        if np.float64(shift[j]) < moved[j]:
            shift[j] = np.nextafter(shift[j], np.float32(np.inf))
    down = np.float32(1.0 - 2.0**-22)
    zero = np.float32(0)
    for i in range(n):
        row = cbound[i]
        for p in range(r):
            lo, hi = offsets[p], offsets[p + 1]
            a = lo + labels[i, p]
            u = upper[i, p] + moved[a]
            new_upper[i, p] = u
            # a bound clears when it exceeds √(u² + slack) (then it exceeds u and its square
            # clears u² by the slack), compared in float32 with that limit rounded up
            limit = up32(np.sqrt(u * u + row_slack[i] + run_slack[p]))
            bad = 0
            for j in range(lo, hi):
                low = max((row[j] - shift[j]) * down, zero)  # float32, rounded down by the factor
                row[j] = low
                bad += low <= limit
            bad -= row[a] <= limit
            fails[i, p] = bad
            need[i, p] = bad > 0 or not np.isfinite(u)
    return new_upper, need, fails
