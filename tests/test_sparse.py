"""Sparse input: kmclust.lloyd.sparse and KMeans on CSR/CSC matrices and arrays, against
scikit-learn's KMeans from the same initial centroids and a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans as SkKMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from kmclust import KMeans
from kmclust.lloyd import sparse

CONTAINERS = [sp.csr_matrix, sp.csc_matrix, sp.csr_array, sp.csc_array]


def _docs() -> list[str]:
    """Real text shipped with installed packages: every function docstring of numpy and scipy."""
    import inspect

    import numpy
    import scipy.linalg
    import scipy.sparse
    import scipy.stats

    out = []
    for mod in (numpy, scipy.linalg, scipy.sparse, scipy.stats):
        for name in dir(mod):
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc and len(doc) > 200:
                out.append(doc)
    return out


@pytest.fixture(scope="module")
def tfidf() -> sp.csr_matrix:
    return TfidfVectorizer(min_df=2).fit_transform(_docs())


def _brute(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, k) squared distances summed directly in float64."""
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)


def test_nearest_is_the_exact_nearest_centroid_even_at_ties() -> None:
    """Centroid pairs x_i + u, x_i + v with ±2^-12 entries: exact ties at row i, which the
    expansion's rounding breaks either way (about a third wrongly without the settling)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) * 10 + 1e3
    x[:, :4][x[:, :4] < 1e3] = 0
    d = 2.0**-12
    c = np.empty((200, 12))
    c[0::2] = x[:100] + rng.choice([-d, d], size=(100, 12))
    c[1::2] = x[:100] + rng.choice([-d, d], size=(100, 12))
    ref = _brute(x, c)
    i = np.arange(100)
    assert (ref[i, 2 * i] == ref[i, 2 * i + 1]).all()  # the ties are exact
    labels, d2 = sparse.nearest(sp.csr_matrix(x), c)
    np.testing.assert_array_equal(labels, ref.argmin(axis=1))  # first of equals
    np.testing.assert_allclose(d2, ref.min(axis=1), rtol=1e-6)
    got = sparse.sq_dists_to(sp.csr_matrix(x), c, labels)
    np.testing.assert_allclose(got, ref[np.arange(300), labels], rtol=1e-6)


@pytest.mark.parametrize("container", CONTAINERS)
def test_fit_matches_scikit_learn_from_the_same_init(tfidf, container) -> None:
    x = container(tfidf)
    init = tfidf[np.random.default_rng(1).choice(tfidf.shape[0], 8, replace=False)].toarray()
    sk = SkKMeans(8, init=init, n_init=1, tol=0, max_iter=300).fit(x)
    km = KMeans(8, init=init, tol=0, max_iter=300).fit(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.n_iter_ == sk.n_iter_
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-12)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-10)
    q = tfidf[::-1][:200]
    np.testing.assert_array_equal(km.predict(q), sk.predict(q))
    np.testing.assert_array_equal(km.predict(q.toarray()), sk.predict(q))
    np.testing.assert_allclose(km.transform(q), sk.transform(q), rtol=1e-9, atol=1e-9)
    assert km.score(q) == pytest.approx(sk.score(q), rel=1e-9)


def test_weighted_sparse_fit_matches_scikit_learn(tfidf) -> None:
    w = np.random.default_rng(2).uniform(0.1, 3.0, size=tfidf.shape[0])
    init = tfidf[:6].toarray()
    sk = SkKMeans(6, init=init, n_init=1, tol=0).fit(tfidf, sample_weight=w)
    km = KMeans(6, init=init, tol=0).fit(tfidf, sample_weight=w)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-12)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-10)
    assert km.score(tfidf, sample_weight=w) == pytest.approx(
        sk.score(tfidf, sample_weight=w), rel=1e-10
    )


def test_float32_sparse_gives_float32_centres_and_the_float64_fit(tfidf) -> None:
    init = tfidf[10:15].toarray()
    a = KMeans(5, init=init, tol=0).fit(tfidf.astype(np.float32))
    b = SkKMeans(5, init=init, n_init=1, tol=0).fit(tfidf.astype(np.float32).astype(np.float64))
    assert a.cluster_centers_.dtype == np.float32
    np.testing.assert_array_equal(a.labels_, b.labels_)


def test_sparse_and_dense_draw_the_same_named_inits() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 7))
    x[x < 0.4] = 0
    for init in ("k-means++", "k-means||", "data"):
        a = KMeans(5, init=init, random_state=4, max_iter=1).fit(x)
        b = KMeans(5, init=init, random_state=4, max_iter=1).fit(sp.csr_matrix(x))
        np.testing.assert_array_equal(a.labels_, b.labels_)
        np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.array([1.0, -1.0, 1.0]), np.array([1.0, np.nan, 1.0]), [1, 1]])
def test_bad_sample_weight_is_one_error(bad) -> None:
    x = sp.csr_matrix(np.eye(3))
    with pytest.raises(ValueError, match="sample_weight|Sample weights|NaN"):
        KMeans(2, random_state=0).fit(x, sample_weight=bad)
