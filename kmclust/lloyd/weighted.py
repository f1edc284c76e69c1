"""A chunk's weighted sums: Σ w·x and Σ w per cluster, weighted errors, exact for uint8 rows.

Numpy and compiled loops, no dask. For uint8 rows every weight is an exact
integer ``q`` times ``2**exp`` (one ``exp`` for the whole data set, chosen by
:func:`kmclust.lloyd.weights.prepare`), and ``q`` is cut into ``LIMB_BITS``-bit
limbs. A chunk sums ``limb · x`` and ``limb`` per cluster in int64: exact, so
the sums are the same integers however rows are chunked, reduced, or updated
by deltas. They travel *packed*, one row per stacked cluster:
``[Σ limb_0·x (D) | … | Σ limb_{L-1}·x (D) | Σ limb_0 … Σ limb_{L-1}]``.
Other rows are summed as ``w·x`` in float64 (one limb, ``exp`` 0): the
guarantee of the unweighted float path (a fixed order, not chunk-free).
Rows of weight 0 are labelled but take part in nothing else: not in sums,
counts or relocation candidates (as if dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numba
import numpy as np

from kmclust.lloyd import exact as _exact
from kmclust.lloyd.chunk import dense_columns, signed_sums

#: Bits per limb: limb · 255 < 2**34, so int64 sums hold 2**29 rows.
LIMB_BITS = 26
_MASK = (1 << LIMB_BITS) - 1


@dataclass(frozen=True)
class WeightSpec:
    """How a call's weights are summed: exact limbs (uint8 rows) or float64 products."""

    exact: bool  # limbs of q (w = q · 2**exp) summed in int64; else w · x in float64
    exp: int = 0  # the common power of two of every weight (exact only)
    limbs: int = 1  # limbs per weight (exact only)
    total: Fraction = Fraction(0)  # Σ w, exactly

    def width(self, d: int) -> int:
        """Columns of a packed row: L·D weighted sums, then L weight sums."""
        return self.limbs * (d + 1)


