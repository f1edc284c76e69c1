"""uint8 rows against wide stacks (a GEMM of converted blocks, not the compiled pixel kernel):
the same results as scikit-learn from the same centroids, relocations included, whatever the
chunking."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from kmclust.lloyd import chunk
from kmclust.lloyd.driver import lloyd


@pytest.mark.parametrize("k", [70, 130])
def test_wide_uint8_stacks_match_scikit_learn_with_relocations(k: int) -> None:
    assert k >= chunk.WIDE_STACK
    rng = np.random.default_rng(k)
    # digits with noise: no two rows, no two distances alike (exact ties break by index here,
    # by rounding in scikit-learn)
    x = np.clip(load_digits().data * 15 + rng.integers(0, 16, (1797, 64)), 0, 255).astype(np.uint8)
    init = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    init[k - 6 :] = init[0]  # duplicates: empty clusters, relocated to the farthest rows
    got = [
        lloyd(da.from_array(x, chunks=(rows, 64)), [init], tol=0, max_iter=60, return_labels=True)[
            0
        ]
        for rows in (1797, 600, 257)
    ]
    assert got[0].n_relocated > 0
    for r in got[1:]:
        np.testing.assert_array_equal(r.centroids, got[0].centroids)
        np.testing.assert_array_equal(r.labels, got[0].labels)
        assert (r.n_iter, r.n_relocated, r.jclust, r.history) == (
            got[0].n_iter,
            got[0].n_relocated,
            got[0].jclust,
            got[0].history,
        )
    sk = KMeans(k, init=init, n_init=1, max_iter=60, tol=0, algorithm="lloyd").fit(
        x.astype(np.float64)
    )
    np.testing.assert_array_equal(got[0].labels, sk.labels_)
    np.testing.assert_allclose(got[0].centroids, sk.cluster_centers_, rtol=0, atol=1e-9)
