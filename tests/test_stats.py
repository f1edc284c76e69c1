"""The report's paired statistics against scipy's own functions on the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kmclust.report.stats import paired_test, wilcoxon_p


def _cases(seed: int, count: int, sizes: tuple[int, int]) -> list[np.ndarray]:
    """Differences with many ties and zeros, as iteration counts and accuracies give them."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        d = rng.integers(-3, 4, int(rng.integers(*sizes))) * rng.choice([1.0, 0.5, 0.01])
        if np.any(d):
            out.append(d)
    return out


@pytest.mark.parametrize("d", _cases(0, 12, (2, 11)), ids=lambda d: f"n{d.size}")
def test_wilcoxon_with_ties_and_zeros_equals_scipy(d):
    # scipy's permutation test over all 2^n sign patterns is the reference: the same p exactly
    assert wilcoxon_p(d) == stats.wilcoxon(d).pvalue


def test_wilcoxon_at_thirteen_with_ties_equals_scipy():
    d = np.array([3, -1, 1, 2, -2, 0, 4, 4, -1, 2, 5, 1, 0], dtype=float)
    assert wilcoxon_p(d) == stats.wilcoxon(d).pvalue


@pytest.mark.parametrize(
    "d",
    [
        np.random.default_rng(1).normal(size=9),  # no ties: scipy's exact distribution
        np.random.default_rng(2).integers(-5, 6, 40).astype(float),  # n > 13: normal approx.
        np.array([1.0, 2.0]),
    ],
    ids=["no-ties", "large-n", "two"],
)
def test_wilcoxon_elsewhere_is_scipys(d):
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-15)


def test_wilcoxon_extremes():
    # all positive, distinct or tied: the smallest two-sided p of 2^n patterns is 2 / 2^n
    assert wilcoxon_p(np.arange(1.0, 6.0)) == 2 / 32
    assert wilcoxon_p(np.array([1.0, 1.0, 1.0, 1.0])) == 2 / 16
    assert np.isnan(wilcoxon_p(np.zeros(4)))


def test_paired_test_p_values_are_scipys():
    rng = np.random.default_rng(3)
    a = rng.integers(10, 30, 10).astype(float)
    b = a + rng.integers(-2, 3, 10)
    row = paired_test(a, b)
    assert row["p_wilcoxon"] == stats.wilcoxon(a, b).pvalue
    assert row["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert row["n"] == 10 and row["mean"] == pytest.approx(np.mean(a - b))
