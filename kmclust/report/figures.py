"""Figures of the sweep report — the only module that imports matplotlib.

Uses matplotlib's object-oriented API on the Agg canvas (no pyplot, no global
backend switch), so it is safe in headless jobs, threads and CI. The drawing
functions take plain numbers (summary DataFrames, numpy arrays) and each write
one 150 dpi PNG; report_figures picks what to draw from a results Dataset.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from kmclust.report.results import (
    COMPARED,
    attr_json,
    class_names,
    image_dims,
    init_names,
    slug,
    summary_inits,
)
from kmclust.sweep.schema import VARIABLES

log = logging.getLogger(__name__)

DPI = 150
#: The representatives grid, in inches: suptitle band on top, each panel's two-line title, the
#: colour bar's column on the right.
REP_TOP, REP_TITLE, REP_BAR = 0.55, 0.45, 0.9
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
BAND = "±1 s.d. over seeds"


@dataclass(frozen=True)
class Figures:
    """The report's figures: file names relative to the report folder."""

    vs_k: tuple[tuple[str, str], ...]  # (alt text, file) of each metric drawn against k
    comparison: str | None  # the paired init comparison (None with a single init)
    representatives: dict[str, str]  # init → its cluster representatives


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    log.info("wrote %s", path)
    return path


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


