"""Input checks of :class:`kmclust.estimator.KMeans`: numpy, scipy.sparse and dask arrays.

scikit-learn's checks (2-D, finite, n_features, feature names) on numpy and sparse input;
a dask array is checked lazily when it is larger than ``INIT_MAX_BYTES``, and a dask array
of sparse chunks always (its chunks are checked for NaN/inf where they live).
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import scipy.sparse as sp
from sklearn.utils.validation import validate_data

from kmclust.errors import KmclustError
from kmclust.estimator import starts
from kmclust.estimator.checks import KMeansError
from kmclust.lloyd import sparse, sparse_dask

#: dtypes kept as they are; anything else numeric is converted to float64.
DTYPES = (np.float64, np.float32, np.uint8)


class DataChecks:
    """Mixin: X as the fit and the fitted methods take it."""

    def _check_X(self, X, *, reset: bool):
        """(X for the fit, the same rows in memory (numpy or float64 CSR) or None when X is a
        large dask array or one of sparse chunks). ``reset`` also records the centres' dtype."""
        if sp.issparse(X):
            try:
                x = validate_data(
                    self, X, reset=reset, accept_sparse=["csr", "csc"], dtype=DTYPES[:2]
                )
            except KmclustError:
                raise
            except ValueError as e:
                raise KMeansError(str(e)) from e
            self._note_dtype(x.dtype, reset)
            rows = sparse.as_rows(x)
            return rows, rows
        if not isinstance(X, da.Array):
            xn = self._check_numpy(X, reset=reset)
            self._note_dtype(xn.dtype, reset)
            return xn, xn
        x = self._check_dask_lazy(X, reset=reset)
        self._note_dtype(x.dtype, reset)
        if sparse_dask.is_sparse(x):  # checked for NaN/inf chunk by chunk, where they live
            return x, None
        if x.nbytes <= starts.INIT_MAX_BYTES:
            return x, self._check_numpy(np.asarray(x.compute()), reset=reset)
        if x.dtype.kind == "f" and not bool(da.isfinite(x).all().compute()):
            raise KMeansError("Input X contains NaN or infinity.")
        return x, None

    def _note_dtype(self, dtype: np.dtype, reset: bool) -> None:
        if reset:
            self._out_dtype = np.dtype(np.float32 if dtype == np.float32 else np.float64)

    def _check_numpy(self, X, *, reset: bool) -> np.ndarray:
        """scikit-learn's checks (2-D, finite, n_features, feature names); dtype as documented."""
        try:
            return validate_data(self, X, reset=reset, dtype=DTYPES)
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
        return X if X.dtype in DTYPES else X.astype(np.float64)
