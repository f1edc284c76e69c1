"""D² sampling initialisers, k-means++ and k-means||, on float64 row blocks.

Both return row indices of X and consume the generator exactly as their
docstrings say (see :func:`kmclust.lloyd.init.init_centroids`). Distance work
is done in float64, ``BLOCK_ROWS`` rows at a time, so a uint8 store is never
copied whole to float64; distances that the GEMM expansion may have cancelled
are summed directly, so a row equal to a centre is at distance exactly 0.

The per-block helpers of k-means|| (:func:`closest_sq_dist`,
:func:`parallel_round`, :func:`candidate_weights`) are pure functions of a
block of rows so a distributed caller can map them over dask chunks and sum or
concatenate the results on the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)

#: rows per float64 block of distance work (4096 x 784 x 8 B ~ 25 MB)
BLOCK_ROWS = 4096
#: expansion distances below this share of |x|^2 + |c|^2 are summed directly
_EXACT_REL = 1e-6
#: k-means|| defaults (Bahmani et al. 2012; Spark MLlib uses 2 rounds, the paper 5)
_PARALLEL_ROUNDS = 5
_OVERSAMPLING = 2.0  # l = 2 k


# ----------------------------------------------------------- float64 helpers
def blocks(n: int) -> Iterator[slice]:
    """Row slices of ``BLOCK_ROWS`` (read at call time, so tests can vary it)."""
    rows = BLOCK_ROWS
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared row norms of X in float64 (blockwise)."""
    out = np.empty(len(X))
    for s in blocks(len(X)):
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
    for s in blocks(len(X)):
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


def row_key(row: np.ndarray) -> bytes:
    """The bytes that identify a row's values (-0.0 and 0.0 alike): distinct rows, distinct keys."""
    # + 0 maps -0.0 to 0.0 for floats; integer rows are unchanged
    return (row + row.dtype.type(0)).tobytes()


# ---------------------------------------------------------------- k-means++
def kmeans_plusplus(
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
def closest_sq_dist(block: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def parallel_round(
    closest_sq: np.ndarray,
    uniforms: np.ndarray,
    phi: float,
    ell: float,
    weight: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of one block picked in a k-means|| round (indices into the block).

    Pure per-block function: row x is picked when
    ``u(x) < min(1, ell * w(x) * d^2(x) / phi)``, with ``d^2`` the squared
    distance to the nearest centre so far (``closest_sq_dist``), ``phi`` the
    data set's total ``sum w d^2`` and ``u`` the row's uniform draw. The
    uniforms are an input so that results do not depend on how rows are cut
    into blocks: ``init_centroids`` draws them from one stream in row order.
    """
    mass = closest_sq if weight is None else weight * closest_sq
    prob = np.minimum(1.0, ell * mass / phi)
    return np.flatnonzero(uniforms < prob)


def candidate_weights(
    block: np.ndarray, candidates: np.ndarray, weight: np.ndarray | None = None
) -> np.ndarray:
    """Per candidate, the (weighted) number of rows of ``block`` closest to it.

    Pure per-block function; the weights of the whole data set are the sum
    over blocks.
    """
    nearest = closest_sq_dist(block, candidates)[1]
    return np.bincount(nearest, weights=weight, minlength=len(candidates)).astype(np.float64)


def kmeans_parallel(
    X: np.ndarray,
    k: int,
    rng: np.random.Generator,
    sample_weight: np.ndarray | None = None,
    rounds: int = _PARALLEL_ROUNDS,
    oversampling: float = _OVERSAMPLING,
) -> np.ndarray:
    """k-means|| (Bahmani et al. 2012, as Spark MLlib); returns k row indices.

    Trusts its inputs. Seed use, in order: first centre ``rng.choice(n, p=p)``
    (p as in ``kmeans_plusplus``); per round (stopping early when every row
    sits on a candidate) ``rng.random(rows)`` per block in row order (equal to
    one ``rng.random(n)``); then, with more than k distinct candidates,
    ``kmeans_plusplus`` on the candidates weighted by ``candidate_weights``;
    with fewer, a top-up of ``rng.choice(..., replace=False)`` over the rows
    not yet chosen (of positive weight, if weighted), rows away from every
    candidate first (uniformly, not by weight).
    """
    n = len(X)
    w = sample_weight
    ell = oversampling * k
    first = int(rng.choice(n, p=None if w is None else w / w.sum()))
    chosen = [first]
    closest = np.empty(n)
    for s in blocks(n):
        closest[s] = closest_sq_dist(X[s], X[[first]])[0]
    for r in range(rounds):
        phi = float(closest.sum() if w is None else w @ closest)
        if phi <= 0:
            log.debug("k-means||: every row is a candidate after %d rounds", r)
            break
        picked = []
        for s in blocks(n):
            u = rng.random(s.stop - s.start)
            ws = None if w is None else w[s]
            picked.append(s.start + parallel_round(closest[s], u, phi, ell, ws))
        new = np.concatenate(picked)
        if len(new):
            new_rows = X[new]
            for s in blocks(n):
                np.minimum(closest[s], closest_sq_dist(X[s], new_rows)[0], out=closest[s])
            chosen.extend(int(i) for i in new)
    distinct: dict[bytes, int] = {}
    for i in chosen:
        distinct.setdefault(row_key(X[i]), i)
    cand = np.fromiter(distinct.values(), dtype=np.int64)
    log.debug("k-means||: %d distinct candidates for k=%d", len(cand), k)
    if len(cand) > k:
        rows = X[cand]
        cw = np.zeros(len(cand))
        for s in blocks(n):
            cw += candidate_weights(X[s], rows, None if w is None else w[s])
        return cand[kmeans_plusplus(rows, k, rng, cw)]
    if len(cand) < k:
        rest = np.setdiff1d(np.arange(n), cand)
        if w is not None:
            rest = rest[w[rest] > 0]  # rows of weight 0 are as if dropped
        away = rest[closest[rest] > 0]
        near = np.setdiff1d(rest, away)
        need = k - len(cand)
        top = rng.choice(away, min(need, len(away)), replace=False)
        if len(top) < need:
            top = np.concatenate([top, rng.choice(near, need - len(top), replace=False)])
        cand = np.concatenate([cand, top])
    return cand
