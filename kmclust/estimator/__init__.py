"""scikit-learn compatible ``KMeans`` on the batched Dask Lloyd engine.

The estimator is a thin public boundary: it validates parameters and data
(every user error is a :class:`KMeansError`, both a ``ValueError`` as
scikit-learn expects and a :class:`~kmclust.errors.KmclustError` for the CLI),
draws the initial centroids (:mod:`kmclust.estimator.starts`), runs all
``n_init`` initialisations as ONE :func:`kmclust.lloyd.driver.lloyd` batch
(sparse input: :mod:`kmclust.lloyd.sparse_fit`, in memory or over the sparse
chunks of a dask array) and keeps the run with the lowest inertia. It works in
the input's own units (no rescaling).
"""

from __future__ import annotations

import functools
import logging
import warnings

import dask.array as da
import numpy as np
import scipy.sparse as sp
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
)
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from kmclust.estimator import checks, data
from kmclust.estimator.checks import KMeansError
from kmclust.estimator.starts import INIT_MAX_BYTES, initial_centroids
from kmclust.lloyd import driver, sparse, sparse_dask, sparse_fit
from kmclust.lloyd.init import REGISTRY

__all__ = ["INIT_MAX_BYTES", "KMeans", "KMeansError"]
log = logging.getLogger(__name__)


