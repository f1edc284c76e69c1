"""Labels are the exact nearest centroid, whatever rows or centroids a GEMM saw (ties included)."""

from __future__ import annotations

import numpy as np
import pytest

from kmclust.lloyd import assign, nearest
from kmclust.lloyd import chunk as kernels
from kmclust.lloyd.bounds import moved_bounds, moved_centroid_bounds
from kmclust.lloyd.distance import error_bound, row_norms
from kmclust.lloyd.exact import exact_sum, label_counts


def _brute(x: np.ndarray, runs: list[np.ndarray]) -> np.ndarray:
    xi = x.astype(np.int64)
    out = []
    for c in runs:
        d = ((xi[:, None, :] - c.astype(np.int64)[None]) ** 2).sum(-1)  # exact integers
        out.append(d.argmin(axis=1))  # first minimum: ties to the lowest index
    return np.stack(out, axis=1)


def _problem(seed: int):
    """Rows whose two nearest centroids (0 and 1) differ in one pixel q by 2 grey levels."""
    rng = np.random.default_rng(seed)
    n, d = 300, 784
    runs, cols = [], []
    base = rng.integers(190, 225, d)  # bright: ‖x‖², x·c ~ 4e7, float32 spacing 4 there
    x = np.clip(base[None, :] + rng.integers(-30, 31, (n, d)), 0, 255).astype(np.int64)
    for r in range(3):
        k = 4 + r
        c = np.clip(base[None, :] + rng.integers(-30, 31, (k, d)), 0, 255)
        c[0] = base
        q = int(rng.integers(d))
        c[1] = base
        c[1, q] = base[q] + 2
        cols.append(q)
        runs.append(c.astype(np.float64))
    # in the first pixel of interest, put rows on, beside and across the tie (x[q] = base[q] + 1)
    for q in cols:
        x[:, q] = base[q] + 1 + rng.integers(-2, 3, n)
    return x.astype(np.uint8), runs


@pytest.mark.parametrize("seed", range(4))
def test_labels_are_exact_nearest_with_ties_to_lowest_index(seed: int) -> None:
    x, runs = _problem(seed)
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    ref = _brute(x, runs)
    assert np.mean(ref[:, 0] <= 1) > 0.5 and np.any(ref[:, 0] == 0) and np.any(ref[:, 0] == 1)
    labels, _ = kernels.assign(x.astype(np.float32), stack, offsets)
    np.testing.assert_array_equal(labels, ref)


def _thin_problem(seed: int, d: int = 3):
    """Float rows of a few large integer features whose two nearest centroids (0 and 1) are 0, 4
    or 8 apart in squared distance, or exactly tied: far below float32's rounding of ‖x‖² ~ 2e9."""
    rng = np.random.default_rng(seed)
    base = rng.integers(20_000, 30_000, d)
    x = base[None, :] + rng.integers(-30, 31, (400, d))
    runs = []
    for r in range(3):
        c = base[None, :] + rng.integers(-30, 31, (3 + 2 * r, d))
        c[0] = c[1] = base
        q = int(rng.integers(d))
        c[1, q] += 2
        x[: 200 + 50 * r, q] = base[q] + 1 + rng.integers(-2, 3, 200 + 50 * r)
        runs.append(c.astype(np.float64))
    return x.astype(np.float32), runs


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d", [3, 20], ids=["thin", "wide"])
def test_float_rows_without_bounds_get_exact_nearest_labels(monkeypatch, seed, d) -> None:
    """Float rows, no bounds wanted (the two least folded in across rows, :func:`assign.nearest`):
    distances computed on the way for ≤ THIN_DIM features, else by a transposed GEMM, never through
    chunk.products; the labels are the exact nearest (ties to the lowest index) as on the bounds
    path, for float32 rows and for float64 rows computed in float32, and the distances are within
    the error bound of the exact ones."""
    assert (d <= assign.THIN_DIM) == (d == 3)
    x, runs = _thin_problem(seed, d)
    stack64 = np.concatenate(runs)
    stack = stack64.astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    ref = _brute(x, runs)
    assert np.any(ref[:, 0] == 0) and np.any(ref[:, 0] == 1)  # both sides of the tie
    gemm, _ = kernels.assign(x, stack, offsets, bounds=True)[:2]

    def no_gemm(*args):
        raise AssertionError("rows without bounds went through chunk.products")

    monkeypatch.setattr(kernels, "products", no_gemm)
    labels, dmin = kernels.assign(x, stack, offsets)
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(gemm, ref)
    rows64, _ = kernels.assign(x.astype(np.float64), stack, offsets, c64=stack64)
    np.testing.assert_array_equal(rows64, ref)
    xi = x.astype(np.int64)
    for p, c in enumerate(runs):
        exact = ((xi - c.astype(np.int64)[ref[:, p]]) ** 2).sum(1)
        csq_max = float((c**2).sum(1).max())
        bound = error_bound(np.einsum("ij,ij->i", x, x), csq_max, x.shape[1], np.float32)
        assert np.all(np.abs(dmin[:, p] - exact) <= bound)


