"""faiss, the peer k-means the benchmarks time beside scikit-learn (when faiss-cpu is installed).

faiss has no tolerance: a fit runs exactly ``niter`` iterations. Without
subsampling (``max_points_per_centroid`` = N // k + 1) every row takes part in
every iteration — the same work as a Lloyd iteration of scikit-learn or
kmclust; faiss's default trains on at most 256 random rows per centroid (less
work, another result). An empty cluster is refilled by splitting a large one
(scikit-learn and kmclust relocate it to far points instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.common import Meter, metered

#: faiss without subsampling (every row in every iteration), and with its default sampling
FAISS = "faiss"
FAISS_SUB = "faiss (default: samples 256 rows per centroid)"


def faiss_module():
    """The faiss module, or None when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_kmeans(xf: np.ndarray, c: np.ndarray, niter: int, subsample: bool = False):
    """``faiss.Kmeans`` trained on float32 rows ``xf`` from centroids ``c``, ``niter`` iterations.

    ``subsample``: faiss's default, at most 256 rows per centroid drawn at random;
    otherwise every row takes part in every iteration.
    """
    n, d = xf.shape
    k = c.shape[0]
    limit = {} if subsample else {"max_points_per_centroid": n // k + 1}
    km = faiss_module().Kmeans(d, k, niter=niter, seed=0, verbose=False, **limit)
    km.train(xf, init_centroids=np.ascontiguousarray(c, dtype=np.float32))
    return km


@dataclass(frozen=True)
class FaissFit:
    """One faiss run as the grid compares it: final centroids, labels and faiss's own J."""

    centroids: np.ndarray  # (k, d) float32, after the last update
    labels: np.ndarray  # each training row's nearest final centroid, by faiss's search
    inertia: float  # Σ of faiss's squared distances to those centroids (float64 accumulation)
    n_iter: int  # iterations run: the niter it was given
    n_split: int  # empty clusters refilled by splitting a large one, over all iterations


def faiss_fit_predict(xf: np.ndarray, xt: np.ndarray, c: np.ndarray, niter: int) -> FaissFit:
    """One run as the sweep makes it: fit from ``c`` (all rows), label the rows, then ``xt``."""
    km = faiss_kmeans(xf, c, niter)
    dist, labels = km.assign(xf)
    km.assign(xt)
    return FaissFit(
        centroids=km.centroids,
        labels=labels.astype(np.int64),
        inertia=float(np.sum(dist, dtype=np.float64)),
        n_iter=niter,
        n_split=int(sum(s["nsplit"] for s in km.iteration_stats)),
    )


def faiss_loop(
    xf: np.ndarray, xt: np.ndarray, inits: Sequence[np.ndarray], n_iters: Sequence[int]
) -> tuple[Meter, list[FaissFit]]:
    """A loop of faiss runs, run ``i`` from ``inits[i]`` for ``n_iters[i]`` iterations, metered."""
    with metered() as meter:
        fits = [faiss_fit_predict(xf, xt, c, it) for c, it in zip(inits, n_iters)]
    return meter, fits
