"""Computed squared distances ‖c‖² − 2x·c and the proven bound on their rounding error.

A chunk's distances come from a GEMM (:mod:`kmclust.lloyd.chunk`), from the
compiled uint8 kernel :func:`pixel_distances`, or pair by pair from the dot
products here (:func:`computed_sq`, :func:`dots`, :func:`dots_at`, used by
:mod:`kmclust.lloyd.nearest`). Each sums in whatever order is fastest;
:func:`error_bound` holds for every order, which is what lets the exact
nearest-centroid rules settle every near tie the same way whichever
computation gave the distances. Also here: the uint8 rows' helpers (row
norms summed exactly, row gathers converted in one pass).

Compiled with numba; ``nogil`` so chunk tasks run in parallel threads.
numba's cache follows each function's own file only: after editing a
compiled helper here, delete ``kmclust/lloyd/__pycache__`` so that callers
in other modules (which inline it) are compiled again.
"""

from __future__ import annotations

import numba
import numpy as np


def error_bound(
    xsq: np.ndarray, csq_max: float | np.ndarray, d: int, dtype: np.dtype
) -> np.ndarray:
    """Per row, a bound on the error of a computed ‖c‖² − 2x·c (and of ‖x‖² added to it).

    Dot products of length ``d`` in ``dtype`` err by at most γ_d·Σ|x_i c_i| ≤
    γ_d·‖x‖‖c‖ (γ_d = d·u / (1 − d·u), u the unit roundoff), ‖c‖² by γ_d·‖c‖²,
    each addition by u·|result|; with 2‖x‖‖c‖ ≤ ‖x‖² + ‖c‖² the total is
    below (d + 2)·u·(‖x‖² + 2 max‖c‖²) to first order. The factor 1.25 and
    d + 4 cover γ_d's higher-order terms (d·u ≈ 5e-5 for float32) and the
    norms passed in being computed values themselves.
    """
    return error_coef(d, dtype) * (
        np.asarray(xsq, dtype=np.float64) + 2.0 * np.asarray(csq_max, dtype=np.float64)
    )


def error_coef(d: int, dtype: np.dtype) -> float:
    """:func:`error_bound`'s factor of ‖x‖² + 2 max‖c‖²: 1.25 · (d + 4) · u."""
    return 1.25 * (d + 4) * (float(np.finfo(dtype).eps) / 2)


def dot_terms(x_dtype: np.dtype, dtype: np.dtype, d: int) -> int:
    """The dot-product length for :func:`error_bound`: ``d``, or ``d + 2`` when rows of ``x_dtype``
    are rounded to ``dtype`` first (float64 rows computed in float32: each product then carries
    two more roundings, as a product of two more terms would)."""
    return d if np.can_cast(x_dtype, dtype, "safe") else d + 2


