"""Initial centroids for k-means: random, data, k-means++ and k-means||.

Pure numpy (no dask import). Every method is deterministic for
``(X, k, method, seed[, sample_weight])``: it builds one
``np.random.default_rng(seed)`` and consumes it exactly as each method's
docstring says. Distance work is done in float64, in row blocks, so a uint8
store is never copied whole to float64. Returned centroids are float64 and in
X's own scale (no rescaling).

Here: the registry of methods (:data:`REGISTRY`, with each method's seed
stream), input checks, *random* (from per-pixel statistics) and *data*
(distinct rows); the D² sampling methods, k-means++ and k-means||, are in
:mod:`kmclust.lloyd.init_sampling`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kmclust.errors import KmclustError
from kmclust.lloyd.init_sampling import blocks, kmeans_parallel, kmeans_plusplus, row_key


@dataclass(frozen=True)
class InitMethod:
    """One initialisation: how it picks rows, its ``n_init="auto"`` and its seed stream.

    ``stream`` is mixed into every cell's seed (:func:`cell_seed`): a number
    fixed per method, never its position in a list, so adding a method
    changes no existing seed. ``rows`` picks row indices from a generator;
    None marks *random*, which draws new points instead of picking rows.
    """

    name: str
    n_init_auto: int
    stream: int
    rows: Callable[[np.ndarray, int, np.random.Generator, np.ndarray | None], np.ndarray] | None


def cell_seed(seed: int, k: int, init: str) -> int:
    """The RNG seed of one sweep cell: independent streams for every (seed, k, init)."""
    return int(np.random.SeedSequence([seed, k, REGISTRY[init].stream]).generate_state(1)[0])


class InitError(KmclustError, ValueError):
    """Bad input to an initialiser.

    A ValueError (the scikit-learn convention for bad arguments) and a
    KmclustError (so ``kmclust.cli.run_main`` reports it as one line).
    """


# ---------------------------------------------------------------- validation
def _check_X(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise InitError(f"X must be a non-empty 2-D array (n, D); got shape {X.shape}")
    if X.dtype.kind not in "iuf":
        raise InitError(f"X must hold real numbers (int, uint or float); got dtype {X.dtype}")
    if X.dtype.kind == "f" and not all(np.isfinite(X[s]).all() for s in blocks(len(X))):
        raise InitError("X contains NaN or infinite values")
    return X


def _check_k(k: int, n: int | None) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise InitError(f"k must be an integer; got {k!r}")
    k = int(k)
    if k < 1:
        raise InitError(f"k must be >= 1; got {k}")
    if n is not None and k > n:
        raise InitError(f"k={k} exceeds the number of rows n={n}")
    return k


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InitError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def _check_weight(sample_weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,):
        raise InitError(f"sample_weight must have shape ({n},); got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InitError("sample_weight must be finite and non-negative")
    if w.sum() <= 0:
        raise InitError("sample_weight must have a positive sum")
    return w


# ------------------------------------------------------------ random / data
def data_stats(
    X: np.ndarray, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (ddof=0) of X in float64.

    Unweighted 8/16-bit integer X (e.g. uint8 pixels): exact integer sums of
    x and x^2, then one correctly rounded division, so the result does not
    depend on how rows are blocked or chunked (a dask caller summing the
    same integers gets identical bits). Otherwise two float64 passes in row
    blocks. With ``sample_weight`` the moments are weighted.
    """
    X = _check_X(X)
    return _data_stats(X, _check_weight(sample_weight, len(X)))


