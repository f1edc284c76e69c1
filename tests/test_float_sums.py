"""Float rows: exact per-cluster sums kept by each chunk, and the engine's float path with state.

References are independent: Python's exact rational arithmetic (``fractions``)
and a float64 brute force of nearest centroids.
"""

from __future__ import annotations

from fractions import Fraction

import dask.array as da
import numpy as np
import pytest

from kmclust.lloyd import float_sums
from kmclust.lloyd.driver import lloyd


def _exact_reference(x: np.ndarray, labels: np.ndarray, kt: int) -> list[list[Fraction]]:
    out = [[Fraction(0)] * x.shape[1] for _ in range(kt)]
    for row, lab in zip(x, labels):
        for q, v in enumerate(row):
            out[lab][q] += Fraction(float(v))
    return out


def _as_fractions(kept: np.ndarray) -> list[list[Fraction]]:
    """Each kept sum is the exact sum of its float64 parts."""
    return [
        [sum(Fraction(float(v)) for v in kept[c, :, q]) for q in range(kept.shape[2])]
        for c in range(kept.shape[0])
    ]


def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 6))
    wide = rng.normal(size=(300, 6)) * np.exp2(rng.integers(-40, 10, (300, 6)))
    return {
        "float32 pixels / 255": (pixels / 255.0).astype(np.float32),
        "float64 pixels / 255": pixels / 255.0,
        "float32 signed, wide": wide.astype(np.float32),
        "float64 signed": rng.normal(size=(300, 6)),
        "float32 subnormals": (rng.normal(size=(300, 6)) * 1e-39).astype(np.float32),
    }


def test_grids_follow_the_span_of_the_values() -> None:
    data = _datasets()
    g = float_sums.grid_of(data["float32 pixels / 255"])
    assert (g.mode, g.parts, g.g) == ("parts", 1, -31)  # 1/255's last bit: 2**-31
    g = float_sums.grid_of(data["float64 pixels / 255"])
    assert (g.mode, g.parts) == ("parts", 2)
    assert float_sums.grid_of(data["float32 signed, wide"]).parts > 1
    bad = data["float64 signed"].copy()
    bad[3, 2] = np.inf
    assert float_sums.grid_of(bad).mode == "fixed"
    huge = np.array([[1e-300, 1e300]])
    assert float_sums.grid_of(huge).mode == "fixed"  # 2000 bits: more parts than allowed


@pytest.mark.parametrize("name", list(_datasets()))
def test_kept_sums_are_the_exact_sums(name: str) -> None:
    x = _datasets()[name]
    rng = np.random.default_rng(0)
    offsets = np.array([0, 4, 11])
    labels = np.stack([rng.integers(0, 4, 300), rng.integers(0, 7, 300)], axis=1)
    grid = float_sums.grid_of(x)
    assert grid.exact
    kept = float_sums.full_sums(x, labels, offsets, grid)
    stacked = np.concatenate([labels[:, 0], labels[:, 1] + 4])
    ref = _exact_reference(np.concatenate([x, x]), stacked, 11)
    assert _as_fractions(kept) == ref
    # what is sent is within a float64 rounding of the exact sums
    sent = float_sums.as_float(kept, grid)
    for c in range(11):
        for q in range(x.shape[1]):
            assert sent[c, q] == pytest.approx(float(ref[c][q]), rel=1e-15, abs=1e-300)


@pytest.mark.parametrize("name", list(_datasets()))
def test_changed_sums_are_bit_identical_to_full_sums(name: str) -> None:
    x = _datasets()[name]
    rng = np.random.default_rng(1)
    offsets = np.array([0, 5, 8])
    old = np.stack([rng.integers(0, 5, 300), rng.integers(0, 3, 300)], axis=1)
    new = old.copy()
    moved = rng.random(300) < 0.2
    new[moved, 0] = rng.integers(0, 5, moved.sum())
    new[~moved, 1] = rng.integers(0, 3, (~moved).sum())
    grid = float_sums.grid_of(x)
    kept = float_sums.full_sums(x, old, offsets, grid)
    before = kept.copy()
    changed = float_sums.changed_sums(kept, x, new, old, offsets, grid)
    np.testing.assert_array_equal(kept, before)  # the kept sums are not touched
    full = float_sums.full_sums(x, new, offsets, grid)
    np.testing.assert_array_equal(changed, full)
    np.testing.assert_array_equal(
        float_sums.as_float(changed, grid), float_sums.as_float(full, grid)
    )