def row_norms(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(n,) ‖x_i‖² in ``dtype``: summed exactly for integer pixels, in ``dtype`` otherwise."""
    if x.dtype == np.uint8:
        return _row_norms_u8(np.ascontiguousarray(x)).astype(dtype)
    xf = x.astype(dtype, copy=False)
    return np.einsum("ij,ij->i", xf, xf)


@numba.njit(cache=True, nogil=True)
def _row_norms_u8(x):  # pragma: no cover - compiled
    out = np.empty(x.shape[0], dtype=np.int64)
    for i in range(x.shape[0]):
        s = 0
        for q in range(x.shape[1]):
            v = np.int64(x[i, q])
            s += v * v
        out[i] = s
    return out


def take_rows(x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[t] = x[rows[t]] converted to out's dtype, in one compiled pass.

    numpy would gather first, then convert: two passes over the rows.
    """
    _take_rows(x, rows, out)


@numba.njit(cache=True, nogil=True)
def _take_rows(x, rows, out):  # pragma: no cover - compiled
    for t in range(rows.size):
        r = rows[t]
        for q in range(x.shape[1]):
            out[t, q] = x[r, q]


def pixel_distances(x: np.ndarray, rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(m, KT) ‖c‖² − 2x·c of uint8 rows ``x[rows]`` against ``centroids``, in the centroids' dtype.

    What a GEMM of the converted rows gives, off by at most :func:`error_bound`
    as well (sums in any order), from a compiled kernel: six rows converted
    into a small buffer, then four centroids at a time, 24 sums held in
    registers. Thin stacks (a run of k=20) are where it beats a GEMM of
    converted blocks, which packs the whole block for a few columns; on wide
    stacks the two are on a par. A row's values do not depend on the other
    rows.
    """
    kt = centroids.shape[0]
    ct2 = np.zeros((-(-kt // 4) * 4, x.shape[1]), dtype=centroids.dtype)
    ct2[:kt] = centroids * -2.0  # exact
    csq = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty((rows.size, kt), dtype=centroids.dtype)
    _pixel_distances(x, np.asarray(rows, dtype=np.int64), ct2, csq, out)
    return out


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _pixel_distances(x, rows, ct2, csq, out):  # pragma: no cover - compiled
    m, kt = out.shape
    d = x.shape[1]
    zero = ct2.dtype.type(0)
    buf = np.zeros((6, d), dtype=ct2.dtype)
    tile = np.empty((6, 4), dtype=ct2.dtype)
    for i0 in range(0, m, 6):
        h = min(6, m - i0)
        for r in range(h):
            src = x[rows[i0 + r]]  # one row index, not one per element: the copy then vectorises
            for q in range(d):
                buf[r, q] = src[q]
        for r in range(h, 6):  # the last rows: zeros, not written out
            buf[r, :] = zero
        b0, b1, b2, b3, b4, b5 = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5]
        for j0 in range(0, ct2.shape[0], 4):
            c0, c1, c2, c3 = ct2[j0], ct2[j0 + 1], ct2[j0 + 2], ct2[j0 + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = s20 = s21 = s22 = s23 = zero
            s30 = s31 = s32 = s33 = s40 = s41 = s42 = s43 = s50 = s51 = s52 = s53 = zero
            for q in range(d):
                w0, w1, w2, w3 = c0[q], c1[q], c2[q], c3[q]
                v = b0[q]
                s00 += v * w0
                s01 += v * w1
                s02 += v * w2
                s03 += v * w3
                v = b1[q]
                s10 += v * w0
                s11 += v * w1
                s12 += v * w2
                s13 += v * w3
                v = b2[q]
                s20 += v * w0
                s21 += v * w1
                s22 += v * w2
                s23 += v * w3
                v = b3[q]
                s30 += v * w0
                s31 += v * w1
                s32 += v * w2
                s33 += v * w3
                v = b4[q]
                s40 += v * w0
                s41 += v * w1
                s42 += v * w2
                s43 += v * w3
                v = b5[q]
                s50 += v * w0
                s51 += v * w1
                s52 += v * w2
                s53 += v * w3
            if h == 6 and j0 + 4 <= kt:
                _put4(out, i0, j0, csq, s00, s01, s02, s03)
                _put4(out, i0 + 1, j0, csq, s10, s11, s12, s13)
                _put4(out, i0 + 2, j0, csq, s20, s21, s22, s23)
                _put4(out, i0 + 3, j0, csq, s30, s31, s32, s33)
                _put4(out, i0 + 4, j0, csq, s40, s41, s42, s43)
                _put4(out, i0 + 5, j0, csq, s50, s51, s52, s53)
                continue
            tile[0, 0], tile[0, 1], tile[0, 2], tile[0, 3] = s00, s01, s02, s03
            tile[1, 0], tile[1, 1], tile[1, 2], tile[1, 3] = s10, s11, s12, s13
            tile[2, 0], tile[2, 1], tile[2, 2], tile[2, 3] = s20, s21, s22, s23
            tile[3, 0], tile[3, 1], tile[3, 2], tile[3, 3] = s30, s31, s32, s33
            tile[4, 0], tile[4, 1], tile[4, 2], tile[4, 3] = s40, s41, s42, s43
            tile[5, 0], tile[5, 1], tile[5, 2], tile[5, 3] = s50, s51, s52, s53
            for r in range(h):  # the last rows or centroids
                for j in range(j0, min(j0 + 4, kt)):
                    out[i0 + r, j] = tile[r, j - j0] + csq[j]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def narrow_distances(x, rows, ct2, csq, out):  # pragma: no cover - compiled
    """out[t] = ‖c‖² − 2x·c of row ``x[rows[t]]`` against a few centroids (``ct2`` = −2c, rows
    padded to a multiple of 4; ``csq`` their ‖c‖²), off by at most :func:`error_bound`.

    As :func:`pixel_distances`, but two rows by four centroids at a time: eight sums and the
    loaded values fit the registers, which the six-by-four tile's do not (twice as fast for the
    16 centroids of a group in :mod:`kmclust.lloyd.groups`).
    """
    m, kt = out.shape
    d = x.shape[1]
    zero = ct2.dtype.type(0)
    buf = np.zeros((2, d), dtype=ct2.dtype)
    for i0 in range(0, m, 2):
        h = min(2, m - i0)
        for r in range(h):
            src = x[rows[i0 + r]]
            for q in range(d):
                buf[r, q] = src[q]
        if h < 2:
            buf[1, :] = zero
        b0, b1 = buf[0], buf[1]
        for j0 in range(0, ct2.shape[0], 4):
            c0, c1, c2, c3 = ct2[j0], ct2[j0 + 1], ct2[j0 + 2], ct2[j0 + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            for q in range(d):
                w0, w1, w2, w3 = c0[q], c1[q], c2[q], c3[q]
                v = b0[q]
                s00 += v * w0
                s01 += v * w1
                s02 += v * w2
                s03 += v * w3
                v = b1[q]
                s10 += v * w0
                s11 += v * w1
                s12 += v * w2
                s13 += v * w3
            for r in range(h):
                for jj in range(min(4, kt - j0)):
                    if r == 0:
                        s = s00 if jj == 0 else s01 if jj == 1 else s02 if jj == 2 else s03
                    else:
                        s = s10 if jj == 0 else s11 if jj == 1 else s12 if jj == 2 else s13
                    out[i0 + r, j0 + jj] = s + csq[j0 + jj]


@numba.njit(cache=True, nogil=True)
def _put4(out, i, j0, csq, s0, s1, s2, s3):  # pragma: no cover - compiled
    out[i, j0] = s0 + csq[j0]
    out[i, j0 + 1] = s1 + csq[j0 + 1]
    out[i, j0 + 2] = s2 + csq[j0 + 2]
    out[i, j0 + 3] = s3 + csq[j0 + 3]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def dot(buf, c):  # pragma: no cover - compiled
    """buf · c in their dtype, any order (the error bound holds for every order)."""
    s = c.dtype.type(0)
    for q in range(buf.size):
        s += buf[q] * c[q]
    return s


@numba.njit(cache=True, nogil=True)
def computed_sq(buf, cent, csq, xsq_i, j):  # pragma: no cover - compiled
    """‖x − c_j‖² as a GEMM entry computes it (one dot product in the centroids' dtype), ≥ 0.

    Clipped at 0; off by at most :func:`error_bound`, as the distances the bounds came from.
    """
    return max(csq[j] - cent.dtype.type(2) * dot(buf, cent[j]) + xsq_i, cent.dtype.type(0))


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def dots(buf, cent, lo, hi, out):  # pragma: no cover - compiled
    """out[j - lo] = buf · cent[j] for j in [lo, hi), four centroids per sweep over ``buf``.

    Four sums per load of ``buf[q]``: the row is read once per four centroids.
    """
    d = buf.size
    j = lo
    while j + 4 <= hi:
        s0 = s1 = s2 = s3 = cent.dtype.type(0)
        for q in range(d):
            v = buf[q]
            s0 += v * cent[j, q]
            s1 += v * cent[j + 1, q]
            s2 += v * cent[j + 2, q]
            s3 += v * cent[j + 3, q]
        out[j - lo] = s0
        out[j - lo + 1] = s1
        out[j - lo + 2] = s2
        out[j - lo + 3] = s3
        j += 4
    while j < hi:
        s0 = cent.dtype.type(0)
        for q in range(d):
            s0 += buf[q] * cent[j, q]
        out[j - lo] = s0
        j += 1


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def dots_at(buf, cent, idx, m, out):  # pragma: no cover - compiled
    """out[t] = buf · cent[idx[t]] for t < m, four centroids per sweep over ``buf`` as in dots."""
    d = buf.size
    t = 0
    while t + 4 <= m:
        c0, c1, c2, c3 = cent[idx[t]], cent[idx[t + 1]], cent[idx[t + 2]], cent[idx[t + 3]]
        s0 = s1 = s2 = s3 = cent.dtype.type(0)
        for q in range(d):
            v = buf[q]
            s0 += v * c0[q]
            s1 += v * c1[q]
            s2 += v * c2[q]
            s3 += v * c3[q]
        out[t] = s0
        out[t + 1] = s1
        out[t + 2] = s2
        out[t + 3] = s3
        t += 4
    while t < m:
        out[t] = dot(buf, cent[idx[t]])
        t += 1
