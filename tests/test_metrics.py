"""Tests of kmclust.sweep.metrics: hand-computed toy cases and independent cross-checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from kmclust.sweep.metrics import (
    ari,
    evaluate,
    hungarian_acc,
    internal_indices,
    label_accuracy,
    majority_labels,
    nmi,
    purity,
    sample_distances,
    silhouette_rows,
)

# The 6-sample case used throughout (k = 3 clusters, 3 classes):
#   sample   0 1 2 3 4 5
#   true     0 0 1 1 2 2
#   cluster  0 0 0 1 1 2
# cluster 0 = {0, 0, 1} -> label 0; cluster 1 = {1, 2} -> tie -> label 1;
# cluster 2 = {2} -> label 2. Contingency (classes x clusters):
#   class 0: 2 0 0
#   class 1: 1 1 0
#   class 2: 0 1 1
TRUE6 = np.array([0, 0, 1, 1, 2, 2])
PRED6 = np.array([0, 0, 0, 1, 1, 2])


# ------------------------------------------------------------- hand-computed
def test_majority_labels_toy() -> None:
    np.testing.assert_array_equal(majority_labels(PRED6, TRUE6, 3), [0, 1, 2])
    out = majority_labels(PRED6, TRUE6, 3)
    assert out.dtype == np.int64 and out.shape == (3,)


def test_majority_labels_ties_go_to_smallest_label() -> None:
    # cluster 0: {3, 1, 3, 1} -> 1; cluster 1: {7, 7, 2, 2} -> 2; cluster 2: {5} -> 5
    ids = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    y = np.array([3, 1, 3, 1, 7, 7, 2, 2, 5])
    np.testing.assert_array_equal(majority_labels(ids, y, 3), [1, 2, 5])


def test_majority_labels_empty_clusters() -> None:
    # clusters 1 and 3 have no members
    ids = np.array([0, 2, 2, 0], dtype=np.uint8)
    y = np.array([4, 9, 9, 4], dtype=np.uint8)
    np.testing.assert_array_equal(majority_labels(ids, y, 4), [4, -1, 9, -1])
    empty = np.array([], dtype=np.int64)
    np.testing.assert_array_equal(majority_labels(empty, empty, 2), [-1, -1])


def test_label_accuracy_toy() -> None:
    # wrong: sample 2 (true 1, label 0) and sample 4 (true 2, label 1) -> 4/6
    assert label_accuracy(PRED6, TRUE6, np.array([0, 1, 2])) == pytest.approx(4 / 6)
    # members of an unlabelled cluster count as wrong
    ids, y = np.array([0, 1, 1]), np.array([0, 0, 1])
    assert label_accuracy(ids, y, np.array([0, -1])) == pytest.approx(1 / 3)
    assert math.isnan(label_accuracy(np.array([], int), np.array([], int), np.array([0, 1])))


def test_purity_and_hungarian_toy() -> None:
    # purity: column maxima 2 + 1 + 1 = 4 of 6
    assert purity(TRUE6, PRED6) == pytest.approx(4 / 6)
    # best matching: class0-c0 (2), class1-c1 (1), class2-c2 (1) = 4 of 6
    assert hungarian_acc(TRUE6, PRED6) == pytest.approx(4 / 6)
    # all six in one cluster: purity 2/6, matching can use one cluster only: 2/6
    one = np.zeros(6, int)
    assert purity(TRUE6, one) == pytest.approx(2 / 6)
    assert hungarian_acc(TRUE6, one) == pytest.approx(2 / 6)
    # six singletons: purity 1, but one-to-one matching covers only 3 of 6
    six = np.arange(6)
    assert purity(TRUE6, six) == pytest.approx(1.0)
    assert hungarian_acc(TRUE6, six) == pytest.approx(3 / 6)


def test_hungarian_prefers_global_matching_over_greedy() -> None:
    # contingency classes x clusters: [[3, 2], [2, 0]]; greedy takes 3 (class0-c0) -> 3;
    # the optimum is class0-c1 (2) + class1-c0 (2) = 4 of 7
    true = np.array([0, 0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0, 0])
    assert hungarian_acc(true, pred) == pytest.approx(4 / 7)


def test_ari_toy() -> None:
    # sum C(n_ij, 2) = C(2,2) = 1; rows (2,2,2): 3; columns (3,2,1): 3 + 1 = 4; C(6,2) = 15
    expected_index = 3 * 4 / 15
    max_index = (3 + 4) / 2
    assert ari(TRUE6, PRED6) == pytest.approx((1 - expected_index) / (max_index - expected_index))
    assert ari(TRUE6, TRUE6) == pytest.approx(1.0)


def test_nmi_toy() -> None:
    # p(class) = 1/3 each; p(cluster) = 1/2, 1/3, 1/6; nonzero cells 2/6, 1/6 x 4
    mi = (
        (2 / 6) * math.log((2 / 6) / (1 / 3 * 1 / 2))
        + (1 / 6) * math.log((1 / 6) / (1 / 3 * 1 / 2))
        + (1 / 6) * math.log((1 / 6) / (1 / 3 * 1 / 3))
        + (1 / 6) * math.log((1 / 6) / (1 / 3 * 1 / 3))
        + (1 / 6) * math.log((1 / 6) / (1 / 3 * 1 / 6))
    )
    h_true = math.log(3)
    h_pred = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert nmi(TRUE6, PRED6) == pytest.approx(mi / ((h_true + h_pred) / 2))
    assert nmi(TRUE6, TRUE6) == pytest.approx(1.0)


def test_evaluate_toy() -> None:
    test_ids = np.array([3, 0, 1])  # cluster 3 is empty on train -> unlabelled
    test_true = np.array([0, 0, 2])
    out = evaluate(PRED6, TRUE6, test_ids, test_true, k=4, n_classes=3)
    np.testing.assert_array_equal(out["cluster_label"], [0, 1, 2, -1])
    np.testing.assert_array_equal(out["cluster_size"], [3, 2, 1, 0])
    assert out["cluster_size"].dtype == np.int64
    assert out["train_accuracy"] == pytest.approx(4 / 6)
    # test: cluster 3 (unlabelled) wrong, cluster 0 right, cluster 1 (label 1 vs 2) wrong
    assert out["test_accuracy"] == pytest.approx(1 / 3)
    assert out["purity"] == pytest.approx(4 / 6)
    assert math.isnan(out["acc"])  # k != n_classes
    assert out["nmi"] == pytest.approx(nmi(TRUE6, PRED6))
    assert out["ari"] == pytest.approx(ari(TRUE6, PRED6))

    out3 = evaluate(PRED6, TRUE6, np.array([], int), np.array([], int), k=3, n_classes=3)
    assert out3["acc"] == pytest.approx(4 / 6)
    assert math.isnan(out3["test_accuracy"])


def test_evaluate_test_set_never_changes_labels() -> None:
    a = evaluate(PRED6, TRUE6, np.array([0, 0, 0]), np.array([2, 2, 2]), k=3, n_classes=3)
    b = evaluate(PRED6, TRUE6, np.array([0]), np.array([0]), k=3, n_classes=3)
    np.testing.assert_array_equal(a["cluster_label"], b["cluster_label"])
    assert a["test_accuracy"] == 0.0 and b["test_accuracy"] == 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: majority_labels(np.array([0, 3]), np.array([0, 1]), 3), r"\[0, 3\)"),
        (lambda: majority_labels(np.array([0, 1]), np.array([0]), 3), "2 cluster ids"),
        (lambda: majority_labels(np.array([0, 1]), np.array([0, -1]), 3), "non-negative"),
        (lambda: majority_labels(np.array([0.5, 1]), np.array([0, 1]), 3), "integers"),
        (lambda: majority_labels(np.array([0, 1]), np.array([0, 1]), 0), "k must be"),
        (lambda: label_accuracy(np.array([0, 2]), np.array([0, 1]), np.array([0, 1])), r"\[0, 2\)"),
        (lambda: hungarian_acc(np.array([[0, 1]]), np.array([[0, 1]])), "1-D"),
        (lambda: evaluate(np.array([], int), np.array([], int), [0], [0], 2, 2), "empty"),
    ],
)
def test_bad_inputs(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------- cross-checks
def brute_force_matching(true: np.ndarray, pred: np.ndarray, n_cls: int, k: int) -> float:
    """Best one-to-one class<->cluster matching by trying every injective map."""
    count = [[0] * k for _ in range(n_cls)]
    for t, p in zip(true.tolist(), pred.tolist(), strict=True):
        count[t][p] += 1
    best = 0
    if k <= n_cls:  # cluster j -> class perm[j]
        for perm in itertools.permutations(range(n_cls), k):
            best = max(best, sum(count[perm[j]][j] for j in range(k)))
    else:  # class i -> cluster perm[i]
        for perm in itertools.permutations(range(k), n_cls):
            best = max(best, sum(count[i][perm[i]] for i in range(n_cls)))
    return best / len(true)


@st.composite
def labelled(draw, square: bool = False):
    n_cls = draw(st.integers(1, 5))
    k = n_cls if square else draw(st.integers(1, 5))
    n = draw(st.integers(1, 40))
    true = np.array(draw(st.lists(st.integers(0, n_cls - 1), min_size=n, max_size=n)))
    pred = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    return true, pred, n_cls, k


@settings(max_examples=150, deadline=None)
@given(labelled())
def test_hungarian_matches_brute_force(case) -> None:
    true, pred, n_cls, k = case
    assert hungarian_acc(true, pred) == pytest.approx(brute_force_matching(true, pred, n_cls, k))


@settings(max_examples=100, deadline=None)
@given(labelled(square=True))
def test_purity_at_least_hungarian(case) -> None:
    true, pred, _, _ = case
    assert purity(true, pred) >= hungarian_acc(true, pred) - 1e-12


@settings(max_examples=100, deadline=None)
@given(labelled(), st.randoms(use_true_random=False))
def test_nmi_ari_invariant_to_relabelling(case, rnd) -> None:
    true, pred, _, k = case
    perm = list(range(k))
    rnd.shuffle(perm)
    relabelled = np.array(perm)[pred]
    assert nmi(true, relabelled) == pytest.approx(nmi(true, pred), abs=1e-12)
    assert ari(true, relabelled) == pytest.approx(ari(true, pred), abs=1e-12)
    assert hungarian_acc(true, relabelled) == pytest.approx(hungarian_acc(true, pred))


@settings(max_examples=100, deadline=None)
@given(labelled())
def test_majority_and_accuracy_match_plain_loops(case) -> None:
    true, pred, _, k = case
    labels = majority_labels(pred, true, k)
    for c in range(k):
        members = true[pred == c].tolist()
        if not members:
            assert labels[c] == -1
        else:
            top = max(members.count(v) for v in set(members))
            assert labels[c] == min(v for v in set(members) if members.count(v) == top)
    right = sum(labels[p] == t for t, p in zip(true.tolist(), pred.tolist(), strict=True))
    assert label_accuracy(pred, true, labels) == pytest.approx(right / len(true))
    # majority labelling on the training set is exactly purity
    assert label_accuracy(pred, true, labels) == pytest.approx(purity(true, pred))


# ------------------------------------------------- label-free indices against scikit-learn
def _blobs(n: int, k: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows in [0, 1] around k centres, and their (known) cluster ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    x = rng.uniform(0.2, 0.8, (k, d))[labels] + rng.normal(0, 0.05, (n, d))
    return np.clip(x, 0, 1).astype(np.float32), labels


def _sklearn(x: np.ndarray, labels: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    x64 = x.astype(np.float64)
    return {
        "davies_bouldin": davies_bouldin_score(x64, labels),
        "calinski_harabasz": calinski_harabasz_score(x64, labels),
        "silhouette": silhouette_score(x64[sample], labels[sample]),
    }


@pytest.mark.parametrize(
    ("n", "k", "d", "size", "seed"),
    [(300, 4, 20, 100, 0), (500, 12, 784, 2000, 1), (200, 2, 3, 50, 2), (400, 7, 16, 399, 3)],
)
def test_internal_indices_equal_sklearn(n, k, d, size, seed) -> None:
    x, labels = _blobs(n, k, d, seed)
    sample = silhouette_rows(n, size, seed)
    got, want = internal_indices(x, labels, sample), _sklearn(x, labels, sample)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name
    # the same with the sample's distances computed beforehand (as the sweep does per seed)
    again = internal_indices(x, labels, sample, sample_distances(x, sample))
    assert again["silhouette"] == pytest.approx(want["silhouette"], rel=1e-6)


def test_internal_indices_ignore_empty_clusters_and_odd_ids() -> None:
    # ids 0, 3, 9 of a k = 10 run: sklearn sees three labels, so must we
    x, labels = _blobs(240, 3, 10, 4)
    ids = np.array([0, 3, 9])[labels]
    sample = silhouette_rows(240, 120, 5)
    got, want = internal_indices(x, ids, sample), _sklearn(x, ids, sample)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_internal_indices_with_a_single_member_cluster() -> None:
    x, labels = _blobs(100, 3, 8, 6)
    labels[17] = 3  # a cluster of one row (no spread of its own)
    sample = np.arange(100)
    got, want = internal_indices(x, labels, sample), _sklearn(x, labels, sample)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.parametrize(
    "labels",
    [np.zeros(6, np.int64), np.arange(6), np.array([], np.int64)],
    ids=["all in one cluster", "every row its own cluster", "no rows"],
)
def test_internal_indices_are_nan_where_sklearn_refuses(labels) -> None:
    x = np.random.default_rng(7).uniform(0, 1, (len(labels), 5)).astype(np.float32)
    got = internal_indices(x, labels, np.arange(len(labels)))
    assert all(math.isnan(v) for v in got.values())
    if len(labels):  # scikit-learn refuses each of them
        for score in (davies_bouldin_score, calinski_harabasz_score, silhouette_score):
            with pytest.raises(ValueError):
                score(x.astype(np.float64), labels)


def test_coincident_rows_give_sklearns_values() -> None:
    # every cluster a single repeated point: no within spread
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]], np.float32), 4, axis=0)
    labels = np.repeat(np.arange(3), 4)
    got, want = internal_indices(x, labels, np.arange(12)), _sklearn(x, labels, np.arange(12))
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_silhouette_sample_is_seeded_sorted_and_optional() -> None:
    a, b = silhouette_rows(1000, 200, 3), silhouette_rows(1000, 200, 3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 200 and (np.diff(a) > 0).all() and a.max() < 1000
    assert not np.array_equal(a, silhouette_rows(1000, 200, 4))
    np.testing.assert_array_equal(silhouette_rows(50, 2000, 3), np.arange(50))
    x, labels = _blobs(60, 3, 4, 8)
    none = silhouette_rows(60, 0, 3)
    assert math.isnan(internal_indices(x, labels, none)["silhouette"])
    assert math.isnan(internal_indices(x, labels, none, sample_distances(x, none))["silhouette"])
    # a sample holding one cluster only has no silhouette; the other indices stay defined
    got = internal_indices(x, labels, np.flatnonzero(labels == 1))
    assert math.isnan(got["silhouette"]) and math.isfinite(got["davies_bouldin"])


# ------------------------------------------- the same bits as scikit-learn, without its checks
@settings(max_examples=200, deadline=None)
@given(labelled())
def test_nmi_ari_purity_hungarian_are_sklearns_bits(case) -> None:
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    true, pred, _, _ = case
    assert nmi(true, pred) == normalized_mutual_info_score(true, pred)
    assert ari(true, pred) == adjusted_rand_score(true, pred)
    c = contingency_matrix(true, pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    assert hungarian_acc(true, pred) == float(c[rows, cols].sum() / len(true))
    assert purity(true, pred) == float(c.max(axis=0).sum() / len(true))


@pytest.mark.parametrize(("n", "k", "seed"), [(50, 2, 0), (300, 7, 1), (1000, 20, 2), (97, 40, 3)])
def test_silhouette_is_sklearns_bits(n, k, seed) -> None:
    from kmclust.sweep.metrics import silhouette

    x, labels = _blobs(n, k, 16, seed)
    labels[:3] = k + 5  # an odd id, and a cluster of three rows
    labels[3] = k + 9  # a cluster of one row (its silhouette is 0)
    d = sample_distances(x, np.arange(n))
    assert silhouette(d, labels) == silhouette_score(d, labels, metric="precomputed")


def test_silhouette_of_the_sweeps_default_sample_is_sklearns_bits() -> None:
    """2,000 float32 rows scaled as the sweep's (its default sample), 20 clusters."""
    from kmclust.sweep.metrics import silhouette

    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2000, 64), dtype=np.uint8) * np.float32(1 / 255)
    labels = rng.integers(0, 20, 2000)
    d = sample_distances(x, np.arange(2000))
    assert silhouette(d, labels) == silhouette_score(d, labels, metric="precomputed")