def test_settle_tie_takes_the_exact_nearest_within_the_limit() -> None:
    """The one near-tie rule of all three steps: of the centroids whose computed value is within the
    limit, the least float64 ‖x − c‖² wins, the lowest index among equals; the others never do."""
    x = np.array([10.0, 0.0, 0.0, 0.0])
    c64 = np.array([[10.0, 2, 0, 0], [10, 0, 1, 0], [10, 0, 0, 1], [10, 0, 0, 0], [9, 0, 0, 0]])
    buf = np.empty(4)  # exact squared distances: 4, 1, 1, 0, 1
    vals = np.array([0.0, 0.0, 0.0, 5.0, 0.0])  # the exact nearest (3) is outside the limit
    assert nearest.settle_tie(x, c64, vals, 0, 0, 5, 1.0, -1, buf) == 1  # 1, 2, 4 tie: lowest
    assert nearest.settle_tie(x, c64, vals, 0, 2, 5, 1.0, -1, buf) == 2  # only columns [lo, hi)
    vals[3] = 1.0
    assert nearest.settle_tie(x, c64, vals, 0, 0, 5, 1.0, -1, buf) == 3
    assert nearest.settle_tie(x, c64, vals[2:], 2, 2, 5, 1.0, -1, buf) == 3  # vals from column 2
    assert nearest.settle_tie(x, c64, np.full(5, 9.0), 0, 0, 5, 1.0, 7, buf) == 7  # none: ``arg``


@pytest.mark.parametrize("seed", range(4))
def test_labels_do_not_depend_on_rows_or_stack_seen(seed: int) -> None:
    """Whole chunk, a row subset, one run alone: the same labels (each GEMM rounds differently)."""
    x, runs = _problem(seed)
    xf = x.astype(np.float32)
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    whole, _ = kernels.assign(xf, stack, offsets)
    rows = np.random.default_rng(seed).permutation(x.shape[0])[:37]
    sub, _ = kernels.assign(np.ascontiguousarray(xf[rows]), stack, offsets)
    np.testing.assert_array_equal(sub, whole[rows])
    for p, c in enumerate(runs):
        alone, _ = kernels.assign(xf, c.astype(np.float32), np.array([0, c.shape[0]]))
        np.testing.assert_array_equal(alone[:, 0], whole[:, p])