def _data_stats(X: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``data_stats`` on validated inputs."""
    if w is None and X.dtype.kind in "iu" and X.dtype.itemsize <= 2:
        return _int_stats(X)
    total = float(len(X)) if w is None else float(w.sum())
    acc = np.zeros(X.shape[1])
    for s in blocks(len(X)):
        b = np.asarray(X[s], dtype=np.float64)
        acc += b.sum(axis=0) if w is None else w[s] @ b
    mean = acc / total
    acc = np.zeros(X.shape[1])
    for s in blocks(len(X)):
        d = np.asarray(X[s], dtype=np.float64) - mean
        d *= d
        acc += d.sum(axis=0) if w is None else w[s] @ d
    return mean, np.sqrt(acc / total)


def _int_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean/std of a small-integer X (int64 sums cannot overflow: n < 2^31)."""
    s1 = np.zeros(X.shape[1], dtype=np.int64)
    s2 = np.zeros(X.shape[1], dtype=np.int64)
    for s in blocks(len(X)):
        b = X[s].astype(np.int64)
        s1 += b.sum(axis=0)
        s2 += np.einsum("ij,ij->j", b, b)
    return stats_from_int_sums(len(X), s1, s2)


def stats_from_int_sums(n: int, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std (ddof=0) from exact integer sums of x and x^2 over n rows.

    What ``data_stats`` does for 8/16-bit integer X; a dask caller that sums
    ``x.astype(int64)`` and its square over chunks gets bitwise the same
    statistics (hence the same ``random`` centroids) whatever the chunking.
    """
    if n < 1:
        raise InitError(f"n must be >= 1; got {n}")
    # Python ints: n * s2 - s1^2 is exact; int / int rounds correctly once
    mean = np.array([int(a) / n for a in s1])
    var = np.array([(n * int(b) - int(a) ** 2) / n**2 for a, b in zip(s1, s2, strict=True)])
    return mean, np.sqrt(var)


def random_from_stats(mean: np.ndarray, std: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k Gaussian centroids c[i, j] ~ N(mean[j], std[j]^2), not clipped.

    Seed use: ``rng = default_rng(seed)``; ``z = rng.standard_normal((k, D))``
    (one call, row-major); ``centroids = mean + std * z``. A distributed caller
    that computes mean/std over chunks gets the same centroids as
    ``init_centroids(X, k, "random", seed)`` for the same statistics.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.ndim != 1 or mean.shape != std.shape or mean.size < 1:
        raise InitError(f"mean and std must be 1-D of equal length; got {mean.shape}, {std.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise InitError("mean and std must be finite and std non-negative")
    k = _check_k(k, None)
    rng = np.random.default_rng(_check_seed(seed))
    return mean + std * rng.standard_normal((k, mean.size))


def _data_rows(X: np.ndarray, k: int, rng: np.random.Generator, w: np.ndarray | None) -> np.ndarray:
    """Indices of k rows with distinct values, drawn uniformly (or prop. to w).

    Seed use: ``rng.choice(n, k, replace=False, p=None or w/w.sum())``. Only if
    that draw holds rows with equal values are the repeats replaced, in order,
    by rows of a further ``rng.choice(rest, len(rest), replace=False, p=...)``
    ordering of the unchosen rows, skipping values already taken.
    """
    n = len(X)
    p = None if w is None else w / w.sum()
    if p is not None and np.count_nonzero(p) < k:
        raise InitError(f"k={k} exceeds the {np.count_nonzero(p)} rows with positive sample_weight")
    first = rng.choice(n, k, replace=False, p=p)
    seen: dict[bytes, int] = {}
    for i in first:
        seen.setdefault(row_key(X[i]), int(i))
    if len(seen) == k:
        return first
    chosen = list(seen.values())  # first occurrences, in draw order
    rest = np.setdiff1d(np.arange(n), first)
    if p is not None:
        rest = rest[p[rest] > 0]
    p_rest = None if p is None else p[rest] / p[rest].sum()
    for i in rng.choice(rest, len(rest), replace=False, p=p_rest) if len(rest) else []:
        key = row_key(X[i])
        if key not in seen:
            seen[key] = int(i)
            chosen.append(int(i))
            if len(chosen) == k:
                return np.asarray(chosen)
    raise InitError(f"k={k} exceeds the number of distinct rows ({len(seen)}) for 'data' init")


# -------------------------------------------------------------------- public
#: Every initialisation by name; the streams 0-3 are the list positions of the first four,
#: which fixed the seeds of every stored result.
REGISTRY: dict[str, InitMethod] = {
    m.name: m
    for m in (
        InitMethod("random", n_init_auto=10, stream=0, rows=None),
        InitMethod("data", n_init_auto=10, stream=1, rows=_data_rows),
        InitMethod("k-means++", n_init_auto=1, stream=2, rows=kmeans_plusplus),
        InitMethod("k-means||", n_init_auto=1, stream=3, rows=kmeans_parallel),
    )
}
INITS = tuple(REGISTRY)


def init_centroids(
    X: np.ndarray,
    k: int,
    method: str,
    seed: int,
    *,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """(k, D) float64 initial centroids of X by ``method`` (one of INITS).

    - ``random``: Gaussian draws with X's per-pixel mean and std
      (``random_from_stats(*data_stats(X), k, seed)``), unclipped.
    - ``data``: k rows with distinct values, ``rng.choice(n, k, replace=False)``.
    - ``k-means++``: greedy k-means++ as scikit-learn.
    - ``k-means||``: Bahmani et al. 2012 with 5 rounds, l = 2k, candidates
      weighted by the rows they attract, reduced by weighted k-means++.

    ``rng = np.random.default_rng(seed)``; see each helper for the draws.
    ``sample_weight`` (n,) weights the statistics (random), the draw (data) and
    the D^2 sampling (k-means++, k-means||). Raises ``InitError`` (a
    ValueError) on bad input.
    """
    if method not in INITS:
        raise InitError(f"unknown init method {method!r}; choose one of {', '.join(INITS)}")
    X = _check_X(X)
    k = _check_k(k, len(X))
    seed = _check_seed(seed)
    w = _check_weight(sample_weight, len(X))
    pick = REGISTRY[method].rows
    if pick is not None and w is not None and np.count_nonzero(w) < k:
        raise InitError(f"k={k} exceeds the {np.count_nonzero(w)} rows with positive sample_weight")
    if pick is None:  # random: Gaussian draws from the per-pixel statistics
        return random_from_stats(*_data_stats(X, w), k, seed)
    idx = pick(X, k, np.random.default_rng(seed), w)
    return np.asarray(X[idx], dtype=np.float64)  # fancy indexing copies, so X is never aliased