def limbs(w: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """(n, L) int64: the limbs of ``q = w / 2**exp`` (0 for weights ≤ 0), lowest limb first."""
    out = np.zeros((w.size, spec.limbs), dtype=np.int64)
    _limbs(np.ascontiguousarray(w, dtype=np.float64), spec.exp, out)
    return out


@numba.njit(cache=True, nogil=True)
def _limbs(w, exp, out):  # pragma: no cover - compiled
    for i in range(w.size):
        if w[i] > 0:
            m, e = math.frexp(w[i])
            q = np.int64(m * 9007199254740992.0)  # w = q · 2**(e − 53), q < 2**53
            shift = e - 53 - exp  # w = (q << shift) · 2**exp, shift ≥ 0
            for limb in range(out.shape[1]):
                s = shift - LIMB_BITS * limb
                if 0 <= s < LIMB_BITS:
                    out[i, limb] = (q << s) & _MASK  # wrapped high bits never reach the mask
                elif -64 < s < 0:
                    out[i, limb] = (q >> -s) & _MASK


def facts(w: np.ndarray) -> np.ndarray:
    """(5,) int64 of a block of weights: non-finite, negative and positive counts, the lowest set
    bit's exponent and the top exponent over the positive weights (w < 2**top)."""
    return _facts(np.ascontiguousarray(w, dtype=np.float64))


@numba.njit(cache=True, nogil=True)
def _facts(w):  # pragma: no cover - compiled
    bad = neg = pos = 0
    low, top = 1 << 20, -(1 << 20)
    for i in range(w.size):
        v = w[i]
        if not np.isfinite(v):
            bad += 1
        elif v < 0:
            neg += 1
        elif v > 0:
            pos += 1
            m, e = math.frexp(v)
            q = np.int64(m * 9007199254740992.0)
            tz = 0
            while q & 1 == 0:
                q >>= 1
                tz += 1
            low = min(low, e - 53 + tz)
            top = max(top, e)
    return np.array([bad, neg, pos, low, top], dtype=np.int64)


def pair_sums(
    x: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    signs: np.ndarray,
    w: np.ndarray,
    spec: WeightSpec,
    kt: int,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Σ signs · w · x[rows] and Σ signs · w into stacked columns ``cols``, packed: (columns, sums).

    (row, col) pairs are unique; columns None: all ``kt``.
    """
    if spec.exact:
        touched = np.flatnonzero(np.bincount(cols, minlength=kt))
        slot_of = np.empty(kt, dtype=np.int64)
        slot_of[touched] = np.arange(touched.size)
        sums = _limb_sums(
            np.ascontiguousarray(x),
            np.asarray(rows, dtype=np.int64),
            slot_of[cols],
            np.asarray(signs, dtype=np.int64),
            limbs(w, spec),
            touched.size,
        )
        return (None if touched.size == kt else touched), sums
    vals = signs * w[rows]
    touched, s = signed_sums(x, rows, cols, vals, kt, np.dtype(np.float64))
    wt = np.bincount(cols, weights=vals, minlength=kt)
    return touched, np.concatenate([s, (wt if touched is None else wt[touched])[:, None]], axis=1)


@numba.njit(cache=True, nogil=True)
def _limb_sums(x, rows, slots, signs, lim, n_slots):  # pragma: no cover - compiled
    d, nl = x.shape[1], lim.shape[1]
    out = np.zeros((n_slots, nl * (d + 1)), dtype=np.int64)
    for t in range(rows.size):
        r, s = rows[t], slots[t]
        for limb in range(nl):
            q = lim[r, limb] * signs[t]
            if q == 0:
                continue
            o = out[s, limb * d : (limb + 1) * d]
            xr = x[r]
            for j in range(d):
                o[j] += q * np.int64(xr[j])
            out[s, nl * d + limb] += q
    return out


def cluster_sums(
    x: np.ndarray, labels: np.ndarray, offsets: np.ndarray, w: np.ndarray, spec: WeightSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Packed weighted sums (KT, width) and counts (KT,) of the rows of positive weight."""
    r, kt = labels.shape[1], int(offsets[-1])
    pos = np.flatnonzero(w > 0)
    cols = (labels[pos] + offsets[:-1][None, :]).ravel()
    rows = np.repeat(pos, r)
    counts = np.bincount(cols, minlength=kt).astype(np.int64)
    touched, sums = pair_sums(x, rows, cols, np.ones(cols.size, dtype=np.int64), w, spec, kt)
    return dense_columns(touched, sums, kt), counts


def delta_sums(
    x: np.ndarray,
    labels: np.ndarray,
    old: np.ndarray,
    offsets: np.ndarray,
    w: np.ndarray,
    spec: WeightSpec,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Change of the packed sums and counts when labels go from ``old`` to ``labels`` (exact
    limbs only): (columns, sums, counts), as :func:`kmclust.lloyd.chunk.delta_sums`."""
    kt = int(offsets[-1])
    changed = (labels != old) & (w > 0)[:, None]
    rr, runs = np.divmod(np.flatnonzero(changed), labels.shape[1])  # as np.nonzero, faster
    new_cols = offsets[runs] + labels[rr, runs]
    old_cols = offsets[runs] + old[rr, runs]
    counts = np.bincount(new_cols, minlength=kt) - np.bincount(old_cols, minlength=kt)
    if rr.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, spec.width(x.shape[1])), np.int64), counts
    signs = np.concatenate([np.ones(rr.size), -np.ones(rr.size)]).astype(np.int64)
    touched, sums = pair_sums(
        x, np.concatenate([rr, rr]), np.concatenate([new_cols, old_cols]), signs, w, spec, kt
    )
    return touched, sums, counts.astype(np.int64)


def candidate_distances(dmin: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``dmin`` with rows of weight 0 at −inf: never a relocation candidate."""
    out = dmin.copy()
    out[w <= 0] = -np.inf
    return out


def positive_labels(labels: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The labels of the rows of positive weight (those that keep a cluster non-empty)."""
    return labels[w > 0]


def sqnorm(x: np.ndarray, w: np.ndarray, xsq: np.ndarray | None = None) -> Fraction:
    """Σ w‖x‖² exactly: each row's ‖x‖² (``xsq``: uint8 rows' exact integers, else summed in a
    fixed order), times w (one rounding), summed exactly."""
    if xsq is None:
        zero = np.zeros((1, x.shape[1]))
        xsq = _exact.squared_errors(x, zero, np.zeros(x.shape[0], np.int64))
    return _exact.exact_sum(w * xsq.astype(np.float64))


def errors(
    x: np.ndarray, evals: dict[int, np.ndarray], labels: np.ndarray, w: np.ndarray
) -> dict[int, tuple[Fraction, Fraction]]:
    """Σ w‖x − z‖² and Σ w‖x − z‖ for the runs at stack positions ``evals``, each summed exactly
    (:func:`kmclust.lloyd.chunk.exact_errors` with each row's terms times its weight)."""
    out = {}
    for p in sorted(evals):
        sq = _exact.squared_errors(x, evals[p], labels[:, p])
        out[p] = (_exact.exact_sum(w * sq), _exact.exact_sum(w * np.sqrt(sq)))
    return out