@pytest.mark.parametrize("pixels", [False, True], ids=["float32-gemm", "uint8-kernel"])
def test_error_bound_covers_float32_gemm_error(pixels: bool) -> None:
    """The bound exceeds the measured error of float32 ‖c‖² − 2x·c against exact integers, from the
    GEMM of float32 rows and from the compiled kernel of uint8 rows (odd row and centroid counts, a
    row subset)."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (503, 784))
    c = rng.integers(0, 256, (41, 784))
    rows = np.sort(rng.choice(503, 301, replace=False))
    exact = (c * c).sum(1)[None, :] - 2 * x @ c.T
    xf, cf = x.astype(np.float32), c.astype(np.float32)
    if pixels:
        got = kernels.distances(x.astype(np.uint8), cf).astype(np.float64)
        sub = kernels.distances(x.astype(np.uint8), cf, rows).astype(np.float64)
        assert (
            np.abs(sub - exact[rows]).max() <= np.abs(got - exact).max()
        )  # the same rows, the same sums
    else:
        got = kernels.distances(xf, cf).astype(np.float64)
    err = np.abs(got - exact).max(axis=1)
    bound = error_bound(
        np.einsum("ij,ij->i", xf, xf),
        float((cf.astype(np.float64) ** 2).sum(1).max()),
        784,
        np.float32,
    )
    assert np.all(err <= bound)
    assert np.all(bound < 1e-3 * (x * x).sum(1))  # and is not vacuous


def test_pixel_kernel_matches_the_gemm_and_gives_the_same_labels() -> None:
    """uint8 rows (compiled kernel) and the same rows in float32 (OpenBLAS's GEMM) differ only by
    rounding; labels not at all; a row's distances are the same bits whichever rows come with it."""
    x, runs = _problem(0)
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    rows = np.arange(5, 293, 3)
    kernel, kernel_labels = kernels.distances(x, stack, rows), kernels.assign(x, stack, offsets)[0]
    xf = x.astype(np.float32)
    gemm, gemm_labels = kernels.distances(xf, stack, rows), kernels.assign(xf, stack, offsets)[0]
    assert kernel.shape == gemm.shape == (rows.size, stack.shape[0]) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel, gemm, rtol=0, atol=64.0)  # values ~4e7: float32 spacing 4
    assert not np.array_equal(kernel, gemm)  # two computations indeed
    np.testing.assert_array_equal(kernel_labels, gemm_labels)
    np.testing.assert_array_equal(kernel_labels, _brute(x, runs))
    for sub in (rows[::-1][:7], rows[1:2], np.sort(np.concatenate([rows[:20], [0, 299]]))):
        got = kernels.distances(x, stack, sub)
        np.testing.assert_array_equal(got, kernels.distances(x, stack)[sub])


def _reassign_case(seed: int) -> tuple:
    """A per-pair step's inputs on :func:`_problem`: 80 % of the pairs asked for, random labels."""
    x, runs = _problem(seed)
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    ref = _brute(x, runs)
    n, r = ref.shape
    rng = np.random.default_rng(seed)
    need = rng.random((n, r)) < 0.8
    wrong = np.stack([rng.integers(0, c.shape[0], n) for c in runs], axis=1).astype(np.int32)
    coef = 2.0 * error_bound(1.0, 0.0, x.shape[1], np.float32)
    return x, runs, stack, offsets, ref, row_norms(x, np.float32), coef, need, wrong


@pytest.mark.parametrize("seed", range(4))
def test_reassign_gives_exact_nearest_and_keeps_only_proven_labels(seed: int) -> None:
    """The compiled per-pair step: wrong labels without a lower bound are replaced by the exact
    nearest (near ties settled); right labels with a valid lower bound are kept and their upper
    bound tightened."""
    x, runs, stack, offsets, ref, xsq, coef, need, wrong = _reassign_case(seed)
    n, r = ref.shape
    labels, dmin, upper, lower = (
        wrong.copy(),
        np.zeros((n, r)),
        np.zeros((n, r)),
        np.zeros((n, r, 2)),
    )
    second = np.full((n, r), -1, dtype=np.int32)
    nearest.reassign(
        x, xsq, stack, offsets, np.arange(r), need, coef, labels, dmin, upper, lower, second
    )
    np.testing.assert_array_equal(labels[need], ref[need])
    np.testing.assert_array_equal(labels[~need], wrong[~need])  # pairs not asked for are left alone
    own, others = np.empty((n, r)), np.empty((n, r))
    for p, c in enumerate(runs):
        exact = ((x.astype(np.float64)[:, None] - c[None]) ** 2).sum(-1)  # (n, k), integers: exact
        own[:, p] = exact[np.arange(n), ref[:, p]]
        exact[np.arange(n), ref[:, p]] = np.inf
        others[:, p] = exact.min(axis=1)
    # computed squared distances: within one error bound of the exact ones (the slack covers it)
    err = coef / 2 * (xsq[:, None] + 2 * np.array([(c**2).sum(1).max() for c in runs])[None])
    assert np.all(np.abs(upper[need] ** 2 - own[need]) <= err[need])
    assert np.all(
        lower[need].min(-1) ** 2 <= others[need] + err[need]
    )  # below every other distance
    assert np.all(
        second[need] != labels[need]
    )  # after a settled near tie −1: both bounds cover every other


