"""The report's "Choosing k" section: why J cannot choose k, the elbow, held-out accuracy, and
the label-free indices (Davies–Bouldin, Calinski–Harabasz, silhouette) with the k each picks.

Split from kmclust.report.document so that module stays short enough to read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kmclust.report.markdown import markdown_table, pm
from kmclust.report.results import summary_inits
from kmclust.sweep.schema import VARIABLES

if TYPE_CHECKING:
    from kmclust.report.figures import Figures

#: label-free indices for choosing k: (variable, name, which k they pick, decimals)
INDICES = (
    ("davies_bouldin", "Davies–Bouldin", "lowest", 3),
    ("calinski_harabasz", "Calinski–Harabasz", "highest", 1),
    ("silhouette", "silhouette", "highest", 3),
)
#: their figures, shown in the choosing-k section rather than with the table
INDEX_FIGURES = {v.plot.file for v in VARIABLES if v.plot and v.name in {i[0] for i in INDICES}}


def _index_lines(summary, figs: Figures) -> list[str]:
    """The label-free indices per k and init (mean ± s.d.) and the k each one picks."""
    indices = [
        i for i in INDICES if f"{i[0]}_mean" in summary and summary[f"{i[0]}_mean"].notna().any()
    ]
    lines = ["**Label-free indices.**", ""]
    if not indices:
        return lines + ["Not in this store (written before they were computed).", ""]
    lines += [
        "Computed on the training images with each run's final clusters (centres: the means of "
        "their members): Davies–Bouldin (mean over clusters of the worst ratio of spreads to "
        "the distance between centres; lower is better), Calinski–Harabasz (between- over "
        "within-cluster dispersion, each per degree of freedom; higher is better) and the mean "
        "silhouette of a seeded sample of training images (at most the config's "
        "silhouette_sample; the same rows for every k and init of a seed; higher is better). "
        "Mean ± s.d. over the done seeds:",
        "",
    ]
    table = pd.DataFrame(index=summary.index)
    for m, name, _, dec in indices:
        table[name] = [pm(a, b, dec) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    lines += [markdown_table(table.reset_index()), ""]
    for init in summary_inits(summary):
        sub = summary.xs(init, level="init")
        picks = []
        for m, name, pick, _ in indices:
            means = sub[f"{m}_mean"].dropna()
            if not means.empty:
                best = means.idxmin() if pick == "lowest" else means.idxmax()
                picks.append(f"{name} ({pick}) k = {best}")
        if picks:
            lines.append(f"- {init}: " + "; ".join(picks) + ".")
    lines += [
        "",
        "Each index carries its own preference in k; where they disagree, none of them "
        "settles k on its own.",
        "",
    ]
    for alt, file in figs.vs_k:
        if file in INDEX_FIGURES:
            lines += [f"![{alt}]({file})", ""]
    return lines


def choosing_k_section(summary, knees, figs: Figures) -> list[str]:
    """The section's Markdown lines, from the summary table and each init's elbow k."""
    lines = [
        "## Choosing k",
        "",
        "The minimum of J_clust is not a choice of k: adding a cluster can only lower the best "
        "achievable J (the new centroid can take over the points it is closest to), and at k = N "
        "every image is its own centroid with J = 0. So J is smallest at the largest k tried:",
        "",
    ]
    for init in summary_inits(summary):
        j = summary.xs(init, level="init").jclust_mean.dropna()
        if len(j) >= 2:
            falls = int((np.diff(j.to_numpy()) < 0).sum())
            lines.append(
                f"- {init}: mean J_clust {j.iloc[0]:.3f} at k = {j.index[0]} → {j.iloc[-1]:.3f} "
                f"at k = {j.index[-1]}; it falls at {falls} of {len(j) - 1} steps in k."
            )
    lines += [
        "",
        "**Elbow estimate.** The k whose point on the mean-J-vs-k curve lies farthest from the "
        "chord joining the curve's end points, both axes scaled to [0, 1] (the kneedle "
        "construction): "
        + "; ".join(
            f"{i}: k = {knees[i] if knees[i] is not None else 'none'}"
            for i in summary_inits(summary)
        )
        + " (★ in the J figure). It is a heuristic: it moves with the range of k tried, and a "
        "smooth curve has only a weak elbow.",
        "",
        "**Held-out accuracy.**",
        "",
    ]
    if "test_accuracy_mean" not in summary:
        lines += ["None: the data are unlabelled. The label-free indices below remain.", ""]
        return lines + _index_lines(summary, figs)
    if not np.isfinite(summary.test_accuracy_mean).any():
        lines += ["No held-out test set in this store: training accuracy (optimistic) instead.", ""]
    for init in summary_inits(summary):
        sub = summary.xs(init, level="init")
        col = "test_accuracy" if np.isfinite(sub.test_accuracy_mean).any() else "train_accuracy"
        m, sd, n = sub[f"{col}_mean"].dropna(), sub[f"{col}_std"], sub.n_done
        if m.empty:
            continue
        best = m.idxmax()
        se = sd[best] / math.sqrt(n[best]) if np.isfinite(sd[best]) else 0.0
        small = int(m[m >= m[best] - se].index.min())
        lines.append(
            f"- {init}: {col.replace('_', ' ')} {m.iloc[0]:.3f} at k = {m.index[0]} → "
            f"{m.iloc[-1]:.3f} at k = {m.index[-1]}; best {m[best]:.3f} at k = {best}; the "
            f"smallest k within one standard error of the best is k = {small}."
        )
    lines += [
        "",
        "Majority labelling gets finer as k grows, so accuracy also tends to favour large k; "
        "the gain per added cluster (and the train–test gap) is what to weigh against the cost "
        "of more clusters.",
        "",
    ]
    return lines + _index_lines(summary, figs)
