"""Initial centroids for k-means: random, data, k-means++ and k-means||.

Pure numpy (no dask import). Every method is deterministic for
``(X, k, method, seed[, sample_weight])``: it builds one
``np.random.default_rng(seed)`` and consumes it exactly as each method's
docstring says. Distance work is done in float64, in row blocks, so a uint8
store is never copied whole to float64. Returned centroids are float64 and in
X's own scale (no rescaling).

The per-block helpers of k-means|| (``_closest_sq_dist``,
``_kmeans_parallel_round``, ``_candidate_weights``) are pure functions of a
block of rows so a distributed caller can map them over dask chunks and sum or
concatenate the results on the driver.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kmclust.errors import KmclustError

log = logging.getLogger(__name__)


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


#: rows per float64 block of distance work (4096 x 784 x 8 B ~ 25 MB)
_BLOCK_ROWS = 4096
#: expansion distances below this share of |x|^2 + |c|^2 are summed directly
_EXACT_REL = 1e-6
#: k-means|| defaults (Bahmani et al. 2012; Spark MLlib uses 2 rounds, the paper 5)
_PARALLEL_ROUNDS = 5
_OVERSAMPLING = 2.0  # l = 2 k


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
    if X.dtype.kind == "f" and not all(np.isfinite(X[s]).all() for s in _blocks(len(X))):
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


# ----------------------------------------------------------- float64 helpers
def _blocks(n: int) -> Iterator[slice]:
    """Row slices of ``_BLOCK_ROWS`` (read at call time, so tests can vary it)."""
    rows = _BLOCK_ROWS
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared row norms of X in float64 (blockwise)."""
    out = np.empty(len(X))
    for s in _blocks(len(X)):
        b = _f64(X[s])
        out[s] = np.einsum("ij,ij->i", b, b)
    return out


