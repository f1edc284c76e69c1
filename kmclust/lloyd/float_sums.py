"""Exact per-cluster sums of a chunk's float rows, kept between passes and updated by deltas.

Every float32/float64 value of a chunk is an integer multiple of ``2**g``, the
unit in the last place of its smallest nonzero magnitude, and below ``2**top``
(:func:`grid_of`). Each value is split, exactly, into ``P`` float64 *parts*:
part p holds its bits from ``g + p·K`` up (part 0 the rest), each rounded off
the value by adding and subtracting a constant. ``K`` is chosen so that no sum
of the chunk's parts can pass 53 bits of its grid: float64 adds each part
exactly, in any order. [0, 1]-scaled float32 pixels take one part, float64
ones two. Exact sums are the same numbers however they were reached, so a
chunk keeps them between passes, changes them by the rows whose label changed,
and sends :func:`as_float` of them: the same bits as a full sum of the chunk
would give, whichever rows a bound skipped and whether or not the chunk kept
state. Chunks spanning too many bits (or holding inf or nan) are summed in
full every pass, in row order (``"fixed"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from kmclust.lloyd.partial import ChunkState

#: Parts at most; chunks whose values span more bits are summed in full, in a fixed order.
MAX_PARTS = 4


@dataclass(frozen=True)
class Grid:
    """How a chunk's sums are kept: ``mode`` "parts" or "fixed"; values are multiples of
    ``2**g``; part p of a value holds its bits from ``g + p·width`` up (p < ``parts``)."""

    mode: str
    g: int = 0
    parts: int = 1
    width: int = 0
    small: float = 0.0  # the smallest nonzero magnitude (0: none)
    big: float = 0.0  # the largest magnitude (inf: some value not finite)

    @property
    def exact(self) -> bool:
        return self.mode != "fixed"

    def constants(self) -> np.ndarray:
        """(parts,) float64: adding and subtracting ``c[p]`` rounds a value to part p's grid."""
        return np.ldexp(1.5, self.g + self.width * np.arange(self.parts) + 52)


@dataclass
class FloatState(ChunkState):
    """A float chunk's :class:`ChunkState` plus the exact sums of its ``labels``."""

    grid: Grid | None = None
    sums: np.ndarray | None = None  # (ΣK, parts, D) float64: exact, per cluster


