"""Sparse input: kmclust.lloyd.sparse and KMeans on CSR/CSC matrices and arrays and on dask
arrays of sparse chunks, against scikit-learn's KMeans from the same initial centroids, a
float64 brute force and exact Fraction sums."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans as SkKMeans
from sklearn.feature_extraction.text import TfidfVectorizer

from kmclust import KMeans
from kmclust.errors import KmclustError
from kmclust.estimator import starts
from kmclust.lloyd import sparse, sparse_sums

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


# ------------------------------------------------------------------ exact sums
def test_level_sums_are_exact_and_the_same_for_any_split() -> None:
    """Each value is the exact sum of its levels; level sums of any split join to one value
    within 1e-15 of the correctly rounded sum (math.fsum)."""
    from fractions import Fraction

    rng = np.random.default_rng(5)
    v = rng.lognormal(-3, 3, size=5000) * rng.choice([-1.0, 1.0], size=5000)
    g = sparse_sums.grid(v.size, float(np.abs(v).max()))
    lv = sparse_sums.levels(v, g)
    for i in rng.choice(v.size, 50, replace=False):
        back = sum(
            Fraction(float(q[i])) * Fraction(2) ** (g.top - (j + 1) * g.bits)
            for j, q in enumerate(lv)
        )
        assert back == Fraction(float(v[i]))
    joined = []
    for cuts in ([], [1], [7, 2500, 4999], list(range(100, 5000, 100))):
        pieces = np.split(v, cuts)
        total = [np.array([q.sum()]) for q in sparse_sums.levels(pieces[0], g)]
        for p in pieces[1:]:
            total = sparse_sums.add(total, [np.array([q.sum()]) for q in sparse_sums.levels(p, g)])
        joined.append(sparse_sums.join(total, g)[0])
    assert len(set(joined)) == 1
    assert joined[0] == pytest.approx(math.fsum(v), rel=1e-15)


# ------------------------------------------------------------ dask sparse chunks
def _as_dask(x: sp.csr_matrix, how: str, rows: int) -> da.Array:
    if how == "from_array":
        return da.from_array(x, chunks=(rows, -1), asarray=False)
    if how == "map_blocks":  # dense dask array, each chunk made CSR
        return da.from_array(x.toarray(), chunks=(rows, -1)).map_blocks(sp.csr_matrix)
    import sparse as pydata_sparse  # pydata sparse COO chunks

    return da.from_array(x.toarray(), chunks=(rows, -1)).map_blocks(pydata_sparse.COO)


@pytest.mark.parametrize(
    ("how", "rows"), [("from_array", 97), ("from_array", 400), ("map_blocks", 250), ("pydata", 300)]
)
def test_dask_sparse_chunks_fit_as_scikit_learn_and_as_in_memory(tfidf, how, rows) -> None:
    init = tfidf[np.random.default_rng(6).choice(tfidf.shape[0], 8, replace=False)].toarray()
    sk = SkKMeans(8, init=init, n_init=1, tol=0).fit(tfidf.toarray())
    mem = KMeans(8, init=init, tol=0).fit(tfidf)
    with dask.config.set(scheduler="threads"):
        x = _as_dask(tfidf, how, rows)
        km = KMeans(8, init=init, tol=0).fit(x)
        np.testing.assert_array_equal(km.labels_, sk.labels_)
        assert km.n_iter_ == sk.n_iter_
        assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
        np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-12)
        # exact sums: the same bits as the in-memory fit, whatever the chunking
        np.testing.assert_array_equal(km.cluster_centers_, mem.cluster_centers_)
        assert km.inertia_ == mem.inertia_
        q = _as_dask(tfidf[::-1][:300].tocsr(), how, 128)
        qd = tfidf[::-1][:300].toarray()
        np.testing.assert_array_equal(km.predict(q), sk.predict(qd))
        t = km.transform(q)
        assert isinstance(t, da.Array)
        # float64 brute force (scikit-learn's expansion gives 1.5e-8 for a row on a centre)
        ref = np.sqrt([((qd - c) ** 2).sum(axis=1) for c in km.cluster_centers_]).T
        np.testing.assert_allclose(t.compute(), ref, rtol=1e-12, atol=1e-15)
        assert km.score(q) == pytest.approx(sk.score(qd), rel=1e-12)


def test_weighted_dask_sparse_fit_matches_scikit_learn(tfidf) -> None:
    w = np.random.default_rng(7).uniform(0.1, 3.0, size=tfidf.shape[0])
    init = tfidf[20:26].toarray()
    sk = SkKMeans(6, init=init, n_init=1, tol=1e-4).fit(tfidf.toarray(), sample_weight=w)
    with dask.config.set(scheduler="threads"):
        x = da.from_array(tfidf, chunks=(150, -1), asarray=False)
        km = KMeans(6, init=init, tol=1e-4).fit(x, sample_weight=w)
        np.testing.assert_array_equal(km.labels_, sk.labels_)
        assert km.n_iter_ == sk.n_iter_
        assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
        assert km.score(x, sample_weight=w) == pytest.approx(
            sk.score(tfidf.toarray(), sample_weight=w), rel=1e-12
        )


def test_dask_sparse_inits_come_from_a_sample_of_rows(tfidf, monkeypatch) -> None:
    """Named and callable inits on sparse chunks see a uniform sample of X's rows (sparse)."""
    monkeypatch.setattr(starts, "INIT_MAX_BYTES", 100 * tfidf.shape[1] * 8)
    seen = []

    def init(rows, k, random_state):
        seen.append(rows)
        return rows[:k].toarray()

    with dask.config.set(scheduler="threads"):
        x = da.from_array(tfidf, chunks=(200, -1), asarray=False)
        KMeans(4, init=init, n_init=1, max_iter=2).fit(x)
        km = KMeans(4, init="k-means++", random_state=0, max_iter=2).fit(x)
    (rows,) = seen
    assert sp.issparse(rows) and rows.shape == (100, tfidf.shape[1])
    dense = {r.tobytes() for r in tfidf.toarray()}
    assert all(r.tobytes() in dense for r in rows.toarray())
    assert km.cluster_centers_.shape == (4, tfidf.shape[1]) and np.isfinite(km.inertia_)