class KMeans(
    data.DataChecks, ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator
):
    """k-means (Lloyd) on numpy, scipy.sparse or dask arrays; scikit-learn's ``KMeans`` API.

    Parameters (scikit-learn's names and defaults)
    ----------
    n_clusters : int, default 8
    init : {"k-means++", "k-means||", "random", "data"}, callable or array (n_clusters, n_features)
        ``random``: Gaussian draws with each feature's mean and standard deviation
        (NOT scikit-learn's "random", which picks rows: that is ``data`` here,
        k distinct rows drawn uniformly). ``k-means++`` greedy as scikit-learn,
        ``k-means||`` as Bahmani et al. 2012. A callable is called as
        ``init(X, n_clusters, random_state)`` once per initialisation.
    n_init : int or "auto", default "auto"
        ``"auto"``: 1 for k-means++, k-means|| and an array, 10 for random, data and a
        callable. All runs advance in one engine batch; the lowest inertia wins.
    max_iter : int, default 300
    tol : float, default 1e-4
        scikit-learn's rule: converged when Σ‖Δc‖² (squared Frobenius norm of all
        centre moves) ≤ tol × the mean per-feature variance of X, or when no label
        changed. (The sweep keeps the study's own rule; see :mod:`kmclust.lloyd.stopping`.)
    verbose : int, default 0
        Prints scikit-learn's lines ("Initialization complete", "Iteration i, inertia J.",
        "Converged at iteration i: ...").
    random_state : int, RandomState or None
        Seeds ``check_random_state(random_state).randint(2**31 - 1, size=n_init)``;
        init ``i`` is ``kmclust.lloyd.init.init_centroids(X, k, init, seeds[i])``.
    copy_x : bool, default True
        Accepted for scikit-learn compatibility; X is never modified either way.
    algorithm : {"lloyd", "elkan"}, default "lloyd"
        Both give the same exact fit (labels are the exact nearest centroid).
        ``"lloyd"``: the engine's ``prune=False`` (one GEMM over every row each pass).
        ``"elkan"``: ``prune=True``: on integer data (uint8) rows are skipped by
        bounds — Hamerly's per run, Elkan's lower bound per (row, centroid) for a single
        run or runs of many centroids; float data have no bounds. Sparse input: one kernel.

    Attributes
    ----------
    cluster_centers_ : (n_clusters, n_features), float32 for float32 input, else float64
    labels_ : (n_samples,) int32
    inertia_ : float, Σ w ‖x − c_label‖² (scikit-learn's meaning)
    n_iter_, n_relocated_, converged_, jclust_ (inertia_/n), mean_distance_
    n_features_in_, feature_names_in_ : as scikit-learn

    Notes
    -----
    - Sums are float64 (exact) for every input dtype; distances are computed in float32 on
      the engine for uint8, float32 and float64 data whose range allows it (else float64),
      with near ties settled against the float64 centroids: labels are the exact nearest.
    - ``sample_weight``: all-equal weights fit exactly as no weights (inertia scaled).
    - Empty clusters are relocated to the points farthest from their centroids
      (scikit-learn's policy). Fewer distinct points than clusters: a
      ``ConvergenceWarning``, as scikit-learn.
    - Sparse input (CSR/CSC matrices and arrays) is fitted in memory; a dask array with
      scipy.sparse (or pydata ``sparse``) chunks chunk by chunk where the chunks live
      (:mod:`kmclust.lloyd.sparse_dask`), to the same bits as in memory. Its inits: ``random``
      from exact per-feature moments, the others on a uniform sample of rows (all rows
      when they would fit ``INIT_MAX_BYTES`` stored densely), as for large dask arrays.
    - Dask input: up to ``INIT_MAX_BYTES`` the array is computed once on the
      driver to validate it and draw the inits exactly as for numpy; larger
      arrays are checked for NaN/inf in one dask pass, ``random`` uses dask
      mean/std, the other inits run on a uniform random sample of rows. The
      engine always runs on the dask array itself. ``transform`` of a dask
      array returns a lazy dask array.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init="k-means++",
        n_init: int | str = "auto",
        max_iter: int = 300,
        tol: float = 1e-4,
        verbose: int = 0,
        random_state: int | np.random.RandomState | None = None,
        copy_x: bool = True,
        algorithm: str = "lloyd",
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.verbose = verbose
        self.random_state = random_state
        self.copy_x = copy_x
        self.algorithm = algorithm

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None) -> KMeans:
        """Fit k-means to X (numpy-like, scipy.sparse or dask (n_samples, n_features))."""
        k, init, n_init, max_iter, tol = self._check_params()
        x, xn = self._check_X(X, reset=True)
        n, d = x.shape
        if k > n:
            raise KMeansError(f"n_samples={n} should be >= n_clusters={k}.")
        algorithm = checks.check_algorithm(self.algorithm, k)
        w = checks.check_weight(sample_weight, x)
        even = checks.uniform(w)
        rs = check_random_state(self.random_state)
        say = print if self.verbose else None
        if sp.issparse(x) or sparse_dask.is_sparse(x):
            rows = _sparse_rows(x, w)
            moments = sparse_fit.mean_var(rows) if tol or _is(init, "random") else None
            tol_abs = float(np.mean(moments[1]) * tol) if tol else 0.0
            wi = None if even else w
            inits = initial_centroids(x, xn, init, k, n_init, rs, wi, moments)
            fits = [self._memory(rows, c, tol_abs, max_iter, say) for c in inits]
        else:
            tol_abs = checks.tolerance(xn if xn is not None else x, tol)
            inits = initial_centroids(x, xn, init, k, n_init, rs, None if even else w)
            fits = self._engine(x, xn, inits, w, even, tol_abs, max_iter, algorithm, say)
        best = min(fits, key=lambda f: f.inertia)  # first of equals: deterministic
        self._n_init = len(inits)
        self.cluster_centers_ = best.centers.astype(self._out_dtype, copy=False)
        self.labels_ = best.labels
        self.inertia_ = float(best.inertia)
        self.n_iter_ = best.n_iter
        self.n_relocated_ = best.n_relocated
        self.jclust_ = self.inertia_ / n
        self.mean_distance_ = float(best.mean_distance)
        self.converged_ = bool(best.converged)
        checks.warn_distinct(self.labels_, k)
        return self

    def fit_predict(self, X, y=None, sample_weight=None) -> np.ndarray:
        """Fit and return ``labels_``."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit and return the distances of X to the centroids."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def _memory(self, rows, c, tol_abs, max_iter, say) -> sparse_fit.Fit:
        """One run over row blocks (sparse rows, or dense rows the engine refused)."""
        if say:
            say("Initialization complete")
        return sparse_fit.fit(rows, c, tol=tol_abs, max_iter=max_iter, log=say)

    def _engine(self, x, xn, inits, w, even, tol_abs, max_iter, algorithm, say):
        """All runs as one engine batch; runs it refuses (k above the distinct points) are
        redone in memory, where scikit-learn's relocation applies."""
        kw = {} if even else {"sample_weight": w}  # the engine's weighted path
        results = driver.lloyd(
            x,
            inits,
            tol=tol_abs,
            max_iter=max_iter,
            return_labels=True,
            prune=algorithm == "elkan",
            rule="sklearn",
            **kw,
        )
        # J is divided by Σw (N unweighted); all-equal weights scale the inertia
        total = x.shape[0] * (1.0 if w is None else float(w[0])) if even else float(w.sum())
        fits, failed = [], []
        for c, r in zip(inits, results):
            if r.ok:
                if say:
                    _replay(say, r, total, tol_abs)
                fits.append(_as_fit(r, total))
            elif "distinct" in r.error and xn is not None:
                rows = sparse_fit.MemoryRows(xn, w)
                fits.append(self._memory(rows, c, tol_abs, max_iter, say))
            else:
                failed.append(r.error)
        if not fits:
            raise KMeansError(results[0].error)
        if failed:
            log.warning("%d of %d initialisations failed: %s", len(failed), len(results), failed[0])
        return fits

    # ------------------------------------------------------ fitted methods
    def predict(self, X) -> np.ndarray:
        """Index (int32) of the closest centroid of each row."""
        check_is_fitted(self)
        x, _ = self._check_X(X, reset=False)
        if sp.issparse(x) or sparse_dask.is_sparse(x):
            return _sparse_predict(x, self._centers64(), None)[0]
        ((labels, _, _),) = driver.predict(x, [self._centers64()])
        return labels

    def transform(self, X):
        """Euclidean distances (n_samples, n_clusters) to every centroid; lazy for dask input."""
        check_is_fitted(self)
        c = self._centers64()
        if isinstance(X, da.Array):
            x = self._check_dask_lazy(X, reset=False)
            if sparse_dask.is_sparse(x):
                return sparse_dask.distances(x, c)
            block = functools.partial(_distances, centers=c)
            k = c.shape[0]
            return x.map_blocks(block, dtype=np.float64, chunks=(x.chunks[0], (k,)))
        if sp.issparse(X):
            x, _ = self._check_X(X, reset=False)
            return sparse.distances(x, c)
        return _distances(self._check_numpy(X, reset=False), c)

    def score(self, X, y=None, sample_weight=None) -> float:
        """Negative (weighted) sum of squared distances of X to its closest centroids."""
        check_is_fitted(self)
        x, _ = self._check_X(X, reset=False)
        w = checks.check_weight(sample_weight, x)
        if sp.issparse(x) or sparse_dask.is_sparse(x):
            return -_sparse_predict(x, self._centers64(), w)[1]
        ((labels, jclust, _),) = driver.predict(x, [self._centers64()], errors=w is None)
        if w is None:
            return -float(jclust * x.shape[0])
        xn = x.compute() if isinstance(x, da.Array) else x
        return -float(w @ sparse.sq_dists_to(sparse.as_rows(xn), self._centers64(), labels))

    def _init_centroids(
        self,
        X,
        x_squared_norms,
        init,
        random_state,
        sample_weight,
        init_size=None,
        n_centroids=None,
    ) -> np.ndarray:
        """scikit-learn's private hook: one set of initial centroids for X (weighted draws)."""
        k = self.n_clusters if n_centroids is None else n_centroids
        xn = sparse.as_rows(X) if sp.issparse(X) else np.asarray(X)
        w = None if checks.uniform(sample_weight) else np.asarray(sample_weight, float)
        rs = check_random_state(random_state)
        return initial_centroids(xn, xn, checks.check_init(init), k, 1, rs, w)[0]

    def __sklearn_tags__(self):
        """scikit-learn's tags, with sparse input accepted."""
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    @property
    def _n_features_out(self) -> int:
        """Number of transform outputs (for get_feature_names_out)."""
        return self.cluster_centers_.shape[0]

    def _centers64(self) -> np.ndarray:
        return np.asarray(self.cluster_centers_, dtype=np.float64)

    # ---------------------------------------------------------- validation
    def _check_params(self):
        """Validated (n_clusters, init, n_init, max_iter, tol)."""
        k = checks.positive_int("n_clusters", self.n_clusters)
        max_iter = checks.positive_int("max_iter", self.max_iter)
        tol = checks.check_tol(self.tol)
        init = checks.check_init(self.init)
        if isinstance(self.n_init, str) and self.n_init == "auto":
            if isinstance(init, str):
                n_init = REGISTRY[init].n_init_auto
            else:
                n_init = 10 if callable(init) else 1
        else:
            n_init = checks.positive_int("n_init", self.n_init, "or 'auto'")
        if isinstance(init, np.ndarray) and n_init != 1:
            warnings.warn(
                "Explicit initial center position passed: performing only one init in "
                f"{type(self).__name__} instead of n_init={n_init}.",
                RuntimeWarning,
                stacklevel=3,
            )
            n_init = 1
        return k, init, n_init, max_iter, tol