def grid_of(x: np.ndarray) -> Grid:
    """The chunk's grid: the ulp of its smallest nonzero magnitude, and the parts of its values."""
    if x.size == 0:
        return Grid("parts")
    small, big, finite = extremes(x)
    if not finite:
        return Grid("fixed", big=np.inf)
    if big == 0:
        return Grid("parts")
    g = int(np.frexp(small)[1]) - (np.finfo(x.dtype).nmant + 1)  # every value: a multiple of 2**g
    top = int(np.frexp(big)[1])  # ... below 2**top
    # a kept sum and a delta: at most 2n terms, each below 2**(width − 1) units of its part's grid
    # (the top part: below 2**top), must stay within float64's 53 bits
    n_bits = (2 * x.shape[0]).bit_length()
    width = 53 - n_bits
    parts = 1 + max(0, -(-(top - g + n_bits - 53) // width))
    if parts > MAX_PARTS or (parts > 1 and (g + 52 < -1020 or top > 960)):  # normal constants
        return Grid("fixed", small=small, big=big)
    return Grid("parts", g, parts, width, small, big)


#: float64 rows whose nonzero magnitudes lie in [2**-RANGE32, 2**RANGE32], against centroids in
#: [2**(-RANGE32 - 20), 2**RANGE32], compute distances in float32: no product or square leaves
#: float32's normal range, so :func:`kmclust.lloyd.distance.error_bound`'s relative bound holds.
RANGE32 = 40


def fits32(grid: Grid, centroids: np.ndarray) -> bool:
    """Whether float64 rows of ``grid`` may be computed in float32 against ``centroids``."""
    lo, hi = 2.0**-RANGE32, 2.0**RANGE32
    if not (grid.big <= hi and (grid.small == 0 or grid.small >= lo)):
        return False
    smallest, largest, finite = extremes(centroids)  # one read, no temporaries (every pass)
    return finite and largest <= hi and smallest >= lo * 2.0**-20


def extremes(x: np.ndarray) -> tuple[float, float, bool]:
    """(smallest nonzero |x|, largest |x|, all finite) of a float array (the first two only
    when all are finite), read from the bits: without the sign bit, a finite float's bits
    order as its magnitude, and inf and nan lie above every finite one."""
    v = np.ascontiguousarray(x).reshape(-1)
    ut = np.dtype(f"u{v.dtype.itemsize}").type
    lo, hi = _bit_extremes(v.view(ut), ut(np.iinfo(ut).max >> 1))
    if hi >= np.array(np.inf, v.dtype).view(ut):
        return np.inf, np.inf, False
    small = np.inf if lo == np.iinfo(ut).max else np.array(lo + 1, ut).view(v.dtype)[()]
    return float(small), float(np.array(hi, ut).view(v.dtype)[()]), True


@numba.njit(cache=True, nogil=True)
def _bit_extremes(u, mask):  # pragma: no cover - compiled
    """(smallest nonzero, largest) of ``u & mask``, the first minus 1 (all ones if all are 0);
    integer selects, which the compiler vectorises."""
    one = u.dtype.type(1)
    lo, hi = ~u.dtype.type(0), u.dtype.type(0)
    for t in range(u.size):
        a = u[t] & mask
        hi = a if a > hi else hi
        b = a - one  # 0 wraps to all ones: never the smallest
        lo = b if b < lo else lo
    return lo, hi


def full_sums(x: np.ndarray, labels: np.ndarray, offsets: np.ndarray, grid: Grid) -> np.ndarray:
    """The chunk's exact (or, "fixed", row-order) sums per stacked cluster, as :class:`Grid` keeps
    them."""
    n, r = labels.shape
    cols = (labels + offsets[:-1][None, :]).astype(np.int64)  # (n, R)
    rows = np.repeat(np.arange(n, dtype=np.int64), r)
    out = np.zeros((int(offsets[-1]), grid.parts, x.shape[1]))
    return _apply(x, rows, cols.ravel(), np.ones(rows.size, np.int64), grid, out)


def changed_sums(
    sums: np.ndarray,
    x: np.ndarray,
    labels: np.ndarray,
    old: np.ndarray,
    offsets: np.ndarray,
    grid: Grid,
) -> np.ndarray:
    """A copy of exact ``sums`` of labels ``old`` changed into those of ``labels`` (the rows whose
    label changed: + into the new cluster, − out of the old); summed in full instead when at
    least half the (row, run) pairs changed (early passes): fewer rows to add, the same sums."""
    # (row, run) pairs in row-major order, as np.nonzero gives them, at a sixth of its cost
    rr, runs = np.divmod(np.flatnonzero(labels != old), labels.shape[1])
    if 2 * rr.size >= labels.size:  # a full sum adds fewer rows: the same exact sums
        return full_sums(x, labels, offsets, grid)
    out = sums.copy()  # the state may be shared (threaded scheduler, a retried pass)
    if rr.size:
        cols = np.concatenate([offsets[runs] + labels[rr, runs], offsets[runs] + old[rr, runs]])
        signs = np.concatenate([np.ones(rr.size, np.int64), -np.ones(rr.size, np.int64)])
        rows = np.concatenate([rr, rr]).astype(np.int64)
        # exact in place: every sum on the way is of a subset of the chunk's rows
        _apply(x, rows, cols.astype(np.int64), signs, grid, out)
    return out


def _apply(x, rows, cols, signs, grid: Grid, out: np.ndarray) -> np.ndarray:
    """Add the pairs' rows, signed, into ``out`` (ΣK, parts, D) and return it."""
    x = np.ascontiguousarray(x)
    if grid.exact:
        _parts_add(x, rows, cols, signs, grid.constants(), out)
    else:
        _float_add(x, rows, cols, signs, out)
    return out


def as_float(sums: np.ndarray, grid: Grid) -> np.ndarray:
    """(ΣK, D) float64 of kept sums (ΣK, parts, D): a fixed function of them (top part first)."""
    out = sums[:, -1].copy()
    for p in range(sums.shape[1] - 2, -1, -1):
        out += sums[:, p]
    return out


@numba.njit(cache=True, nogil=True)
def _float_add(x, rows, cols, signs, out):  # pragma: no cover - compiled
    """out[cols[t], 0] += signs[t] · x[rows[t]] in float64, pair after pair."""
    d = x.shape[1]
    for t in range(rows.size):
        o = out[cols[t], 0]
        xr = x[rows[t]]
        if signs[t] > 0:
            for q in range(d):
                o[q] += np.float64(xr[q])
        else:
            for q in range(d):
                o[q] -= np.float64(xr[q])


@numba.njit(cache=True, nogil=True)
def _parts_add(x, rows, cols, signs, consts, out):  # pragma: no cover - compiled
    """out[cols[t], p] += part p of signs[t] · x[rows[t]] (exact splits, exact sums; no fastmath:
    (v + c) − c must round). One or two parts (most data) in one sweep of the row."""
    d, n_parts = x.shape[1], consts.size
    rem = np.empty(d)
    for t in range(rows.size):
        o = out[cols[t]]
        xr = x[rows[t]]
        sg = np.float64(signs[t])
        if n_parts == 1:
            o0 = o[0]
            for q in range(d):
                o0[q] += np.float64(xr[q]) * sg
            continue
        if n_parts == 2:
            c, o0, o1 = consts[1], o[0], o[1]
            for q in range(d):
                v = np.float64(xr[q]) * sg
                h = (v + c) - c
                o1[q] += h
                o0[q] += v - h
            continue
        for q in range(d):
            rem[q] = np.float64(xr[q]) * sg
        for p in range(n_parts - 1, 0, -1):
            c = consts[p]
            op = o[p]
            for q in range(d):
                h = (rem[q] + c) - c
                rem[q] -= h
                op[q] += h
        o0 = o[0]
        for q in range(d):
            o0[q] += rem[q]