def test_nan_in_a_dask_sparse_chunk_is_one_error(tfidf) -> None:
    bad = tfidf.copy()
    bad.data[-1] = np.nan
    with dask.config.set(scheduler="threads"):
        x = da.from_array(bad, chunks=(300, -1), asarray=False)
        with pytest.raises(KmclustError, match="NaN or infinity"):
            KMeans(3, init=tfidf[:3].toarray()).fit(x)
        km = KMeans(3, init=tfidf[:3].toarray(), max_iter=2).fit(tfidf)
        with pytest.raises(KmclustError, match="NaN or infinity"):
            km.predict(x)


@pytest.mark.slow
def test_dask_sparse_fit_on_a_local_cluster_of_processes(tfidf) -> None:
    from distributed import Client, LocalCluster

    init = tfidf[np.random.default_rng(8).choice(tfidf.shape[0], 8, replace=False)].toarray()
    sk = SkKMeans(8, init=init, n_init=1, tol=0).fit(tfidf.toarray())
    mem = KMeans(8, init=init, tol=0).fit(tfidf)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        x = da.from_array(tfidf, chunks=(250, -1), asarray=False)
        km = KMeans(8, init=init, tol=0).fit(x)
        labels = km.predict(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
    np.testing.assert_array_equal(km.cluster_centers_, mem.cluster_centers_)
    np.testing.assert_array_equal(labels, sk.labels_)


def test_empty_cluster_relocation_across_chunks_matches_scikit_learn(tfidf) -> None:
    """Two centres far from every row: both empty at the first pass, given the rows farthest
    from their centres, which lie in different chunks."""
    init = tfidf[:8].toarray()
    init[6:] = 5.0
    sk = SkKMeans(8, init=init, n_init=1, tol=0).fit(tfidf.toarray())
    with dask.config.set(scheduler="threads"):
        km = KMeans(8, init=init, tol=0).fit(da.from_array(tfidf, chunks=(64, -1), asarray=False))
    assert km.n_relocated_ >= 2
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
