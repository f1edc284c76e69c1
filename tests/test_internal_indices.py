"""The label-free indices of many runs at once, and of uint8 rows (the sweep's pixels, read as
stored and scaled by 1/255), against scikit-learn on the float64 rows and numpy brute force.

tests/test_metrics.py checks float32 rows (the estimator's and older callers' input); here
the integer path, the batching and the accuracy of the spreads on badly conditioned rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from kmclust.sweep.metrics import (
    _sum_dtype,
    cluster_indices,
    internal_indices,
    sample_distances,
    sample_silhouette,
    silhouette_rows,
)

SCALE = 1 / 255
TIGHT = 1e-12  # both sides are float64 computations of the same quantity: last bits only


def _pixels(n: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 rows around k centres (the whole 0..255 range used), and their cluster ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    x = rng.uniform(0, 255, (k, d))[labels] + rng.normal(0, 40, (n, d))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), labels


def _sklearn(x: np.ndarray, labels: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    return {
        "davies_bouldin": davies_bouldin_score(x, labels),
        "calinski_harabasz": calinski_harabasz_score(x, labels),
        "silhouette": silhouette_score(x[sample], labels[sample]),
    }


def _brute_force(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The textbook formulas in float64, cluster by cluster, from the differences themselves."""
    ids = np.unique(labels)
    means = np.array([x[labels == c].mean(axis=0) for c in ids])
    sizes = np.array([np.sum(labels == c) for c in ids])
    dist = [np.linalg.norm(x[labels == c] - means[i], axis=1) for i, c in enumerate(ids)]
    spread = np.array([d.mean() for d in dist])
    within = sum(float(np.sum(d**2)) for d in dist)
    between = float(np.sum(sizes * np.sum((means - x.mean(axis=0)) ** 2, axis=1)))
    n, k = len(x), len(ids)
    ratios = [
        max(
            (spread[i] + spread[j]) / np.linalg.norm(means[i] - means[j])
            for j in range(k)
            if j != i
        )
        for i in range(k)
    ]
    return {
        "davies_bouldin": float(np.mean(ratios)),
        "calinski_harabasz": between * (n - k) / (within * (k - 1)),
    }


@pytest.mark.parametrize(
    ("n", "k", "d", "size", "seed"),
    [(300, 4, 20, 100, 0), (600, 12, 784, 2000, 1), (200, 2, 3, 50, 2), (500, 20, 64, 499, 3)],
)
def test_uint8_rows_give_the_indices_of_the_scaled_rows(n, k, d, size, seed) -> None:
    rows, labels = _pixels(n, k, d, seed)
    sample = silhouette_rows(n, size, seed)
    got = internal_indices(rows, labels, sample, scale=SCALE)
    scaled = rows.astype(np.float64) / 255.0
    for name, value in _sklearn(scaled, labels, sample).items():
        assert got[name] == pytest.approx(value, rel=TIGHT), name
    for name, value in _brute_force(scaled, labels).items():
        assert got[name] == pytest.approx(value, rel=TIGHT), name
    # the silhouette from the sample's distances in pixel units (as the sweep keeps them)
    again = sample_silhouette(rows, labels, sample, sample_distances(rows, sample))
    assert again == pytest.approx(got["silhouette"], rel=TIGHT)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_a_batch_gives_every_run_its_own_values(dtype) -> None:
    rows, _ = _pixels(700, 6, 50, 4)
    x = rows.astype(dtype)
    rng = np.random.default_rng(5)
    label_sets = [
        rng.integers(0, 5, 700),  # k = 5
        np.array([0, 3, 9])[rng.integers(0, 3, 700)],  # ids 0, 3, 9 of a k = 10 run
        rng.integers(0, 20, 700),  # k = 20
        np.zeros(700, np.int64),  # one cluster: undefined
        np.r_[np.zeros(699, np.int64), 1],  # a cluster of one row
    ]
    together = cluster_indices(x, label_sets)
    assert len(together) == len(label_sets)
    for labels, got in zip(label_sets, together, strict=True):
        assert got == cluster_indices(x, [labels])[0]  # the same bits alone or in a batch
        if len(np.unique(labels)) < 2:
            assert np.isnan(got["davies_bouldin"]) and np.isnan(got["calinski_harabasz"])
            continue
        x64 = x.astype(np.float64)
        assert got["davies_bouldin"] == pytest.approx(davies_bouldin_score(x64, labels), rel=TIGHT)
        want = calinski_harabasz_score(x64, labels)
        assert got["calinski_harabasz"] == pytest.approx(want, rel=TIGHT)
    assert cluster_indices(x, []) == []


def test_spreads_stay_accurate_far_from_the_origin() -> None:
    """Rows a million units from the origin: an expansion ‖x‖² − 2x·c + ‖c‖² loses about 1e-4
    of each squared distance there, the differences lose nothing. The indices do not move
    with a shift, so scikit-learn on the centred rows is the reference."""
    rows, labels = _pixels(400, 5, 30, 6)
    centred = rows.astype(np.float64) / 255.0
    far = centred + 1e6
    got = cluster_indices(far, [labels])[0]
    for name, value in _brute_force(centred, labels).items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_coincident_pixels_use_sklearns_no_spread_value() -> None:
    # every cluster one repeated image: scikit-learn's Davies–Bouldin is 0, its CH 1
    rows = np.repeat(np.array([[0, 0], [255, 255], [0, 255]], np.uint8), 4, axis=0)
    labels = np.repeat(np.arange(3), 4)
    got = internal_indices(rows, labels, np.arange(12), scale=SCALE)
    for name, value in _sklearn(rows / 255.0, labels, np.arange(12)).items():
        assert got[name] == pytest.approx(value, rel=TIGHT), name


def test_integer_sums_stay_exact() -> None:
    """int32 while 255·n fits (every cluster sum of uint8 rows is then exact), int64 beyond;
    float rows keep float64 sums."""
    assert _sum_dtype(np.dtype(np.uint8), 2**31 // 255) is np.int32
    assert _sum_dtype(np.dtype(np.uint8), 2**31 // 255 + 1) is np.int64
    assert _sum_dtype(np.dtype(np.float32), 10) is np.float64
    # all-255 rows in one big cluster, a second cluster at 0: the mean is exactly 255
    rows = np.r_[np.full((5000, 8), 255, np.uint8), np.zeros((10, 8), np.uint8)]
    rows[:2, 0] = 254  # some spread
    labels = np.r_[np.zeros(5000, np.int64), np.ones(10, np.int64)]
    got = cluster_indices(rows, [labels], SCALE)[0]
    for name, value in _brute_force(rows / 255.0, labels).items():
        assert got[name] == pytest.approx(value, rel=TIGHT), name


@pytest.mark.parametrize(
    ("labels", "message"),
    [(np.array([0, -1, 1]), "non-negative"), (np.array([0, 1]), "3 rows but 2")],
)
def test_bad_cluster_ids_are_refused(labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_indices(np.zeros((3, 2), np.uint8), [labels])


def test_sample_distances_of_pixels_are_exact() -> None:
    """Integer rows in float64: every square and sum is exact, so each distance is the
    correctly rounded root, the bits scipy's direct cdist gives."""
    rows, _ = _pixels(300, 4, 784, 7)
    sample = silhouette_rows(300, 120, 7)
    want = cdist(rows[sample].astype(np.float64), rows[sample].astype(np.float64))
    np.testing.assert_array_equal(sample_distances(rows, sample), want)