def _k_axis(ax) -> None:
    ax.set_xlabel("k (number of clusters)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def metric_vs_k(
    summary: pd.DataFrame,
    per_seed: np.ndarray,
    metric: str,
    *,
    ylabel: str,
    title: str,
    path: Path,
    knees: Mapping[str, int | None] | None = None,
    hline: tuple[float, str] | None = None,
) -> Path:
    """Mean over done seeds per init (line), ±1 s.d. band, each seed as a dot.

    per_seed: array (k, init, seed) in the order of the summary's k and inits, NaN
    where a cell is not done. knees: init → k to mark with a star (elbow).
    """
    fig = _figure(8.0, 4.4)
    ax = fig.add_subplot()
    inits = summary_inits(summary)
    floor = 0.0 if np.nanmin(per_seed, initial=np.inf) >= 0 else -np.inf  # no band below 0
    handles = []
    for i, init in enumerate(inits):
        sub = summary.xs(init, level="init")
        ks, m, s = sub.index.to_numpy(float), sub[f"{metric}_mean"], sub[f"{metric}_std"]
        st = _style(i)
        (line,) = ax.plot(ks, m, label=init, ms=5, **st)
        handles.append(line)
        ax.fill_between(
            ks, np.maximum(m - s, floor), m + s, color=st["color"], alpha=0.18, linewidth=0
        )
        dots = per_seed[:, i, :]
        xs = np.broadcast_to((ks + 0.12 * (i - (len(inits) - 1) / 2))[:, None], dots.shape)
        ax.scatter(xs, dots, s=7, color=st["color"], alpha=0.45, linewidths=0)
        knee = (knees or {}).get(init)
        if knee is not None:
            ax.plot(
                [knee],
                [m.loc[knee]],
                marker="*",
                ms=15,
                color=st["color"],
                mec="black",
                ls="",
                zorder=5,
            )
    if hline is not None:
        ax.axhline(hline[0], color="gray", ls=":", lw=1)
        handles.append(Line2D([], [], color="gray", ls=":", label=hline[1]))
    handles.append(Patch(color="gray", alpha=0.25, label=BAND))
    handles.append(Line2D([], [], color="gray", marker="o", ls="", ms=3, label="single seed"))
    if knees and any(v is not None for v in knees.values()):
        handles.append(
            Line2D(
                [],
                [],
                color="gray",
                marker="*",
                mec="black",
                ls="",
                ms=10,
                label="elbow (max. distance to chord)",
            )
        )
    ax.legend(
        handles=handles,
        title="init (line: mean over seeds)",
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _k_axis(ax)
    return _save(fig, path)


def accuracy_vs_k(summary: pd.DataFrame, *, title: str, path: Path) -> Path:
    """Test accuracy (solid, ±1 s.d. band) and train accuracy (dashed) per init vs k."""
    fig = _figure(8.0, 4.4)
    ax = fig.add_subplot()
    no_test = not np.isfinite(summary["test_accuracy_mean"]).any()
    for i, init in enumerate(summary_inits(summary)):
        sub = summary.xs(init, level="init")
        ks, st = sub.index.to_numpy(float), _style(i)
        if not no_test:
            m, s = sub.test_accuracy_mean, sub.test_accuracy_std
            ax.plot(ks, m, label=f"{init}: test (held out)", ms=5, **st)
            ax.fill_between(ks, m - s, m + s, color=st["color"], alpha=0.18, linewidth=0)
        ax.plot(
            ks, sub.train_accuracy_mean, ls="--", label=f"{init}: train", ms=4, mfc="white", **st
        )
    ax.set_ylabel("majority-label accuracy (fraction correct)")
    ax.set_title(title + ("\n(no test set in this store: train only)" if no_test else ""))
    ax.legend(
        fontsize=8,
        title=None if no_test else f"band: {BAND} (test)",
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    _k_axis(ax)
    return _save(fig, path)


def init_comparison(
    comps: Mapping[str, Mapping[str, pd.DataFrame]],
    panels: Sequence[tuple[str, str]],
    *,
    title: str,
    path: Path,
) -> Path:
    """Paired differences per k with 95% t-intervals, one panel per metric.

    comps: pair label ("random − data") → metric → DataFrame (index k; mean,
    ci_low, ci_high, n). panels: (metric, y-axis label) in panel order.
    """
    fig = _figure(4.3 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    n_pairs = len(comps)
    step = min(0.12 * n_pairs, 0.6) / n_pairs  # spread the pairs' markers around each k
    all_k = np.concatenate([c[m].index.to_numpy(float) for c in comps.values() for m, _ in panels])
    for ax, (metric, ylabel) in zip(axes, panels):
        any_ci = False
        ax.set_xlim(all_k.min() - 0.6, all_k.max() + 0.6)
        for i, (label, comp) in enumerate(comps.items()):
            d = comp[metric]
            ks = d.index.to_numpy(float) + step * (i - (n_pairs - 1) / 2)
            err = np.vstack([d["mean"] - d.ci_low, d.ci_high - d["mean"]])
            any_ci |= bool(np.isfinite(err).any())
            st = _style(i + 1)
            ax.errorbar(
                ks,
                d["mean"],
                yerr=np.nan_to_num(err, nan=0.0),
                fmt=st["marker"],
                color=st["color"],
                capsize=3,
                ms=5,
                label=label,
            )
        ax.axhline(0.0, color="black", lw=0.8, ls="--")
        ax.set_ylabel(ylabel)
        _k_axis(ax)
        if not any(np.isfinite(c[metric]["mean"]).any() for c in comps.values()):
            ax.set_yticks([])
            ax.text(
                0.5,
                0.6,
                "no data\n(e.g. no test set)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                bbox={"facecolor": "white", "edgecolor": "gray"},
            )
        elif not any_ci:
            ax.text(
                0.02,
                0.97,
                "one seed per cell: no interval",
                va="top",
                fontsize=8,
                transform=ax.transAxes,
            )
    axes[0].legend(fontsize=8, title="difference (same seed)", title_fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def representatives(
    images: np.ndarray,
    sizes: np.ndarray,
    names: Sequence[str],
    empty: np.ndarray,
    *,
    title: str,
    path: Path,
) -> Path:
    """A grid of centroid images ([0, 1]) in their own size and colour, titled with label name
    and size.

    images (k, h, w) gray or (k, h, w, c) with a channel dim: c = 3 is drawn as RGB, c = 1
    as gray, other c as the channels' mean; sizes (k,) training images per cluster; names (k,)
    the majority label's class name; empty (k,) True for an empty cluster (drawn with a red
    frame and titled "empty"). Clusters are drawn in the given order.
    """
    images = _drawable(np.asarray(images, dtype=float))
    colour = images.ndim == 4
    k = len(images)
    ncols = min(k, max(5, math.ceil(math.sqrt(k))))
    nrows = math.ceil(k / ncols)
    aspect = images.shape[1] / images.shape[2]  # height / width of one image
    panel = 0.25 + 1.45 * min(max(aspect, 0.5), 2.0)  # title + image, 1.7 for square images
    bar = 0.0 if colour else REP_BAR  # room for the colour bar on the right (gray only)
    width, height = max(1.45 * ncols + 0.2 + bar, 6.5), panel * nrows + REP_TOP + 0.1
    fig = _figure(width, height, layout=None)  # fixed geometry: constrained layout took 3/4 of it
    grid = fig.add_gridspec(
        nrows, ncols, left=0.1 / width, right=1 - (0.1 + bar) / width, bottom=0.1 / height,
        top=1 - (REP_TOP + REP_TITLE) / height,  # the first row's titles below the band
        hspace=REP_TITLE / (panel - REP_TITLE), wspace=0.1,  # each panel's title above its image
    )  # fmt: skip
    axes = grid.subplots(squeeze=False)
    im = None
    for idx, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if idx >= k:
            ax.set_axis_off()
            continue
        im = ax.imshow(images[idx], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        if colour:  # RGB: no colour map, hence no colour bar
            im = None
        if empty[idx]:
            ax.set_title("empty cluster", fontsize=9, color="red")
            for spine in ax.spines.values():
                spine.set(color="red", linewidth=2)
        else:
            ax.set_title(f"{names[idx]}\nn = {sizes[idx]:.0f}", fontsize=9)
    if im is not None:
        grid_h = (panel * nrows - REP_TITLE) / height  # the bar: half the grid's height, centred
        cax = fig.add_axes(
            ((width - bar + 0.15) / width, 0.1 / height + grid_h / 4, 0.15 / width, grid_h / 2)
        )
        fig.colorbar(im, cax=cax, label="pixel intensity (0–1)")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _drawable(images: np.ndarray) -> np.ndarray:
    """(k, h, w) gray or (k, h, w, 3) RGB in [0, 1] from centroids with or without channels."""
    if images.ndim == 4 and images.shape[-1] != 3:
        images = images.mean(axis=-1)  # one channel (or an unusual count): gray
    if images.ndim == 4:  # RGB: imshow wants finite values in [0, 1] (gray NaN is left blank)
        images = np.nan_to_num(images)
    return np.clip(images, 0.0, 1.0)


# ----------------------------------------------------------------------------- the report's figures
def _cell(ds: xr.Dataset, k: int, init: str, seed: int) -> xr.Dataset:
    """The per-cluster variables of one cell, clusters 0…k−1 only, loaded."""
    sel = {
        "k": int(np.flatnonzero(ds.k.values == k)[0]),
        "init": init_names(ds).index(init),
        "seed": int(np.flatnonzero(ds.seed.values == seed)[0]),
    }
    names = [n for n in ("centroids", "cluster_size", "cluster_label") if n in ds]
    return ds[names].isel(sel).isel(cluster=slice(0, k)).load()


def report_figures(
    ds: xr.Dataset,
    vals: xr.Dataset,
    summary: pd.DataFrame,
    comps: Mapping[tuple[str, str], Mapping[str, pd.DataFrame]],
    knees: Mapping[str, int | None],
    reps: Mapping[str, tuple[int, int]],
    out: Path,
) -> Figures:
    """Draw every figure of the report into out: the metrics the results schema plots against
    k, accuracy, the init comparison and each init's representatives.

    vals: metric_values (NaN where not done); summary: summary_table; comps:
    (first, second) → compare_inits; knees: init → elbow k; reps: init → (k, seed).
    """
    name = ds.attrs.get("dataset", "")
    n = vals.sizes["seed"]
    config = attr_json(ds, "config")
    vs_k = []
    for var in VARIABLES:
        plot = var.plot
        if plot is None or var.name not in vals or not np.isfinite(vals[var.name].values).any():
            continue  # not in this store, or not computed (an older store, silhouette off)
        extra: dict = {"knees": knees} if plot.knees else {}
        if plot.cap is not None:
            cap = float(config.get(plot.cap, np.nan))
            if np.nanmax(vals[var.name].values) >= cap:
                extra["hline"] = (cap, plot.cap)
        metric_vs_k(
            summary,
            vals[var.name].values,
            var.name,
            ylabel=plot.ylabel,
            path=out / plot.file,
            title=f"{plot.title} — {name}, {n} seed(s)",
            **extra,
        )
        vs_k.append((plot.alt, plot.file))
    if "test_accuracy_mean" in summary:  # unlabelled data have no accuracy
        accuracy = "accuracy_vs_k.png"
        accuracy_vs_k(summary, title=f"Majority-label accuracy vs k — {name}", path=out / accuracy)
        vs_k.append(("accuracy vs k", accuracy))
    comparison = None
    if comps:
        comparison = "init_comparison.png"
        init_comparison(
            {f"{a} − {b}": c for (a, b), c in comps.items()},
            [(m, f"Δ {c.label} ({c.unit})") for m, c in COMPARED if m in vals],
            path=out / comparison,
            title="Paired differences between inits for the same seed: mean and 95% "
            f"t-interval — {name}\n(above 0: the first init has the larger value)",
        )
    drawn = {
        init: _draw_representatives(ds, vals, init, k, seed, out)
        for init, (k, seed) in reps.items()
    }
    return Figures(tuple(vs_k), comparison, drawn)


def _draw_representatives(
    ds: xr.Dataset, vals: xr.Dataset, init: str, k: int, seed: int, out: Path
) -> str:
    """Draw the centroids of one cell, sorted by label; return the file name."""
    name, classes = ds.attrs.get("dataset", ""), class_names(ds)
    cell = _cell(ds, k, init, seed)
    size, unlabelled = cell.cluster_size.values, "cluster_label" not in cell  # no majority
    label = np.arange(len(size)) if unlabelled else cell.cluster_label.values
    empty = ~(size > 0) | (label < 0)
    names = [
        f"cluster {v}" if unlabelled else classes[int(v)] if 0 <= v < len(classes) else str(int(v))
        for v in np.nan_to_num(label, nan=-1)
    ]
    order = np.lexsort((-np.nan_to_num(size), np.where(empty, np.inf, label)))
    j = vals.jclust.sel(k=k, init=init, seed=seed).item()
    acc = np.nan if unlabelled else vals.test_accuracy.sel(k=k, init=init, seed=seed).item()
    acc_text = f"test accuracy = {acc:.3f}" if np.isfinite(acc) else "no test set"
    file = f"representatives_{slug(init)}.png"
    representatives(
        cell.centroids.transpose("cluster", *image_dims(ds)).values[order],
        size[order],
        [names[i] for i in order],
        empty[order],
        path=out / file,
        title=f"Cluster centroids — {name}, k = {k}, init = {init}, seed = {seed}\n"
        f"J_clust = {j:.3f}, {'unlabelled data' if unlabelled else acc_text}; title: "
        f"{'cluster' if unlabelled else 'majority label'}, n = training images in the cluster",
    )
    return file