def test_reassign_keeps_proven_labels_and_tightens_their_upper_bound() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (400, 784)).astype(np.uint8)
    runs = [
        (x[rng.choice(400, k, replace=False)] + rng.normal(0, 3, (k, 784)))
        .astype(np.float32)
        .astype(np.float64)
        for k in (3, 7)
    ]
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.array([0, 3, 10])
    exact = [((x.astype(np.float64)[:, None] - c[None]) ** 2).sum(-1) for c in runs]
    ref = np.stack([e.argmin(1) for e in exact], axis=1)
    own = np.stack([e.min(1) for e in exact], axis=1)
    others = np.stack([np.sort(e, axis=1)[:, 1] for e in exact], axis=1)
    xsq = row_norms(x, np.float32)
    coef = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    window = coef * (xsq[:, None] + 2 * np.array([(c**2).sum(1).max() for c in runs])[None])
    # the distance to the assigned centroid is computed (off by at most window / 2): beyond 1.5
    # windows the lower bound clears it for sure
    proven = others - own > 1.5 * window
    assert 0.2 < proven.mean() < 1  # both kinds of pairs occur
    labels, upper = ref.astype(np.int32), np.full(ref.shape, np.inf)
    dmin, lower = np.zeros(ref.shape), np.repeat(np.sqrt(others)[..., None], 2, axis=-1)
    second = np.full(ref.shape, -1, dtype=np.int32)
    nearest.reassign(
        x,
        xsq,
        stack,
        offsets,
        np.arange(2),
        np.ones(ref.shape, bool),
        coef,
        labels,
        dmin,
        upper,
        lower,
        second,
    )
    np.testing.assert_array_equal(labels, ref)
    assert np.all(
        np.abs(upper**2 - own) <= window / 2
    )  # tightened: the computed distance, within the error bound
    assert np.all(
        lower[proven] == np.sqrt(others[proven])[:, None]
    )  # a kept pair's lower bounds are left alone
    kept = lower[..., 0] == np.sqrt(others)
    assert not kept.all() and np.all(
        lower[~kept].min(-1) < np.sqrt(others[~kept]) + 1
    )  # the others: recomputed


