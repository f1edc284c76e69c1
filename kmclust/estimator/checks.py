"""Parameter, weight and shape checks of :class:`kmclust.estimator.KMeans`, with scikit-learn's
messages where a user of scikit-learn's ``KMeans`` would match on them."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import _check_sample_weight, check_array

from kmclust.errors import KmclustError
from kmclust.lloyd.init import INITS

#: the ``algorithm`` values; both reach the same exact fixed point (see KMeans)
ALGORITHMS = ("lloyd", "elkan")


class KMeansError(KmclustError, ValueError):
    """Bad parameter or input for :class:`KMeans`, or no initialisation could be fitted."""


def positive_int(name: str, value, extra: str = "") -> int:
    """``value`` as an int >= 1, or a KMeansError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise KMeansError(
            f"{name} must be an integer >= 1{' ' + extra if extra else ''}; got {value!r}"
        )
    return int(value)


def check_tol(tol) -> float:
    """``tol`` as a finite float >= 0."""
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not math.isfinite(tol)
        or tol < 0
    ):
        raise KMeansError(f"tol must be a finite number >= 0; got {tol!r}")
    return float(tol)


def check_algorithm(algorithm, k: int) -> str:
    """``algorithm`` checked; "elkan" with one cluster warns and runs "lloyd" (scikit-learn)."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise KMeansError(f"algorithm must be 'lloyd' or 'elkan'; got {algorithm!r}")
    if algorithm == "elkan" and k == 1:
        warnings.warn(
            "algorithm='elkan' doesn't make sense for a single cluster. Using 'lloyd' instead.",
            RuntimeWarning,
            stacklevel=4,
        )
        return "lloyd"
    return algorithm


def check_init(init) -> str | np.ndarray | Callable:
    """A named init, a callable ``init(X, n_clusters, random_state)`` or a float64 array."""
    if isinstance(init, str):
        if init not in INITS:
            raise KMeansError(
                f"init must be one of {', '.join(map(repr, INITS))}, a callable or an array of "
                f"shape (n_clusters, n_features); got {init!r}"
            )
        return str(init)  # np.str_ → str
    if callable(init):
        return init
    try:
        return check_array(init, dtype=np.float64, copy=True, input_name="init")
    except ValueError as e:
        raise KMeansError(f"init array: {e}") from e


def check_centers(centers, k: int, d: int, checked: bool = False) -> np.ndarray:
    """Initial centres (k, d) as float64, with scikit-learn's shape messages; ``checked``: an
    array :func:`check_init` returned (validated and copied: only the shape is left to check)."""
    c = centers
    if not checked:
        try:
            c = check_array(centers, dtype=np.float64, copy=True, input_name="init")
        except ValueError as e:
            raise KMeansError(f"init array: {e}") from e
    if c.shape[0] != k:
        raise KMeansError(
            f"The shape of the initial centers {c.shape} does not match the number of clusters {k}."
        )
    if c.shape[1] != d:
        raise KMeansError(
            f"The shape of the initial centers {c.shape} does not match the number of "
            f"features of the data {d}."
        )
    return c


def check_weight(sample_weight, x) -> np.ndarray | None:
    """Validated float64 weights (finite, >= 0, right length, positive sum) or None."""
    if sample_weight is None:
        return None
    try:
        w = _check_sample_weight(sample_weight, np.empty((x.shape[0], 0)), dtype=np.float64)
    except ValueError as e:
        raise KMeansError(str(e)) from e
    if not np.isfinite(w).all() or (w < 0).any():
        raise KMeansError("sample_weight must be finite and non-negative")
    if w.sum() <= 0:
        raise KMeansError("sample_weight must have a positive sum")
    return w


def uniform(w: np.ndarray | None) -> bool:
    """Whether weights are absent or all equal (the fit is then exactly unweighted)."""
    return w is None or bool(np.all(w == w[0]))


def tolerance(x, tol: float) -> float:
    """scikit-learn's absolute tolerance: ``tol`` times the mean per-feature variance of X
    (dense X; sparse X: from :func:`kmclust.lloyd.sparse_fit.mean_var`)."""
    if tol == 0:
        return 0.0
    if isinstance(x, da.Array):
        var = np.asarray(x.astype(np.float64).var(axis=0).compute())
    else:
        var = _variances(x)
    return float(np.mean(var) * tol)


#: Rows at a time in :func:`_variances`: a block's float64 deviations stay small (8 MiB at 512
#: features) where ``np.var`` makes an (N, D) float64 temporary.
VAR_ROWS = 2048


def _variances(x: np.ndarray) -> np.ndarray:
    """Per-feature variance (ddof=0) in float64 as ``np.var``'s two passes (mean, then the
    squared deviations), one block of rows at a time."""
    n = x.shape[0]
    mean = np.sum(x, axis=0, dtype=np.float64) / n
    ss = np.zeros(x.shape[1])
    for lo in range(0, n, VAR_ROWS):
        dev = x[lo : lo + VAR_ROWS] - mean
        ss += np.einsum("ij,ij->j", dev, dev)
    return ss / n


def warn_distinct(labels: np.ndarray, k: int) -> None:
    """scikit-learn's ConvergenceWarning when fewer than k clusters hold points."""
    distinct = int(np.count_nonzero(np.bincount(labels, minlength=k)))
    if distinct < k:
        warnings.warn(
            f"Number of distinct clusters ({distinct}) found smaller than n_clusters ({k}). "
            "Possibly due to duplicate points in X.",
            ConvergenceWarning,
            stacklevel=3,
        )
