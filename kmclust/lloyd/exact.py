"""Exact arithmetic of a chunk: fixed-order squared distances, exact sums, integer row sums.

Results must not depend on how rows are chunked, which rows a bound let
through, or the BLAS. Hence: ‖x − c‖² summed in float64 in one written-out
order (:func:`exact_sq`, which also settles near ties in
:mod:`kmclust.lloyd.nearest`), sums of float64 values kept exact as Fractions
(:func:`exact_sum`), uint8 rows summed in integers (:func:`signed_row_sums`),
and partial sums added in a fixed order (:func:`add_rows`). Also here: the
check for runs that lost a cluster (:func:`runs_missing_a_label`).

Compiled with numba; ``nogil`` so chunk tasks run in parallel threads.
numba's cache follows each function's own file only: after editing
:func:`exact_sq`, delete ``kmclust/lloyd/__pycache__`` so that its callers
in :mod:`kmclust.lloyd.nearest` (which inline it) are compiled again.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def exact_sq(xrow, c, buf):  # pragma: no cover - compiled
    """‖x − c‖² in float64 in a fixed order (eight interleaved partial sums, then a fixed tree).

    The order is written out, not left to the compiler, so the bits do not
    depend on where the row sits in memory. The differences go through the
    float64 scratch ``buf`` (length D) first: both loops then vectorise,
    which the fused loop does not (the same bits).
    """
    d = xrow.size
    for q in range(d):
        buf[q] = np.float64(xrow[q]) - c[q]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    m = d - d % 8
    for q in range(0, m, 8):
        s0 += buf[q] * buf[q]
        s1 += buf[q + 1] * buf[q + 1]
        s2 += buf[q + 2] * buf[q + 2]
        s3 += buf[q + 3] * buf[q + 3]
        s4 += buf[q + 4] * buf[q + 4]
        s5 += buf[q + 5] * buf[q + 5]
        s6 += buf[q + 6] * buf[q + 6]
        s7 += buf[q + 7] * buf[q + 7]
    for q in range(m, d):
        s0 += buf[q] * buf[q]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


def squared_errors(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) float64 ‖x_i − z_{label_i}‖², summed directly (no ‖x‖² − 2x·z + ‖z‖² cancellation)."""
    return _squared_errors(
        np.ascontiguousarray(x),
        np.ascontiguousarray(centroids, dtype=np.float64),
        np.ascontiguousarray(labels, dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
def _squared_errors(x, c64, labels):  # pragma: no cover - compiled
    out = np.empty(x.shape[0])
    buf = np.empty(x.shape[1])
    for i in range(x.shape[0]):
        out[i] = exact_sq(x[i], c64[labels[i]], buf)
    return out


def sse_terms(c: np.ndarray, s: np.ndarray, wt: np.ndarray) -> tuple[float, float]:
    """``(Σ c·s, Σ wt_i ‖c_i‖²)`` over a run's centroids ``c`` and sums ``s`` (k, D), in float64
    in one written-out order: the same bits on every CPU (numpy's einsum and the BLAS pick
    their summation order by the vector width the processor has)."""
    return _sse_terms(
        np.ascontiguousarray(c, dtype=np.float64),
        np.ascontiguousarray(s, dtype=np.float64),
        np.ascontiguousarray(wt, dtype=np.float64),
    )


@numba.njit(cache=True, nogil=True)
def _sse_terms(c, s, wt):  # pragma: no cover - compiled
    # compensated (Neumaier) sums: a fixed order that is also accurate to a few ulp
    cs, cs_err, cc, cc_err = 0.0, 0.0, 0.0, 0.0
    for i in range(c.shape[0]):
        row_cc, row_err = 0.0, 0.0
        for j in range(c.shape[1]):
            cs, e = _two_sum(cs, c[i, j] * s[i, j])
            cs_err += e
            row_cc, e = _two_sum(row_cc, c[i, j] * c[i, j])
            row_err += e
        cc, e = _two_sum(cc, wt[i] * (row_cc + row_err))
        cc_err += e
    return cs + cs_err, cc + cc_err


@numba.njit(cache=True, nogil=True, inline="always")
def _two_sum(a, b):  # pragma: no cover - compiled
    """``a + b`` and its rounding error (Knuth's TwoSum: exact, no branch)."""
    t = a + b
    bb = t - a
    return t, (a - (t - bb)) + (b - bb)


def exact_sum(v: np.ndarray) -> Fraction:
    """The exact sum of float64 values as a Fraction: no rounding, the same in any order.

    Each value is an integer mantissa times a power of two; mantissas are
    added in int64 per exponent (split in two halves: no overflow below 2**36
    values), then joined exactly. Sums of chunks add up to the sum of the
    whole whatever the chunking, which lets chunk sizes follow the thread
    count without changing a bit of J. Non-finite values give their float sum.
    """
    v = np.ascontiguousarray(v, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        return float(v.sum())
    hi, lo = _exact_sum(v)
    used = np.flatnonzero(hi | lo)
    if not used.size:
        return Fraction(0)
    low = int(used[0]) - _EXP_OFFSET - 53  # every touched bucket is a multiple of 2**low
    total = sum(((int(hi[b]) << 26) + int(lo[b])) << (int(b) - int(used[0])) for b in used)
    return Fraction(total << low) if low >= 0 else Fraction(total, 1 << -low)


_EXP_OFFSET = 1100  # frexp's exponents of finite float64 lie in [-1073, 1024]


@numba.njit(cache=True, nogil=True)
def _exact_sum(v):  # pragma: no cover - compiled
    hi = np.zeros(2 * _EXP_OFFSET, dtype=np.int64)
    lo = np.zeros(2 * _EXP_OFFSET, dtype=np.int64)
    for t in range(v.size):
        m, e = math.frexp(v[t])
        q = np.int64(m * 9007199254740992.0)  # m · 2**53: exact, |q| < 2**53
        hi[e + _EXP_OFFSET] += q >> 26
        lo[e + _EXP_OFFSET] += q & 67108863  # q = hi · 2**26 + lo, lo ≥ 0
    return hi, lo


def signed_row_sums(
    x: np.ndarray, rows: np.ndarray, slots: np.ndarray, signs: np.ndarray, n_slots: int
) -> np.ndarray:
    """(n_slots, D) int32: Σ signs[t] · x[rows[t]] into row ``slots[t]``, for uint8 ``x``.

    Integer accumulators (int32: a chunk of fewer than 2**31 / 255 rows
    cannot overflow), so the sums are exact in any order; one compiled pass
    over the pairs, no sparse matrix to build. Kept int32: half the bytes of
    float64 to move from a worker to the driver.
    """
    return _signed_row_sums(
        np.ascontiguousarray(x),
        np.asarray(rows, dtype=np.int64),
        np.asarray(slots, dtype=np.int64),
        np.asarray(signs, dtype=np.int8),
        n_slots,
    )


@numba.njit(cache=True, nogil=True)
def _signed_row_sums(x, rows, slots, signs, n_slots):  # pragma: no cover - compiled
    d = x.shape[1]
    out = np.zeros((n_slots, d), dtype=np.int32)
    for t in range(rows.size):
        r, s = rows[t], slots[t]
        if signs[t] > 0:
            for q in range(d):
                out[s, q] += np.int32(x[r, q])
        else:
            for q in range(d):
                out[s, q] -= np.int32(x[r, q])
    return out


def add_rows(out: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> None:
    """out[idx[t]] += rows[t] in place (``idx`` unique), in one compiled pass; numpy's bits."""
    _add_rows(out, np.asarray(idx, dtype=np.int64), np.ascontiguousarray(rows))


@numba.njit(cache=True, nogil=True)
def _add_rows(out, idx, rows):  # pragma: no cover - compiled
    for t in range(idx.size):
        o = out[idx[t]]
        r = rows[t]
        for q in range(r.size):
            o[q] += r[q]


def label_counts(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(ΣK,) int64 rows per stacked cluster of ``labels`` (n, R), run p's from ``offsets[p]``: a
    bincount of ``labels + offsets`` without its two (n, R) int64 temporaries. A run's column at
    a time, the bin as an unsigned index (labels are never negative): a signed one costs numba's
    negative-index test per row (10,000 labels of 8 clusters: 22 -> 11 us)."""
    return _label_counts(labels, np.asarray(offsets, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _label_counts(labels, offsets):  # pragma: no cover - compiled
    out = np.zeros(offsets[-1], dtype=np.int64)
    n, r = labels.shape
    for p in range(r):
        col, first = labels[:, p], np.uint64(offsets[p])
        for i in range(n):
            out[first + np.uint64(col[i])] += 1
    return out


def runs_missing_a_label(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stack positions p whose column of ``labels`` (n, R) lacks one of the run's labels
    0 … k_p − 1 (k_p = offsets[p + 1] − offsets[p]), ascending.

    Scans each column only until every label has been seen (a few dozen rows
    for a run without empty clusters), where a bincount reads all n · R; no
    numpy call around it (a pass's fixed cost, paid per chunk task).
    """
    return _runs_missing_a_label(labels, np.asarray(offsets, dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _runs_missing_a_label(labels, offsets):  # pragma: no cover - compiled
    n, r = labels.shape
    missing = np.zeros(r, dtype=np.int64)
    found = 0
    for p in range(r):
        k = offsets[p + 1] - offsets[p]
        seen = np.zeros(k, dtype=np.bool_)
        left = k
        for i in range(n):
            lab = labels[i, p]
            if not seen[lab]:
                seen[lab] = True
                left -= 1
                if left == 0:
                    break
        if left > 0:
            missing[found] = p
            found += 1
    return missing[:found]
