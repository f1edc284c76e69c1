"""Labels are the exact nearest centroid, whatever rows or centroids a GEMM saw (near ties included)."""

from __future__ import annotations

import numpy as np
import pytest

from kmclust import kernels, nearest


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


@pytest.mark.parametrize("seed", range(4))
def test_labels_do_not_depend_on_rows_or_stack_seen(seed: int) -> None:
    """Whole chunk, a row subset, one run alone: the same labels (the GEMM rounds differently in each)."""
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


def test_error_bound_covers_float32_gemm_error() -> None:
    """The bound exceeds the measured error of float32 ‖c‖² − 2x·c against exact integers."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (500, 784))
    c = rng.integers(0, 256, (40, 784))
    exact = (c * c).sum(1)[None, :] - 2 * x @ c.T
    xf, cf = x.astype(np.float32), c.astype(np.float32)
    got = kernels.distances(xf, cf).astype(np.float64)
    err = np.abs(got - exact).max(axis=1)
    bound = nearest.error_bound(np.einsum("ij,ij->i", xf, xf), float((cf.astype(np.float64) ** 2).sum(1).max()),
                                784, np.float32)
    assert np.all(err <= bound)
    assert np.all(bound < 1e-3 * (x * x).sum(1))  # and is not vacuous
