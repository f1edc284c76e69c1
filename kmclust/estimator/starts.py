"""Initial centroids for the estimator: named inits on numpy, sparse or dask rows, callables
and arrays. Named inits are :mod:`kmclust.lloyd.init`'s, drawn from per-init seeds."""

from __future__ import annotations

import logging
from collections.abc import Callable

import dask.array as da
import numpy as np
import scipy.sparse as sp

from kmclust.estimator.checks import KMeansError, check_centers
from kmclust.lloyd import sparse, sparse_dask
from kmclust.lloyd.init import (
    REGISTRY,
    InitError,
    data_stats,
    init_centroids,
    random_from_stats,
)

log = logging.getLogger("kmclust.estimator")

#: A dask array up to this size is computed on the driver for validation and
#: initialisation (exactly as numpy input); a larger one is checked lazily and
#: initialised from its mean/std (random) or a random sample of this many bytes of rows.
INIT_MAX_BYTES = 256 * 2**20
SEED_MAX = 2**31 - 1


def initial_centroids(
    x,
    xn,
    init: str | np.ndarray | Callable,
    k: int,
    n_init: int,
    rs: np.random.RandomState,
    w: np.ndarray | None,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """``n_init`` (k, D) float64 starts (one for an array).

    ``x`` is what the engine runs on, ``xn`` the same rows in memory (numpy or CSR) or
    None for a large dask array or one of sparse chunks; ``w`` weights the named inits
    (None: unweighted); ``moments`` are sparse X's per-feature (mean, variance).
    Seeds: ``rs.randint(2**31 - 1, size=n_init)``, then (large dask, not random) one more
    for the row sample; a callable gets ``rs`` itself, as in scikit-learn.
    """
    d = x.shape[1]
    if isinstance(init, np.ndarray):  # from check_init
        return [check_centers(init, k, d, checked=True)]
    if callable(init):
        rows = xn if xn is not None else _dask_sample(x, k, int(rs.randint(SEED_MAX)), None)[0]
        return [check_centers(init(rows, k, rs), k, d) for _ in range(n_init)]
    seeds = [int(s) for s in rs.randint(SEED_MAX, size=n_init)]
    try:
        if init == "random":
            if moments is not None:
                mean, std = moments[0], np.sqrt(moments[1])
            else:
                mean, std = data_stats(xn, w) if xn is not None else _dask_stats(x, w)
            return [random_from_stats(mean, std, k, s) for s in seeds]
        if xn is None:
            xn, w = _dask_sample(x, k, int(rs.randint(SEED_MAX)), w)
        if sp.issparse(xn):
            rows = sparse.DenseRows(sparse.as_rows(xn))
            return [_pick(rows, k, init, s, w) for s in seeds]
        return [init_centroids(xn, k, init, s, sample_weight=w) for s in seeds]
    except InitError as e:
        raise KMeansError(str(e)) from e


def _pick(rows: sparse.DenseRows, k: int, init: str, seed: int, w) -> np.ndarray:
    """``init_centroids`` on sparse rows: the same draws as on the same rows stored densely."""
    if w is not None and np.count_nonzero(w) < k:
        raise KMeansError(f"k={k} exceeds the {np.count_nonzero(w)} rows with positive weight")
    idx = REGISTRY[init].rows(rows, k, np.random.default_rng(seed), w)
    return rows[np.asarray(idx)]


def _dask_stats(x: da.Array, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (weighted) mean and std (ddof=0) of a dask array, two-pass float64."""
    x64 = x.astype(np.float64)
    if w is None:
        mean = x64.mean(axis=0)
        std = da.sqrt(((x64 - mean) ** 2).mean(axis=0))
    else:
        wd = da.from_array(w, chunks=(x.chunks[0],))[:, None]
        mean = (x64 * wd).sum(axis=0) / w.sum()
        std = da.sqrt((((x64 - mean) ** 2) * wd).sum(axis=0) / w.sum())
    return tuple(np.asarray(a) for a in da.compute(mean, std))


def _dask_sample(x: da.Array, k: int, seed: int, w: np.ndarray | None):
    """A uniform random sample (without replacement, in row order) of INIT_MAX_BYTES of rows
    (sparse chunks: as float64 rows stored densely; the sample stays sparse), and the
    sample's weights."""
    n, d = x.shape
    is_sparse = sparse_dask.is_sparse(x)
    m = min(n, max(k, INIT_MAX_BYTES // (d * (8 if is_sparse else x.dtype.itemsize))))
    idx = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    log.info("initialising from a sample of %d of %d rows", m, n)
    rows = x[idx].compute()
    rows = sparse_dask.as_csr(rows) if is_sparse else np.asarray(rows)
    return rows, None if w is None else w[idx]
