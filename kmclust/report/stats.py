"""Statistics of the report: paired comparison of inits over seeds, its conclusion, the elbow."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from kmclust.report.results import COMPARED

log = logging.getLogger(__name__)


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """a − b over the pairs where both are finite: n, mean, 95% t-interval, p-values.

    The interval and the paired t-test come from scipy.stats.ttest_rel, the
    Wilcoxon signed-rank p-value from scipy.stats.wilcoxon; with one pair (or
    identical differences) there is no interval and no p-value (NaN).
    """
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    row = {
        "n": int(d.size),
        "mean": d.mean() if d.size else np.nan,
        "ci_low": np.nan,
        "ci_high": np.nan,
        "p_ttest": np.nan,
        "p_wilcoxon": np.nan,
    }
    if d.size >= 2 and np.ptp(d) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_rel(a, b)
            ci = res.confidence_interval(0.95)
            row |= {
                "ci_low": ci.low,
                "ci_high": ci.high,
                "p_ttest": res.pvalue,
                "p_wilcoxon": wilcoxon_p(d),
            }
    return row


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the differences ``d``: the value
    ``scipy.stats.wilcoxon(d)`` gives (zero_method="wilcox", method="auto"), computed faster.

    With ties or zeros among at most 13 differences scipy runs a permutation test over all 2ⁿ
    sign patterns, one Python call per pattern (0.1–3 s a call; a report makes ~50 calls). The
    same exact null distribution is a convolution: zeros dropped, twice the midranks of |d| are
    integers, and each nonzero difference adds its doubled rank or nothing with probability ½.
    Elsewhere scipy's own exact or normal-approximation p-value is returned.
    """
    d = np.asarray(d, dtype=float)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(nonzero))
    ties = np.unique(ranks).size < ranks.size
    if d.size > 13 or not (ties or nonzero.size < d.size):
        return float(stats.wilcoxon(d).pvalue)
    twice = np.rint(2 * ranks).astype(np.int64)
    counts = np.zeros(int(twice.sum()) + 1, dtype=np.int64)  # patterns per value of 2·R+
    counts[0] = 1
    for r in twice:
        counts[r:] = counts[r:] + counts[: counts.size - r]
    observed = int(twice[nonzero > 0].sum())
    total = 2.0**nonzero.size
    less, greater = counts[: observed + 1].sum() / total, counts[observed:].sum() / total
    return float(min(1.0, 2 * min(less, greater)))


def paired_differences(vals: xr.Dataset, metric: str, first: str, second: str) -> pd.DataFrame:
    """Per k, paired_test of first − second over the seeds where both are done.

    attrs["pooled"] holds the same test over every (k, seed) pair of the grid.
    """
    x = vals[metric]
    a, b = (
        x.sel(init=first).transpose("k", "seed").values,
        x.sel(init=second).transpose("k", "seed").values,
    )
    df = pd.DataFrame([{"k": int(k)} | paired_test(a[i], b[i]) for i, k in enumerate(x.k.values)])
    df = df.set_index("k")
    df.attrs["pooled"] = paired_test(a.ravel(), b.ravel())
    return df


def compare_inits(vals: xr.Dataset, first: str, second: str) -> dict[str, pd.DataFrame]:
    """paired_differences for every compared metric (J, test accuracy, iterations) in ``vals``
    (unlabelled data have no accuracy)."""
    return {m: paired_differences(vals, m, first, second) for m, _ in COMPARED if m in vals}


def conclusion(diff: pd.DataFrame, metric: str, first: str, second: str) -> str:
    """A plain sentence on who wins at how many k, and where the 95% CI excludes 0."""
    compared = dict(COMPARED)[metric]
    verb, short = compared.wins, compared.beats
    d = diff[diff.n > 0]
    if d.empty:
        return f"not available: no k has values for both {first} and {second} (e.g. no test set)."
    # d = first − second; flip so that > 0 always favours `second`
    flip = 1.0 if compared.better == "lower" else -1.0
    s = flip * d["mean"]
    lo, hi = (d.ci_low, d.ci_high) if flip > 0 else (-d.ci_high, -d.ci_low)
    wins, losses, n = int((s > 0).sum()), int((s < 0).sum()), len(d)
    have_ci = bool(np.isfinite(lo).any())
    ci = (lambda c: f" (95% CI excludes 0 at {c})") if have_ci else (lambda c: "")
    text = (
        f"{second} init {verb} than {first} at {wins} of {n} values of k{ci(int((lo > 0).sum()))}"
    )
    text += f"; {first} {short} at {losses}" + (ci(int((hi < 0).sum())) if losses else "")
    text += f"; equal at {n - wins - losses}" if n - wins - losses else ""
    if not have_ci:
        text += " (no confidence intervals: " + (
            "one seed per cell)" if (d.n <= 1).all() else "differences identical across seeds)"
        )
    return text + "."


def elbow(ks, values) -> int | None:
    """Elbow of a curve: the k farthest from the chord joining its end points.

    Both axes are scaled to [0, 1] first (the "kneedle" idea of Satopää et
    al. 2011, without smoothing). None for fewer than 3 finite points or a line.
    """
    x, y = np.asarray(ks, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[ok])
    x, y = x[ok][order], y[ok][order]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    xn, yn = (x - x[0]) / np.ptp(x), (y - y.min()) / np.ptp(y)
    dx, dy = xn[-1] - xn[0], yn[-1] - yn[0]
    dist = np.abs(dx * (yn - yn[0]) - dy * (xn - xn[0])) / math.hypot(dx, dy)
    return int(x[np.argmax(dist)]) if dist.max() > 1e-12 else None
