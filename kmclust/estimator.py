"""scikit-learn compatible ``KMeans`` on the batched Dask Lloyd engine.

The estimator is a thin public boundary: it validates parameters and data
(every user error is a :class:`KMeansError`, both a ``ValueError`` as
scikit-learn expects and a :class:`~kmclust.errors.KmclustError` for the CLI),
draws the initial centroids with :mod:`kmclust.lloyd.init`, runs all ``n_init``
initialisations as ONE :func:`kmclust.lloyd.driver.lloyd` batch and keeps the run
with the lowest inertia. It works in the input's own units (no rescaling).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings

import dask.array as da
import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    ClusterMixin,
    TransformerMixin,
)
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from kmclust.errors import KmclustError
from kmclust.lloyd import driver
from kmclust.lloyd.init import INITS, REGISTRY, data_stats, init_centroids, random_from_stats

log = logging.getLogger(__name__)

#: dtypes kept as they are; anything else numeric is converted to float64.
_DTYPES = (np.float64, np.float32, np.uint8)
#: ``n_init="auto"``: one run for the seedings that spread centroids, ten otherwise.
#: A dask array up to this size is computed on the driver for validation and
#: initialisation (exactly as numpy input); a larger one is checked lazily and
#: initialised from its mean/std (random) or a random sample of this many bytes of rows.
INIT_MAX_BYTES = 256 * 2**20
_SEED_MAX = 2**31 - 1


class KMeansError(KmclustError, ValueError):
    """Bad parameter or input for :class:`KMeans`, or no initialisation could be fitted."""


class KMeans(ClassNamePrefixFeaturesOutMixin, TransformerMixin, ClusterMixin, BaseEstimator):
    """k-means (Lloyd) on numpy or dask arrays; every ``n_init`` run advances in one Dask batch.

    Parameters
    ----------
    n_clusters : int, default 8
        Number of clusters k (1 <= k <= n_samples).
    init : {"k-means++", "k-means||", "random", "data"} or array (n_clusters, n_features)
        ``random``: Gaussian draws with each feature's mean and standard deviation
        (NOT scikit-learn's "random", which picks rows: that is ``data`` here,
        k distinct rows drawn uniformly). ``k-means++`` greedy as scikit-learn,
        ``k-means||`` as Bahmani et al. 2012. See :mod:`kmclust.lloyd.init`.
    n_init : int or "auto", default 1
        Initialisations, all run in one engine batch; the lowest inertia wins.
        ``"auto"`` means 1 for k-means++, k-means|| and an array, 10 for random
        and data (scikit-learn's rule, with ``data`` counted like its ``random``).
        An explicit array always runs once (a warning if ``n_init > 1``).
    max_iter : int, default 100
        Most Lloyd iterations per run.
    tol : float, default 1e-6
        A run has converged when every centroid moved at most ``tol`` (L2, in the
        data's units) in the last iteration, or when no label changed. This is
        NOT scikit-learn's tol (a bound on the squared Frobenius norm of all
        moves relative to the data's mean variance). ``tol=0`` stops exactly
        when the centroids stop changing, like scikit-learn's ``tol=0``.
    random_state : int, RandomState or None
        One seed per initialisation is derived as
        ``check_random_state(random_state).randint(2**31 - 1, size=n_init)``;
        init ``i`` is ``kmclust.lloyd.init.init_centroids(X, k, init, seeds[i])``.
        For a large dask array a further ``randint(2**31 - 1)`` seeds the row sample.

    Attributes
    ----------
    cluster_centers_ : (n_clusters, n_features) float64 (also for float32 / uint8 input)
    labels_ : (n_samples,) int32
    inertia_ : float, sum of squared distances to the closest centroid (scikit-learn's meaning)
    n_iter_ : int, Lloyd iterations of the kept run
    n_relocated_ : int, empty clusters moved to the farthest points in the kept run
    jclust_ : float, mean squared distance (inertia_ / n_samples)
    mean_distance_ : float, mean (unsquared) distance
    converged_ : bool, whether the kept run met ``tol`` before ``max_iter``
    n_features_in_, feature_names_in_ : as scikit-learn

    Notes
    -----
    - Input dtypes float64, float32 and uint8 are kept (float64 is computed in
      float64, the others in float32 with float64 sums); other numbers become float64.
    - Sample weights are not supported: ``fit`` has no ``sample_weight``
      parameter, so scikit-learn meta-estimators (``has_fit_parameter``) see that.
    - Empty clusters are relocated to the points farthest from their centroids
      (scikit-learn's policy) and counted in ``n_relocated_``; a k above the
      number of distinct points is a ``ValueError`` (scikit-learn only warns).
    - Dask input: up to ``INIT_MAX_BYTES`` the array is computed once on the
      driver to validate it and draw the inits exactly as for numpy; larger
      arrays are checked for NaN/inf in one dask pass, ``random`` uses dask
      mean/std, the other inits run on a uniform random sample of rows
      (``INIT_MAX_BYTES`` of them, at least k). The engine always runs on the
      dask array itself (its chunks, its scheduler). ``transform`` of a dask
      array returns a lazy dask array.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        n_init: int | str = 1,
        max_iter: int = 100,
        tol: float = 1e-6,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None) -> KMeans:
        """Fit k-means to X (numpy-like or dask (n_samples, n_features)); y is ignored."""
        k, init, n_init, max_iter, tol = self._check_params()
        x, xn = self._check_X(X, reset=True)
        n, d = x.shape
        if k > n:
            raise KMeansError(f"n_samples={n} should be >= n_clusters={k}.")
        if not isinstance(init, str) and init.shape != (k, d):
            raise KMeansError(
                f"init array has shape {init.shape}; expected (n_clusters, n_features) = ({k}, {d})"
            )
        rs = check_random_state(self.random_state)
        seeds = [int(s) for s in rs.randint(_SEED_MAX, size=n_init)]
        inits = _initial_centroids(x, xn, init, k, seeds, rs)
        results = driver.lloyd(x, inits, tol=tol, max_iter=max_iter, return_labels=True)
        ok = [r for r in results if r.ok]
        if not ok:
            raise KMeansError(results[0].error)
        if len(ok) < len(results):
            log.warning(
                "%d of %d initialisations failed: %s",
                len(results) - len(ok),
                len(results),
                next(r.error for r in results if not r.ok),
            )
        best = min(ok, key=lambda r: r.jclust)  # first of equals: deterministic
        self.cluster_centers_ = best.centroids
        self.labels_ = best.labels
        self.inertia_ = float(best.jclust * n)
        self.n_iter_ = best.n_iter
        self.n_relocated_ = best.n_relocated
        self.jclust_ = float(best.jclust)
        self.mean_distance_ = float(best.mean_distance)
        self.converged_ = bool(best.converged)
        return self

    # ------------------------------------------------------ fitted methods
    def predict(self, X) -> np.ndarray:
        """Index (int32) of the closest centroid of each row."""
        check_is_fitted(self)
        x, _ = self._check_X(X, reset=False)
        ((labels, _, _),) = driver.predict(x, [self.cluster_centers_])
        return labels

    def transform(self, X):
        """Euclidean distances (n_samples, n_clusters) to every centroid; lazy for dask input."""
        check_is_fitted(self)
        if isinstance(X, da.Array):
            x = self._check_dask_lazy(X, reset=False)
            block = functools.partial(_distances, centers=self.cluster_centers_)
            k = self.cluster_centers_.shape[0]
            return x.map_blocks(block, dtype=np.float64, chunks=(x.chunks[0], (k,)))
        return _distances(self._check_numpy(X, reset=False), self.cluster_centers_)

    def score(self, X, y=None) -> float:
        """Negative sum of squared distances of X to its closest centroids (-inertia)."""
        check_is_fitted(self)
        x, _ = self._check_X(X, reset=False)
        ((_, jclust, _),) = driver.predict(x, [self.cluster_centers_])
        return -float(jclust * x.shape[0])

    @property
    def _n_features_out(self) -> int:
        """Number of transform outputs (for get_feature_names_out)."""
        return self.cluster_centers_.shape[0]

    # ---------------------------------------------------------- validation
    def _check_params(self) -> tuple[int, str | np.ndarray, int, int, float]:
        """Validated (n_clusters, init name or float64 array, n_init, max_iter, tol)."""
        k = _positive_int("n_clusters", self.n_clusters)
        max_iter = _positive_int("max_iter", self.max_iter)
        tol = self.tol
        if (
            isinstance(tol, bool)
            or not isinstance(tol, numbers.Real)
            or not math.isfinite(tol)
            or tol < 0
        ):
            raise KMeansError(f"tol must be a finite number >= 0; got {tol!r}")
        init = self.init
        if isinstance(init, str):
            if init not in INITS:
                raise KMeansError(
                    f"init must be one of {', '.join(map(repr, INITS))} or an array of shape "
                    f"(n_clusters, n_features); got {init!r}"
                )
        else:
            try:
                init = check_array(init, dtype=np.float64, copy=True, input_name="init")
            except ValueError as e:
                raise KMeansError(f"init array: {e}") from e
        if isinstance(self.n_init, str) and self.n_init == "auto":
            n_init = REGISTRY[init].n_init_auto if isinstance(init, str) else 1
        else:
            n_init = _positive_int("n_init", self.n_init, "or 'auto'")
        if not isinstance(init, str) and n_init != 1:
            warnings.warn(
                f"an explicit init array runs once; n_init={n_init} is ignored",
                RuntimeWarning,
                stacklevel=3,
            )
            n_init = 1
        return k, init, n_init, max_iter, float(tol)

    def _check_X(self, X, *, reset: bool) -> tuple[np.ndarray | da.Array, np.ndarray | None]:
        """(X for the engine, the same data as numpy or None when X is a large dask array)."""
        if not isinstance(X, da.Array):
            xn = self._check_numpy(X, reset=reset)
            return xn, xn
        x = self._check_dask_lazy(X, reset=reset)
        if x.nbytes <= INIT_MAX_BYTES:
            return x, self._check_numpy(np.asarray(x.compute()), reset=reset)
        if x.dtype.kind == "f" and not bool(da.isfinite(x).all().compute()):
            raise KMeansError("Input X contains NaN or infinity.")
        return x, None

    def _check_numpy(self, X, *, reset: bool) -> np.ndarray:
        """scikit-learn's checks (2-D, finite, n_features, feature names); dtype as documented."""
        try:
            return validate_data(self, X, reset=reset, dtype=_DTYPES)
        except KmclustError:
            raise
        except ValueError as e:
            raise KMeansError(str(e)) from e

    def _check_dask_lazy(self, X: da.Array, *, reset: bool) -> da.Array:
        """Shape, dtype and n_features of a dask array, without computing it."""
        if X.ndim != 2:
            raise KMeansError(f"Expected a 2-D dask array (n_samples, n_features); got {X.ndim}-D")
        if any(math.isnan(s) for s in X.shape):
            raise KMeansError(
                "X is a dask array of unknown chunk sizes; call X.compute_chunk_sizes() first"
            )
        if X.dtype.kind not in "biuf":
            raise KMeansError(f"X must hold real numbers; got dtype {X.dtype}")
        n, d = X.shape
        if n < 1 or d < 1:
            raise KMeansError(f"X must have at least 1 sample and 1 feature; got shape {X.shape}")
        if reset:
            self.n_features_in_ = d
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif d != self.n_features_in_:
            raise KMeansError(
                f"X has {d} features, but {type(self).__name__} is expecting {self.n_features_in_} "
                "features as input."
            )
        return X if X.dtype in _DTYPES else X.astype(np.float64)


# ---------------------------------------------------------------- helpers
def _positive_int(name: str, value, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise KMeansError(
            f"{name} must be an integer >= 1{' ' + extra if extra else ''}; got {value!r}"
        )
    return int(value)


def _distances(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Euclidean distances of rows to centers (float64); raises on NaN/inf rows."""
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise KMeansError("Input X contains NaN or infinity.")
    return euclidean_distances(block.astype(np.float64, copy=False), centers)


def _initial_centroids(
    x: np.ndarray | da.Array,
    xn: np.ndarray | None,
    init: str | np.ndarray,
    k: int,
    seeds: list[int],
    rs: np.random.RandomState,
) -> list[np.ndarray]:
    """One (k, D) float64 array per seed (trusts validated inputs)."""
    if not isinstance(init, str):
        return [init]
    if init == "random":
        mean, std = data_stats(xn) if xn is not None else _dask_stats(x)
        return [random_from_stats(mean, std, k, s) for s in seeds]
    rows = xn if xn is not None else _dask_sample(x, k, int(rs.randint(_SEED_MAX)))
    return [init_centroids(rows, k, init, s) for s in seeds]


def _dask_stats(x: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (ddof=0) of a dask array, two-pass float64."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = da.sqrt(((x64 - mean) ** 2).mean(axis=0))
    return tuple(np.asarray(a) for a in da.compute(mean, std))


def _dask_sample(x: da.Array, k: int, seed: int) -> np.ndarray:
    """A uniform random sample (without replacement, in row order) of INIT_MAX_BYTES of rows."""
    n, d = x.shape
    m = min(n, max(k, INIT_MAX_BYTES // (d * x.dtype.itemsize)))
    idx = np.sort(np.random.default_rng(seed).choice(n, m, replace=False))
    log.info("initialising from a sample of %d of %d rows", m, n)
    return np.asarray(x[idx].compute())
