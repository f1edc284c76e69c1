"""Runs spread over workers that each hold the rows: the deal, the size rule, the same bits."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from kmclust.lloyd import driver, spread


@pytest.mark.parametrize(
    "ks, keys, n",
    [
        ([5, 5, 9, 9, 20, 20, 7, 7], [0, 0, 1, 1, 2, 2, 3, 3], 2),  # 4 keys ≥ 2: kept together
        ([5, 6, 7, 8, 9, 10] * 10, [5, 6, 7, 8, 9, 10] * 10, 8),  # 6 keys < 8: runs alone
        ([3], [0], 8),
        (list(range(5, 21)) * 20, list(range(5, 21)) * 20, 8),  # the default study's shape
    ],
)
def test_deal_covers_every_run_once_and_balances_the_cost(ks, keys, n) -> None:
    batches = spread.deal(ks, keys, n)
    assert sorted(i for b in batches for i in b) == list(range(len(ks)))
    assert 1 <= len(batches) <= n and all(batches)
    whole = len(set(keys)) >= n
    if whole:  # a key's runs in one batch
        assert all(
            len({keys[i] for i in b} & {keys[j] for j in c}) == 0
            for b in batches
            for c in batches
            if b is not c
        )
    units: dict = {}
    for i, key in enumerate(keys):
        units.setdefault(key if whole else i, []).append(i)
    largest = max(sum(ks[i] for i in u) for u in units.values())
    costs = [sum(ks[i] for i in b) for b in batches]
    # greedy list scheduling: no batch exceeds the mean load by more than one unit
    assert max(costs) <= sum(ks) / len(batches) + largest


@pytest.fixture(scope="module")
def cluster_client():
    """A LocalCluster of two worker processes with a 400 MB memory limit each; not the default
    client, so the references here are computed without any cluster."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit="400MB",
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_rows_are_copied_only_within_the_share_of_each_workers_memory(cluster_client) -> None:
    limit = 400e6 * spread.MEMORY_SHARE
    assert spread.fits_every_worker(cluster_client, int(limit))
    assert not spread.fits_every_worker(cluster_client, int(limit) + 1)
    with dask.config.set({spread.COPY_BYTES_KEY: "1 MiB"}):
        assert spread.fits_every_worker(cluster_client, 2**20)
        assert not spread.fits_every_worker(cluster_client, 2**20 + 1)
    with dask.config.set({spread.COPY_BYTES_KEY: 0}):
        assert not spread.fits_every_worker(cluster_client, 1)


def test_batches_on_workers_give_the_threaded_engines_bits(cluster_client) -> None:
    """Each run as the whole batch computes it in this process (threaded scheduler, one batch),
    its held-out labels as :func:`driver.predict`'s; a run that cannot proceed fails alone."""
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (900, 24), dtype=np.uint8)
    rows[:60] = rows[0]  # a pile of equal rows: ties for the exact labels to settle
    test = rng.integers(0, 256, (300, 24), dtype=np.uint8)
    scale = 1 / 255
    inits = [rows[rng.choice(900, k, replace=False)] * scale for k in (2, 3, 5, 8, 13, 21)]
    inits.append(np.repeat(rows[:1] * scale, 4, axis=0))  # 4 equal centroids: relocations
    few = np.repeat(rows[[0, 100]], 50, axis=0)  # 2 distinct rows: k=3 cannot proceed there
    kw = dict(tol=1e-6, max_iter=50, scale=scale, return_labels=True, integer=True)
    with dask.config.set(scheduler="threads"):
        want = driver.lloyd(rows, inits, **kw)
        labels = driver.predict(test, [r.centroids for r in want], scale=scale, errors=False)
    x = cluster_client.persist(da.from_array(rows, chunks=(300, -1)))
    held = cluster_client.persist(da.from_array(test, chunks=(150, -1)))
    batches = spread.deal([len(c) for c in inits], list(range(len(inits))), 4)
    got: dict[int, tuple] = {}
    for members, outcome in spread.fit_batches(cluster_client, x, held, inits, batches, **kw):
        assert not isinstance(outcome, BaseException), outcome
        for i, res, lab in zip(members, *outcome, strict=True):
            got[i] = (res, lab)
    assert sorted(got) == list(range(len(inits)))
    for i, ref in enumerate(want):
        res, lab = got[i]
        assert res.n_iter == ref.n_iter and res.jclust == ref.jclust, i
        assert res.mean_distance == ref.mean_distance and res.n_relocated == ref.n_relocated
        np.testing.assert_array_equal(res.centroids, ref.centroids)
        np.testing.assert_array_equal(res.labels, ref.labels)
        np.testing.assert_array_equal(res.history, ref.history)
        np.testing.assert_array_equal(lab, labels[i][0])
    assert any(r.n_relocated for r in want)  # the relocation path was taken
    xf = cluster_client.persist(da.from_array(few, chunks=(50, -1)))
    ((members, (fits, tests)),) = spread.fit_batches(
        cluster_client, xf, held, [few[:3] * scale, few[49:51] * scale], [[0, 1]], **kw
    )
    assert members == [0, 1] and not fits[0].ok and fits[1].ok, fits
    assert tests[0] is None and tests[1].shape == (300,)


def test_a_failing_batch_is_reported_and_the_others_complete(cluster_client) -> None:
    rows = np.random.default_rng(0).integers(0, 256, (200, 8), dtype=np.uint8)
    x = cluster_client.persist(da.from_array(rows, chunks=(100, -1)))
    inits = [rows[:3] / 255, "x", rows[5:9] / 255]  # the second raises in its task
    out = dict(
        (tuple(m), o)
        for m, o in spread.fit_batches(
            cluster_client, x, None, inits, [[0], [1], [2]], scale=1 / 255, return_labels=True
        )
    )
    assert isinstance(out[(1,)], ValueError) and "could not convert" in str(out[(1,)])
    for key in ((0,), (2,)):
        fits, tests = out[key]
        assert fits[0].ok and tests == [None]