def test_reassign_names_the_runner_up_and_bounds_the_rest() -> None:
    """Recomputed pairs: label, runner-up (index), its and the third-nearest's computed distance."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (300, 784)).astype(np.uint8)
    runs = [
        rng.uniform(0, 255, (k, 784)).astype(np.float32).astype(np.float64) for k in (1, 2, 3, 9)
    ]
    stack = np.concatenate(runs).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in runs])])
    n, r = x.shape[0], len(runs)
    xsq = row_norms(x, np.float32)
    coef = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    labels, dmin, upper = (
        np.zeros((n, r), dtype=np.int32),
        np.zeros((n, r)),
        np.full((n, r), np.inf),
    )
    lower, second = np.zeros((n, r, 2)), np.full((n, r), -1, dtype=np.int32)
    nearest.reassign(
        x,
        xsq,
        stack,
        offsets,
        np.arange(r),
        np.ones((n, r), bool),
        coef,
        labels,
        dmin,
        upper,
        lower,
        second,
    )
    for p, c in enumerate(runs):
        exact = ((x.astype(np.float64)[:, None] - c[None]) ** 2).sum(-1)
        order = np.argsort(exact, axis=1, kind="stable")
        window = coef * (xsq.astype(np.float64) + 2 * (c**2).sum(1).max())
        np.testing.assert_array_equal(labels[:, p], order[:, 0])
        if c.shape[0] == 1:
            assert np.all(second[:, p] == -1) and np.all(lower[:, p] == np.inf)
            continue
        gap = exact[np.arange(n), order[:, 1]] - exact[np.arange(n), order[:, 0]]
        clear = gap > 2 * window  # no near tie: the runner-up is named
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(second[clear, p], order[clear, 1])
        assert np.all(
            np.abs(lower[clear, p, 0] ** 2 - exact[clear, order[clear, 1]]) <= window[clear] / 2
        )
        third = exact[np.arange(n), order[:, 2]] if c.shape[0] > 2 else np.full(n, np.inf)
        if c.shape[0] > 2:
            assert np.all(np.abs(lower[clear, p, 1] ** 2 - third[clear]) <= window[clear] / 2)
        else:
            assert np.all(lower[clear, p, 1] == np.inf)


def test_moved_bounds_track_the_runner_up_apart() -> None:
    """After moves, kept labels are the exact nearest of the moved centroids, and the bounds hold.
    Rows near centroid 0 with centroid 1 as runner-up, the others far: when a far centroid moves a
    lot, the runner-up's own bound keeps the rows (one Hamerly bound, shrunk by the largest move,
    fails every row)."""
    rng = np.random.default_rng(4)
    c = rng.uniform(0, 255, (6, 784))
    c[1] = c[0] + rng.normal(0, 18, 784)  # ~500 from centroid 0; the others ~2,900
    c = c.astype(np.float32)
    x = np.clip(np.rint(c[0] + rng.normal(0, 10, (400, 784))), 0, 255).astype(np.uint8)
    offsets = np.array([0, 6])
    xsq = row_norms(x, np.float32)
    labels, dmin, upper, lower, second = kernels.assign(x, c, offsets, bounds=True, xsq=xsq)
    assert np.all(labels[:, 0] == 0) and np.all(second[:, 0] == 1)
    step = (
        rng.normal(0, 1, c.shape) * np.array([0.2, 0.2, 0.2, 0.2, 0.2, 36.0])[:, None]
    )  # centroid 5: ~1,000
    moved_c = (c + step).astype(np.float32)
    moved = np.sqrt(((moved_c.astype(np.float64) - c) ** 2).sum(1))
    slack = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    csq_max = float((moved_c.astype(np.float64) ** 2).sum(1).max())
    new_upper, new_lower, need = moved_bounds(
        labels,
        upper,
        lower,
        second,
        moved,
        offsets,
        slack * xsq.astype(np.float64),
        np.array([slack * 2 * csq_max]),
    )
    exact = ((x.astype(np.float64)[:, None] - moved_c.astype(np.float64)[None]) ** 2).sum(-1)
    assert need[:, 0].mean() < 0.1
    np.testing.assert_array_equal(exact.argmin(1)[~need[:, 0]], 0)  # kept: still the nearest
    err = slack / 2 * (xsq.astype(np.float64) + 2 * csq_max)
    assert np.all(new_upper[:, 0] ** 2 >= exact[:, 0] - err)
    assert np.all(new_lower[:, 0, 0] ** 2 <= exact[:, 1] + err)
    assert np.all(new_lower[:, 0, 1] ** 2 <= exact[:, 2:].min(1) + err)
    hamerly = lower[:, 0].min(-1) - moved[1:].max()
    assert np.all(
        hamerly < new_upper[:, 0]
    )  # one bound for every other centroid: every row needs a look


@pytest.mark.parametrize("seed", range(4))
def test_runs_with_empty_cluster_and_label_counts_match_a_bincount(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ks = rng.integers(1, 30, size=12)
    n = int(rng.integers(1, 400))
    offsets = np.concatenate([[0], np.cumsum(ks)])
    # some runs use every label, others miss one or more (a run's labels drawn from a random subset)
    labels = np.stack(
        [
            rng.choice(rng.choice(k, size=rng.integers(1, k + 1), replace=False), size=n)
            if rng.random() < 0.5
            else rng.integers(0, k, size=n)
            for k in ks
        ],
        axis=1,
    ).astype(np.int32)
    counts = [np.bincount(labels[:, p], minlength=k) for p, k in enumerate(ks)]
    expected = [p for p, c in enumerate(counts) if (c == 0).any()]
    assert 0 < len(expected) < len(ks) or n < 30
    np.testing.assert_array_equal(kernels.runs_with_empty_cluster(labels, offsets), expected)
    np.testing.assert_array_equal(label_counts(labels, offsets), np.concatenate(counts))


def test_reassign_settles_between_label_and_runner_up_when_only_that_bound_fails() -> None:
    """The rest cleared, the runner-up's bound failed: the pair gets the exact nearest of the two,
    the loser as runner-up with its computed distance, and the rest's bound untouched (no full
    recompute)."""
    rng = np.random.default_rng(5)
    c = rng.uniform(0, 255, (5, 784))
    c[:2] = rng.uniform(60, 195, 784)
    c[1] += rng.normal(0, 18, 784)
    c = c.astype(np.float32)
    t = rng.choice([0.35, 0.65], 300)[:, None]  # between 0 and 1, nearer one or the other
    x = np.rint(c[0] + t * (c[1] - c[0]) + rng.normal(0, 10, (300, 784))).astype(np.uint8)
    exact = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    near = exact[:, :2].argmin(1)
    assert 0.2 < near.mean() < 0.8 and np.all(exact[:, 2:].min(1) > 2 * exact[:, :2].max(1))
    xsq = row_norms(x, np.float32)
    coef = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    window = coef * (xsq.astype(np.float64) + 2 * (c.astype(np.float64) ** 2).sum(1).max())
    labels = rng.integers(0, 2, (300, 1)).astype(np.int32)  # right or wrong between 0 and 1
    second = (1 - labels).astype(np.int32)
    lower = np.zeros((300, 1, 2))
    lower[:, 0, 1] = 0.99 * np.sqrt(exact[:, 2:].min(1))  # clears the rest, below their distance
    dmin, upper = np.zeros((300, 1)), np.full((300, 1), np.inf)
    rest = lower[:, 0, 1].copy()
    nearest.reassign(
        x,
        xsq,
        c,
        np.array([0, 5]),
        np.array([0]),
        np.ones((300, 1), bool),
        coef,
        labels,
        dmin,
        upper,
        lower,
        second,
    )
    np.testing.assert_array_equal(labels[:, 0], near)
    np.testing.assert_array_equal(
        lower[:, 0, 1][second[:, 0] >= 0], rest[second[:, 0] >= 0]
    )  # not recomputed
    named = second[:, 0] >= 0
    assert named.mean() > 0.9 and np.all(second[named, 0] == 1 - near[named])
    loser = exact[np.arange(300), 1 - near]
    assert np.all(np.abs(lower[named, 0, 0] ** 2 - loser[named]) <= window[named] / 2)
    assert np.all(np.abs(upper[:, 0] ** 2 - exact[np.arange(300), near]) <= window / 2)


def _with_centroid_bounds(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    """A first pass keeping per-centroid bounds: labels, dmin, upper, cbound (one run)."""
    cbound = np.empty((x.shape[0], c.shape[0]), dtype=np.float32)
    labels, dmin, upper, _, _ = kernels.assign(
        x,
        c,
        np.array([0, c.shape[0]]),
        bounds=True,
        xsq=row_norms(x, np.float32),
        cbound=cbound,
    )
    return labels, dmin, upper, cbound


@pytest.mark.parametrize("seed", range(3))
def test_reassign_centroids_gives_exact_nearest_and_bounds_below_every_distance(seed: int) -> None:
    """Elkan's step with no knowledge (all bounds 0): exact nearest (near ties settled), each
    checked centroid's bound at most its distance (up to the computed distances' error), the upper
    bound its computed distance."""
    x, runs, stack, offsets, ref, xsq, coef, need, wrong = _reassign_case(seed)
    n, r = ref.shape
    labels, dmin, upper = wrong.copy(), np.zeros((n, r)), np.zeros((n, r))
    cbound = np.zeros((n, offsets[-1]), dtype=np.float32)
    nearest.reassign_centroids(
        x, xsq, stack, offsets, np.arange(r), need, coef, labels, dmin, upper, cbound
    )
    np.testing.assert_array_equal(labels[need], ref[need])
    np.testing.assert_array_equal(labels[~need], wrong[~need])  # pairs not asked for are left alone
    for p, c in enumerate(runs):
        exact = ((x.astype(np.float64)[:, None] - c[None]) ** 2).sum(-1)  # integers: exact
        err = coef / 2 * (xsq.astype(np.float64) + 2 * (c**2).sum(1).max())
        rows = need[:, p]
        own = exact[np.arange(n), ref[:, p]]
        assert np.all(np.abs(upper[rows, p] ** 2 - own[rows]) <= err[rows])
        cb = cbound[:, offsets[p] : offsets[p + 1]].astype(np.float64)
        assert np.all(cb[rows] ** 2 <= exact[rows] + err[rows, None])
        assert np.all(
            cb[rows] > 0.99 * np.sqrt(exact[rows]) - 1
        )  # and computed: every bound was 0, none proven
        assert np.all(cb[~rows] == 0)


def test_reassign_centroids_computes_only_centroids_whose_bound_fails() -> None:
    """Valid bounds just below the distances: a centroid whose bound clears the assigned one's
    distance keeps its bound (no distance computed); the rest get theirs, and labels are the exact
    nearest."""
    rng = np.random.default_rng(8)
    c = rng.uniform(0, 255, (40, 784)).astype(np.float32)
    x = np.clip(
        np.rint(c[rng.integers(0, 40, 500)] + rng.normal(0, 60, (500, 784))), 0, 255
    ).astype(np.uint8)
    exact = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    ref = exact.argmin(1)
    xsq = row_norms(x, np.float32)
    coef = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    window = coef * (xsq.astype(np.float64) + 2 * (c.astype(np.float64) ** 2).sum(1).max())
    given = (0.999 * np.sqrt(exact)).astype(np.float32)
    labels = rng.integers(0, 40, (500, 1)).astype(np.int32)  # mostly wrong
    start = labels[:, 0].copy()
    assigned = exact[np.arange(500), start]
    cbound = given.copy()
    dmin, upper = np.zeros((500, 1)), np.full((500, 1), np.inf)
    nearest.reassign_centroids(
        x,
        xsq,
        c,
        np.array([0, 40]),
        np.array([0]),
        np.ones((500, 1), bool),
        coef,
        labels,
        dmin,
        upper,
        cbound,
    )
    np.testing.assert_array_equal(labels[:, 0], ref)
    # the assigned distance is computed (off by at most window / 2): beyond 1.5 windows a bound
    # clears it for sure, below 0.5 windows it fails for sure
    margin = given.astype(np.float64) ** 2 - assigned[:, None]
    proven, failed = margin > 1.5 * window[:, None], margin < 0.5 * window[:, None]
    proven[np.arange(500), start] = False
    assert 0.2 < proven.mean() < 0.95 and failed.mean() > 0.05  # both kinds occur
    np.testing.assert_array_equal(cbound[proven], given[proven])  # not recomputed
    assert np.all(
        cbound[failed] != given[failed]
    )  # recomputed: the computed distance, not 0.999 of it


def test_moved_centroid_bounds_keep_proven_labels_and_stay_below_the_distances() -> None:
    """After moves, the per-centroid bounds (lowered in place) stay below the moved centroids'
    distances, kept labels are the exact nearest, ``fails`` counts the other centroids whose bound
    does not clear; a far move of one centroid costs only its own bound (one bound per run shrinks
    by it for every row)."""
    rng = np.random.default_rng(4)
    c = rng.uniform(0, 255, (6, 784))
    c[1] = c[0] + rng.normal(0, 18, 784)
    c = c.astype(np.float32)
    x = np.clip(np.rint(c[0] + rng.normal(0, 10, (400, 784))), 0, 255).astype(np.uint8)
    offsets = np.array([0, 6])
    xsq = row_norms(x, np.float32)
    labels, _, upper, cbound = _with_centroid_bounds(x, c)
    step = rng.normal(0, 1, c.shape) * np.array([0.2, 0.2, 0.2, 0.2, 0.2, 36.0])[:, None]
    moved_c = (c + step).astype(np.float32)
    moved = np.sqrt(((moved_c.astype(np.float64) - c) ** 2).sum(1))
    slack = 2.0 * error_bound(1.0, 0.0, 784, np.float32)
    csq_max = float((moved_c.astype(np.float64) ** 2).sum(1).max())
    before = cbound.copy()
    row_slack, run_slack = slack * xsq.astype(np.float64), np.array([slack * 2 * csq_max])
    new_upper, need, fails = moved_centroid_bounds(
        labels, upper, cbound, moved, offsets, row_slack, run_slack
    )
    exact = ((x.astype(np.float64)[:, None] - moved_c.astype(np.float64)[None]) ** 2).sum(-1)
    err = slack / 2 * (xsq.astype(np.float64) + 2 * csq_max)
    assert np.all(
        cbound <= np.maximum(before - moved[None].astype(np.float32), 0)
    )  # lowered in place
    assert np.all(cbound.astype(np.float64) ** 2 <= exact + err[:, None])
    assert np.all(new_upper[:, 0] ** 2 >= exact[:, 0] - err)
    limit = np.sqrt(new_upper[:, 0] ** 2 + row_slack + run_slack[0])
    clears = cbound.astype(np.float64) > limit[:, None]
    clears[np.arange(400), labels[:, 0]] = True
    np.testing.assert_array_equal(fails[:, 0], (~clears).sum(1))
    np.testing.assert_array_equal(need[:, 0], fails[:, 0] > 0)
    assert need[:, 0].mean() < 0.1
    np.testing.assert_array_equal(
        exact.argmin(1)[~need[:, 0]], labels[~need[:, 0], 0]
    )  # kept: the nearest


def test_exact_sum_is_the_exact_sum_in_any_grouping() -> None:
    """Against Fractions: no rounding at any magnitude, so chunks' sums add up to the whole's."""
    from fractions import Fraction

    rng = np.random.default_rng(4)
    v = np.concatenate(
        [
            rng.random(3000) * 5e7,
            rng.standard_normal(500) * 10.0 ** rng.integers(-300, 300, 500),
            [0.0, 5e-324, -5e-324, 1e308, -1e308, 2.0**-1074 * 3],
        ]
    )
    ref = sum((Fraction(float(a)) for a in v), Fraction(0))
    assert exact_sum(v) == ref
    assert sum(exact_sum(part) for part in np.array_split(rng.permutation(v), 7)) == ref
    assert exact_sum(np.zeros(0)) == 0
    assert float(exact_sum(np.full(10, 0.1))) == 1.0 and sum([0.1] * 10) != 1.0  # float sums round
    assert np.isnan(exact_sum(np.array([1.0, np.nan])))