# ---------------------------------------------------------------- helpers
def _sparse_rows(x, w: np.ndarray | None) -> sparse_fit.Rows:
    """Sparse rows in blocks: in memory, or the persisted chunks of a dask array."""
    if sp.issparse(x):
        return sparse_fit.MemoryRows(x, w)
    try:
        return sparse_dask.DaskRows(x, w)
    except ValueError as e:  # a chunk with NaN/inf
        raise KMeansError(str(e)) from e


def _sparse_predict(x, c: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Labels and Σ w ‖x − c_label‖² of sparse rows (in memory or dask chunks)."""
    if sp.issparse(x):
        return sparse_fit.predict(sparse_fit.MemoryRows(x, w), c)
    try:
        return sparse_dask.predict(x, c, w)
    except ValueError as e:
        raise KMeansError(str(e)) from e


def _as_fit(r, weight: float) -> sparse_fit.Fit:
    """An engine result as the estimator's fit (inertia = J · n · the common weight)."""
    return sparse_fit.Fit(
        centers=r.centroids,
        labels=r.labels,
        inertia=float(r.jclust * weight),
        n_iter=r.n_iter,
        converged=r.converged,
        n_relocated=r.n_relocated,
        mean_distance=r.mean_distance,
    )


def _replay(say, r, weight: float, tol: float) -> None:
    """scikit-learn's verbose lines for one finished engine run."""
    say("Initialization complete")
    for i, j in enumerate(r.history):
        say(f"Iteration {i}, inertia {j * weight}.")
    if r.converged:
        i = r.n_iter - 1
        if r.shift == 0:
            say(f"Converged at iteration {i}: strict convergence.")
        else:
            say(f"Converged at iteration {i}: center shift {r.shift} within tolerance {tol}.")


def _distances(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Euclidean distances of rows to centers (float64); raises on NaN/inf rows."""
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise KMeansError("Input X contains NaN or infinity.")
    return euclidean_distances(block.astype(np.float64, copy=False), centers)


def _is(init, name: str) -> bool:
    return isinstance(init, str) and init == name
