"""Sample weights on the driver: checked once, chunked like the rows, and the packed weighted sums
(:mod:`kmclust.lloyd.weighted`) turned into centroids and J (a run's means and J live here,
weighted or not).

For uint8 rows the packed sums are exact integers, the same for any chunking,
scheduler, executor or pruning; the floats made from them here (a fixed
function of those integers) are then the same bits too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import dask
import dask.array as da
import numpy as np

from kmclust.errors import KmclustError
from kmclust.lloyd import exact as _exact
from kmclust.lloyd.runs import Run
from kmclust.lloyd.weighted import LIMB_BITS, WeightSpec, facts, limbs

#: Widest span (bits) between the largest weight and the lowest set bit of the smallest one.
MAX_SPAN_BITS = 8 * LIMB_BITS


class WeightError(KmclustError, ValueError):
    """Bad ``sample_weight``: a ValueError (scikit-learn's convention), reported as one line."""


def prepare(sample_weight, x: da.Array) -> tuple[WeightSpec, da.Array]:
    """Check ``sample_weight`` against the rows of ``x``; its spec and the weights as a float64
    (N, 1) column in x's row chunks (2-D, as the rows: the executors' chunk references).

    Raises :class:`WeightError` for a wrong shape, non-numbers, NaN, inf, negative weights, an
    all-zero vector, or (uint8 rows) a span of magnitudes too wide for exact sums.
    """
    n = x.shape[0]
    w = sample_weight
    if isinstance(w, da.Array):
        if w.ndim == 1 and math.isnan(w.shape[0]):
            w = w.compute_chunk_sizes()
        if w.ndim != 1 or w.shape[0] != n:
            raise WeightError(f"sample_weight must have shape ({n},) like X's rows; got {w.shape}")
        kind = w.dtype.kind
        w = w.astype(np.float64)
    else:
        w = np.asarray(w)
        if w.shape != (n,):
            raise WeightError(f"sample_weight must have shape ({n},) like X's rows; got {w.shape}")
        kind = w.dtype.kind
        w = da.from_array(w.astype(np.float64, copy=False), chunks=(x.chunks[0],))
    if kind not in "biuf":
        raise WeightError(f"sample_weight must hold real numbers; got dtype {w.dtype}")
    w = w.rechunk({0: x.chunks[0]})
    if isinstance(sample_weight, da.Array):
        got = dask.compute(*[dask.delayed(_block_facts)(b) for b in w.to_delayed()])
    else:  # in memory: no graph
        got = [_block_facts(b) for b in np.array_split(np.asarray(sample_weight, np.float64), 8)]
    bad, neg, pos, low, top = (int(v) for v in _fold(np.stack([f for f, _ in got])))
    if bad:
        raise WeightError(f"sample_weight must be finite; it holds {bad} NaN or infinite value(s)")
    if neg:
        raise WeightError(f"sample_weight must be non-negative; it holds {neg} negative value(s)")
    if not pos:
        raise WeightError("sample_weight must have a positive sum; every weight is 0")
    total = sum((t for _, t in got), Fraction(0))
    if x.dtype != np.uint8:
        return WeightSpec(False, total=total), w[:, None]
    if top - low > MAX_SPAN_BITS:
        raise WeightError(
            f"sample_weight spans {top - low} bits between its largest weight and the last bit of "
            f"its smallest (at most {MAX_SPAN_BITS} for exact sums); rescale or drop tiny weights"
        )
    return WeightSpec(True, low, max(1, -(-(top - low) // LIMB_BITS)), total), w[:, None]


def _block_facts(w: np.ndarray) -> tuple[np.ndarray, Fraction]:
    f = facts(w)
    return f, (_exact.exact_sum(w) if f[0] == 0 and f[1] == 0 else Fraction(0))


def _fold(f: np.ndarray) -> np.ndarray:
    """Blocks' facts into the data set's: counts added, the lowest low, the highest top."""
    return np.array([*f[:, :3].sum(axis=0), f[:, 3].min(), f[:, 4].max()])


def values(packed: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
    """(k, D) Σ w·x and (k,) Σ w as float64 from packed sums: limbs added from the highest down,
    each scaled by an exact power of two (a fixed function of the exact integers)."""
    nl = spec.limbs
    d = packed.shape[1] // nl - 1
    s = np.zeros((packed.shape[0], d))
    wt = np.zeros(packed.shape[0])
    for limb in reversed(range(nl)):
        f = math.ldexp(1.0, spec.exp + LIMB_BITS * limb) if spec.exact else 1.0
        s += packed[:, limb * d : (limb + 1) * d].astype(np.float64) * f
        wt += packed[:, nl * d + limb].astype(np.float64) * f
    return s, wt


def means(run: Run) -> np.ndarray:
    """A run's cluster means: weighted with sample weights (clusters of positive weight), else
    sums / counts."""
    if run.weights is None:
        return run.sums / run.counts[:, None]
    s, wt = values(run.sums, run.weights)
    return s / wt[:, None]


def sse(sqnorm: Fraction | float, run: Run) -> float:
    """Σ w‖x − c_label‖² = Σ w‖x‖² − 2 Σ c·S + Σ W‖c‖² from a run's sums (float64; w = 1 and
    ``sqnorm`` Σ‖x‖² unweighted, whose sums are exact: no cancellation)."""
    if run.weights is None:
        cs, cc = _exact.sse_terms(run.c64, run.sums, run.counts)
    else:
        cs, cc = _exact.sse_terms(run.c64, *values(run.sums, run.weights))
    return float(float(sqnorm) - 2.0 * cs + cc)


def packed_rows(rows: np.ndarray, w: np.ndarray, spec: WeightSpec) -> np.ndarray:
    """(m, width) packed sums of single rows (raw units) with their weights ``w`` (m,)."""
    if not spec.exact:
        return np.concatenate([w[:, None] * rows, w[:, None]], axis=1)
    lim = limbs(w, spec)  # (m, L)
    xi = rows.astype(np.int64)
    return np.concatenate([*(lim[:, [t]] * xi for t in range(spec.limbs)), lim], axis=1)