def _sq_dists_gemm(X: np.ndarray, x_sq: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(n, m) squared distances by the GEMM expansion ``|x|^2 - 2 x.c + |c|^2``, clipped at 0.

    Fast but cancels for rows close to a centre; ``_refine`` repairs the
    distances that are kept.
    """
    C = _f64(C)
    c_sq = np.einsum("ij,ij->i", C, C)
    out = np.empty((len(X), len(C)))
    for s in _blocks(len(X)):
        d = _f64(X[s]) @ C.T
        d *= -2.0
        d += x_sq[s, None]
        d += c_sq[None, :]
        out[s] = d
    np.maximum(out, 0.0, out=out)
    return out


def _refine(
    rows: np.ndarray, x_sq: np.ndarray, C: np.ndarray, nearest: np.ndarray, d: np.ndarray
) -> np.ndarray:
    """Make expansion distances ``d[i] = |rows[i] - C[nearest[i]]|^2`` accurate, in place.

    The expansion's absolute error is about D * eps * (|x|^2 + |c|^2); where
    ``d`` is not well above that (below ``_EXACT_REL`` times the norms) the
    distance is summed directly instead. So a row equal to its centre gets
    exactly 0, and every other distance has a relative error below ~1e-7.
    """
    C = _f64(C)
    c_sq = np.einsum("ij,ij->i", C, C)
    risky = np.flatnonzero(d <= _EXACT_REL * (x_sq + c_sq[nearest]))
    if len(risky):
        diff = _f64(rows[risky]) - C[nearest[risky]]
        d[risky] = np.einsum("ij,ij->i", diff, diff)
    return d


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
    for s in _blocks(len(X)):
        b = _f64(X[s])
        acc += b.sum(axis=0) if w is None else w[s] @ b
    mean = acc / total
    acc = np.zeros(X.shape[1])
    for s in _blocks(len(X)):
        d = _f64(X[s]) - mean
        d *= d
        acc += d.sum(axis=0) if w is None else w[s] @ d
    return mean, np.sqrt(acc / total)


def _int_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean/std of a small-integer X (int64 sums cannot overflow: n < 2^31)."""
    s1 = np.zeros(X.shape[1], dtype=np.int64)
    s2 = np.zeros(X.shape[1], dtype=np.int64)
    for s in _blocks(len(X)):
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
    mean = _f64(mean)
    std = _f64(std)
    if mean.ndim != 1 or mean.shape != std.shape or mean.size < 1:
        raise InitError(f"mean and std must be 1-D of equal length; got {mean.shape}, {std.shape}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise InitError("mean and std must be finite and std non-negative")
    k = _check_k(k, None)
    rng = np.random.default_rng(_check_seed(seed))
    return mean + std * rng.standard_normal((k, mean.size))


def _row_key(row: np.ndarray) -> bytes:
    # + 0 maps -0.0 to 0.0 for floats; integer rows are unchanged
    return (row + row.dtype.type(0)).tobytes()


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
        seen.setdefault(_row_key(X[i]), int(i))
    if len(seen) == k:
        return first
    chosen = list(seen.values())  # first occurrences, in draw order
    rest = np.setdiff1d(np.arange(n), first)
    if p is not None:
        rest = rest[p[rest] > 0]
    p_rest = None if p is None else p[rest] / p[rest].sum()
    for i in rng.choice(rest, len(rest), replace=False, p=p_rest) if len(rest) else []:
        key = _row_key(X[i])
        if key not in seen:
            seen[key] = int(i)
            chosen.append(int(i))
            if len(chosen) == k:
                return np.asarray(chosen)
    raise InitError(f"k={k} exceeds the number of distinct rows ({len(seen)}) for 'data' init")


# ---------------------------------------------------------------- k-means++
def _kmeans_plusplus(
    X: np.ndarray, k: int, rng: np.random.Generator, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """Greedy k-means++ (scikit-learn's ``_kmeans_plusplus``); returns k row indices.

    Trusts its inputs. Seed use: the first centre is ``rng.choice(n, p=p)``
    with p = None unweighted, else w / w.sum(); then for each
    further centre ``rng.random(t)`` with t = 2 + int(log k) candidates,
    sampled prop. to w * D^2 (inverse CDF); the candidate giving the lowest
    potential is kept. If every point already sits on a centre (potential 0),
    candidates are sampled prop. to w instead.
    """
    n = len(X)
    w = np.ones(n) if sample_weight is None else sample_weight
    t = 2 + int(np.log(k))
    x_sq = _sq_norms(X)
    idx = np.empty(k, dtype=np.int64)
    idx[0] = rng.choice(n, p=None if sample_weight is None else w / w.sum())
    one = np.zeros(n, dtype=np.intp)  # "nearest" index into a single centre
    closest = _refine(X, x_sq, X[idx[:1]], one, _sq_dists_gemm(X, x_sq, X[idx[:1]])[:, 0])
    for c in range(1, k):
        cum = np.cumsum(w * closest)
        if cum[-1] <= 0:
            log.debug("k-means++: all mass on chosen centres at step %d; sampling by weight", c)
            cum = np.cumsum(w)
        # side="right" never lands on a point of zero mass; the clip guards rounding
        ids = np.searchsorted(cum, rng.random(t) * cum[-1], side="right")
        np.minimum(ids, int(np.flatnonzero(np.diff(cum, prepend=0.0) > 0)[-1]), out=ids)
        d = _sq_dists_gemm(X, x_sq, X[ids])
        best = int(np.argmin(w @ np.minimum(d, closest[:, None])))
        idx[c] = ids[best]
        kept = _refine(X, x_sq, X[idx[c : c + 1]], one, d[:, best])
        np.minimum(closest, kept, out=closest)
    return idx


# ---------------------------------------------------------------- k-means||
def _closest_sq_dist(block: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row of ``block`` and its squared distance.

    Pure per-block function (mappable over dask chunks). The nearest centre
    is ranked by the GEMM expansion; distances that may have cancelled are
    summed directly (``_refine``), so a row equal to a centre gets exactly 0.
    """
    x_sq = _sq_norms(block)
    d = _sq_dists_gemm(block, x_sq, centers)
    nearest = np.argmin(d, axis=1)
    d_min = d[np.arange(len(d)), nearest]
    return _refine(block, x_sq, centers, nearest, d_min), nearest


def _kmeans_parallel_round(
    closest_sq: np.ndarray,
    uniforms: np.ndarray,
    phi: float,
    ell: float,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of one block picked in a k-means|| round (indices into the block).

    Pure per-block function: row x is picked when
    ``u(x) < min(1, ell * w(x) * d^2(x) / phi)``, with ``d^2`` the squared
    distance to the nearest centre so far (``_closest_sq_dist``), ``phi`` the
    data set's total ``sum w d^2`` and ``u`` the row's uniform draw. The
    uniforms are an input so that results do not depend on how rows are cut
    into blocks: ``init_centroids`` draws them from one stream in row order.
    """
    mass = closest_sq if weight is None else weight * closest_sq
    prob = np.minimum(1.0, ell * mass / phi)
    return np.flatnonzero(uniforms < prob)


def _candidate_weights(
    block: np.ndarray, candidates: np.ndarray, weight: np.ndarray | None = None
) -> np.ndarray:
    """Per candidate, the (weighted) number of rows of ``block`` closest to it.

    Pure per-block function; the weights of the whole data set are the sum
    over blocks.
    """
    nearest = _closest_sq_dist(block, candidates)[1]
    return np.bincount(nearest, weights=weight, minlength=len(candidates)).astype(np.float64)


def _kmeans_parallel(
    X: np.ndarray,
    k: int,
    rng: np.random.Generator,
    sample_weight: np.ndarray | None = None,
    rounds: int = _PARALLEL_ROUNDS,
    oversampling: float = _OVERSAMPLING,
) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012, as Spark MLlib); returns k row indices.

    Trusts its inputs. Seed use, in order: first centre ``rng.choice(n, p=p)``
    (p as in ``_kmeans_plusplus``); per round (stopping early when every row
    sits on a candidate) ``rng.random(rows)`` per block in row order (equal to
    one ``rng.random(n)``); then, with more than k distinct candidates,
    ``_kmeans_plusplus`` on the candidates weighted by ``_candidate_weights``;
    with fewer, a top-up of ``rng.choice(..., replace=False)`` over the rows
    not yet chosen, rows away from every candidate first (weights ignored).
    """
    n = len(X)
    w = sample_weight
    ell = oversampling * k
    first = int(rng.choice(n, p=None if w is None else w / w.sum()))
    chosen = [first]
    closest = np.empty(n)
    for s in _blocks(n):
        closest[s] = _closest_sq_dist(X[s], X[[first]])[0]
    for r in range(rounds):
        phi = float(closest.sum() if w is None else w @ closest)
        if phi <= 0:
            log.debug("k-means||: every row is a candidate after %d rounds", r)
            break
        picked = []
        for s in _blocks(n):
            u = rng.random(s.stop - s.start)
            ws = None if w is None else w[s]
            picked.append(s.start + _kmeans_parallel_round(closest[s], u, phi, ell, ws))
        new = np.concatenate(picked)
        if len(new):
            new_rows = X[new]
            for s in _blocks(n):
                np.minimum(closest[s], _closest_sq_dist(X[s], new_rows)[0], out=closest[s])
            chosen.extend(int(i) for i in new)
    distinct: dict[bytes, int] = {}
    for i in chosen:
        distinct.setdefault(_row_key(X[i]), i)
    cand = np.fromiter(distinct.values(), dtype=np.int64)
    log.debug("k-means||: %d distinct candidates for k=%d", len(cand), k)
    if len(cand) > k:
        rows = X[cand]
        cw = np.zeros(len(cand))
        for s in _blocks(n):
            cw += _candidate_weights(X[s], rows, None if w is None else w[s])
        return cand[_kmeans_plusplus(rows, k, rng, cw)]
    if len(cand) < k:
        rest = np.setdiff1d(np.arange(n), cand)
        away = rest[closest[rest] > 0]
        near = np.setdiff1d(rest, away)
        need = k - len(cand)
        top = rng.choice(away, min(need, len(away)), replace=False)
        if len(top) < need:
            top = np.concatenate([top, rng.choice(near, need - len(top), replace=False)])
        cand = np.concatenate([cand, top])
    return cand


# -------------------------------------------------------------------- public
#: Every initialisation by name; the streams 0-3 are the list positions of the first four,
#: which fixed the seeds of every stored result.
REGISTRY: dict[str, InitMethod] = {
    m.name: m
    for m in (
        InitMethod("random", n_init_auto=10, stream=0, rows=None),
        InitMethod("data", n_init_auto=10, stream=1, rows=_data_rows),
        InitMethod("k-means++", n_init_auto=1, stream=2, rows=_kmeans_plusplus),
        InitMethod("k-means||", n_init_auto=1, stream=3, rows=_kmeans_parallel),
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
    if pick is None:  # random: Gaussian draws from the per-pixel statistics
        return random_from_stats(*_data_stats(X, w), k, seed)
    idx = pick(X, k, np.random.default_rng(seed), w)
    return _f64(X[idx])  # fancy indexing copies, so X is never aliased