def test_fixed_mode_sums_in_row_order() -> None:
    x = np.array([[1e300], [1e-300], [-1e300], [3.0]])
    grid = float_sums.grid_of(x)
    assert grid.mode == "fixed"
    got = float_sums.full_sums(x, np.zeros((4, 1), dtype=np.int64), np.array([0, 1]), grid)
    assert got[0, 0, 0] == ((1e300 + 1e-300) - 1e300) + 3.0  # row order: the guarantee here


def _float_inputs() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x = load_digits().data
    rng = np.random.default_rng(0)
    return {
        "float32 [0, 1]": (x / 16).astype(np.float32),
        "float64 [0, 1]": x / 16.0,
        "float32 wide span": (
            rng.normal(size=x.shape) * np.exp(rng.normal(size=x.shape) * 3)
        ).astype(np.float32),
        "float64 normal": rng.normal(size=x.shape),
    }


@pytest.mark.parametrize("name", list(_float_inputs()))
def test_float_rows_give_the_same_bits_with_state_pruning_or_streaming(name: str) -> None:
    """Float rows keep labels, bounds and exact sums per chunk: pruned or not, streamed
    (no state at all) or not, through the pool or a graph, every bit is the same; labels are the
    float64 brute-force nearest centroids; relocations (duplicate initial centroids) included.
    (ΣK = 25: chunks keep their sums where the values take one or two parts, not four.)"""
    x = _float_inputs()[name]
    rng = np.random.default_rng(5)
    dup = x[rng.choice(len(x), 8, replace=False)].astype(np.float64)
    dup[5:] = dup[0]  # three copies of one centroid: empty clusters to relocate
    inits = [x[rng.choice(len(x), k, replace=False)].astype(np.float64) for k in (5, 12)] + [dup]
    got = {}
    for label, kw in (
        ("default", {}),
        ("unpruned", {"prune": False}),
        ("streamed", {"stream": True}),
        ("graph", {"executor": "graph"}),
    ):
        got[label] = lloyd(
            da.from_array(x, chunks=(400, 64)),
            inits,
            tol=0,
            max_iter=25,
            return_labels=True,
            **kw,
        )
    reference = got["default"]
    assert reference[2].n_relocated > 0
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
    x64 = x.astype(np.float64)
    for r in reference:
        d = ((x64[:, None, :] - r.centroids[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(r.labels, d.argmin(axis=1))
        means = np.stack([x64[r.labels == j].mean(axis=0) for j in range(r.centroids.shape[0])])
        if r.n_iter < 25:  # converged: the centroids are the means of their rows
            np.testing.assert_allclose(r.centroids, means, rtol=1e-12, atol=1e-12)


def test_float64_rows_get_the_nearest_of_the_float64_centroids() -> None:
    """float64 rows are compared in float32 where that is safe, but two centroids closer than
    float32 can tell apart still split the rows between them as float64 does."""
    from kmclust.lloyd.driver import predict

    rng = np.random.default_rng(7)
    x = rng.random((600, 16))
    base = (x[0] * 0.5 + 0.5).astype(np.float32).astype(np.float64)  # in [0.5, 1], float32-exact
    step = rng.normal(size=16) * 1e-10  # far below float32's resolution there (6e-8)
    centroids = np.stack([base, base + step, rng.random(16), rng.random(16) + 3.0])
    assert np.array_equal(centroids[0].astype(np.float32), centroids[1].astype(np.float32))
    ((labels, _, _),) = predict(da.from_array(x, chunks=(150, 16)), [centroids])
    d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    expected = d.argmin(axis=1)
    assert {0, 1} <= set(expected.tolist())  # both near twins take rows
    np.testing.assert_array_equal(labels, expected)
