"""Report of a sweep: summary tables, paired init comparison, elbow and REPORT.md.

Reads the results Dataset written by the sweep (dims k × init × seed), ignores
every cell whose status is not "done", and writes figures (kmclust.report.figures) and a
Markdown report whose sentences are generated from the numbers it shows.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import xarray as xr

from kmclust.errors import ConfigError, DataError
from kmclust.location import locate
from kmclust.report.choosing_k import INDEX_FIGURES, choosing_k_section
from kmclust.report.markdown import markdown_table, pm
from kmclust.report.results import (
    COMPARED,
    GRID,
    attr_json,
    class_names,
    image_shape,
    init_names,
    labelled,
    metric_values,
    open_results,
    status_counts,
    strings,
)
from kmclust.report.stats import compare_inits, conclusion, elbow
from kmclust.sweep.schema import VARIABLES

if TYPE_CHECKING:
    from kmclust.report.figures import Figures

log = logging.getLogger(__name__)

#: the columns of the report's table: (variable, heading and decimals)
SHOWN = tuple((v.name, v.shown) for v in VARIABLES if v.shown)


# ----------------------------------------------------------------------------- tables
def summary_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (k, init): cell counts and mean/std over done seeds of every metric.

    Columns: n_done, n_failed, n_pending, <metric>_mean, <metric>_std (sample std,
    ddof=1; NaN with fewer than two done seeds) and n_relocated_sum.
    """
    vals, status = metric_values(ds), strings(ds.status.transpose(*GRID))
    rows = []
    for a, k in enumerate(ds.k.values):
        for b, init in enumerate(init_names(ds)):
            st = status[a, b]
            row: dict = {
                "k": int(k),
                "init": init,
                "n_done": int((st == "done").sum()),
                "n_failed": int((st == "failed").sum()),
            }
            row["n_pending"] = st.size - row["n_done"] - row["n_failed"]
            for m in vals.data_vars:
                x = vals[m].values[a, b]
                x = x[np.isfinite(x)]
                row[f"{m}_mean"] = x.mean() if x.size else np.nan
                row[f"{m}_std"] = x.std(ddof=1) if x.size > 1 else np.nan
                if m == "n_relocated":
                    row["n_relocated_sum"] = x.sum() if x.size else np.nan
            rows.append(row)
    return pd.DataFrame(rows).set_index(["k", "init"])


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings "mean ± std" (the columns REPORT.md and the console show)."""
    out = pd.DataFrame(index=df.index)
    out["done"] = [f"{d}/{d + f + p}" for d, f, p in zip(df.n_done, df.n_failed, df.n_pending)]
    for m, (label, dec) in SHOWN:
        if f"{m}_mean" not in df:  # a label metric of unlabelled data
            continue
        out[label] = [pm(a, b, dec) for a, b in zip(df[f"{m}_mean"], df[f"{m}_std"])]
    out["Σ relocations"] = [("—" if not np.isfinite(s) else f"{s:.0f}") for s in df.n_relocated_sum]
    return out.reset_index()


def format_table(df: pd.DataFrame) -> str:
    """A summary_table as fixed-width text for the console."""
    return display_table(df).to_string(index=False)


# ----------------------------------------------------------------------------- representatives
def choose_representatives(
    ds: xr.Dataset, vals: xr.Dataset, representative: tuple[int, str, int] | None = None
) -> dict[str, tuple[int, int]]:
    """init → (k, seed) to draw: the given cell, or per init the largest k with a done
    seed and, among its done seeds, the one with the median J (lower median if even)."""
    if representative is not None:
        k, init, seed = representative
        for name, value, options in (
            ("k", k, vals.k.values.tolist()),
            ("init", init, init_names(ds)),
            ("seed", seed, vals.seed.values.tolist()),
        ):
            if value not in options:
                raise ConfigError(f"--{name} {value} is not in the store (has {options})")
        if not np.isfinite(vals.jclust.sel(k=k, init=init, seed=seed).item()):
            raise ConfigError(
                f"cell k={k}, init={init}, seed={seed} is not done; choose a done cell"
            )
        return {init: (int(k), int(seed))}
    chosen = {}
    for init in init_names(ds):
        for k in sorted(vals.k.values.tolist(), reverse=True):
            j = vals.jclust.sel(k=k, init=init)
            ok = np.isfinite(j.values)
            if ok.any():
                order = np.argsort(j.values[ok], kind="stable")
                chosen[init] = (int(k), int(j.seed.values[ok][order[(ok.sum() - 1) // 2]]))
                break
    return chosen


def default_out_dir(store: str | Path) -> Path:
    """results/NAME.zarr → results/NAME-report/; a URL …/NAME.zarr → results/NAME-report/."""
    where = locate(store)
    if not where.is_local:
        return Path("results") / f"{where.name.removesuffix('.zarr')}-report"
    store = where.path
    return store.parent / f"{store.name.removesuffix('.zarr')}-report"


# ----------------------------------------------------------------------------- the report
def _fmt_p(p: float) -> str:
    return "—" if not np.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _p_rel(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _run_section(ds, vals, counts) -> list[str]:
    cfg, versions = attr_json(ds, "config"), attr_json(ds, "versions")
    name, classes = ds.attrs.get("dataset") or cfg.get("dataset", "?"), class_names(ds)
    ks, inits = vals.k.values, init_names(ds)
    total, done = sum(counts.values()), counts.get("done", 0)
    failed = counts.get("failed", 0)
    others = ", ".join(f"{c} {s}" for s, c in counts.items() if s not in ("done", "failed"))
    lines = [
        "## What was run",
        "",
        f"- **Data**: `{name}`, fingerprint `{ds.attrs.get('fingerprint', '?')}`; "
        f"{ds.attrs.get('n_train', '?')} training images (fitting"
        + (" and majority labels), " if labelled(ds) else "), ")
        + f"{ds.attrs.get('n_test', '?')} held-out test images; "
        + (
            f"{len(classes)} classes" + (f" ({', '.join(classes)})." if classes else ".")
            if labelled(ds)
            else "**unlabelled** (no class labels: no accuracy, NMI, ARI, purity or majority "
            "labels; the label-free indices in Choosing k still apply)."
        ),
        f"- **Grid**: {len(ks)} values of k ({ks.min()}–{ks.max()}) × {len(inits)} "
        f"initialisations ({', '.join(inits)}) × {vals.sizes['seed']} seeds = {total} cells; "
        + ", ".join(
            f"{key} = {cfg[key]}"
            for key in ("tol", "max_iter", "train_per_class", "data_seed")
            if key in cfg
        )
        + ".",
        f"- **Cells**: {done} done, {failed} failed"
        + (f", {others}" if others else ", 0 pending")
        + ". Cells not done are left out of every table and figure.",
    ]
    status = strings(ds.status.transpose(*GRID))
    error = strings(ds.error.transpose(*GRID)) if "error" in ds else None
    bad = np.argwhere(status != "done")
    for a, b, c in bad[:20]:
        msg = f" — {error[a, b, c]}" if error is not None and error[a, b, c] else ""
        lines.append(
            f"  - k = {ds.k.values[a]}, init = {inits[b]}, seed = {ds.seed.values[c]}: "
            f"{status[a, b, c]}{msg}"
        )
    if len(bad) > 20:
        lines.append(f"  - … and {len(bad) - 20} more")
    started, finished = ds.attrs.get("started") or "?", ds.attrs.get("finished") or "not finished"
    try:
        seconds = datetime.fromisoformat(finished) - datetime.fromisoformat(started)
        wall = f"; {seconds.total_seconds():.0f} s"
    except (TypeError, ValueError):
        wall = ""
    lines += [
        f"- **Time**: started {started}, finished {finished}{wall}.",
        "- **Versions**: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"),
        "",
    ]
    return lines


def _comparison_section(summary, comps) -> list[str]:
    lines = []
    for (first, second), comp in comps.items():
        lines += [
            f"## Initialisation: {first} vs {second} (paired over seeds)",
            "",
            f"Differences are {first} − {second} between runs with the same seed, per k, over the "
            "seeds where both cells are done. 95% confidence intervals are t-intervals and "
            "p-values two-sided paired t-tests (scipy.stats.ttest_rel), with Wilcoxon signed-rank "
            "p-values (scipy.stats.wilcoxon) beside them; per k, not corrected for multiple "
            "comparisons.",
            "",
            "**Conclusion.**",
            "",
        ]
        for m, (label, unit, _, dec, *_) in COMPARED:
            if m not in comp:  # a label metric of unlabelled data
                continue
            d = comp[m]
            lines.append(f"- {label}: " + conclusion(d, m, first, second))
            p = d.attrs["pooled"]
            if p["n"]:
                lines[-1] += (
                    f" Pooled over all {p['n']} (k, seed) pairs: {first} − {second} = "
                    f"{p['mean']:+.{dec}f} ({unit})"
                )
                lines[-1] += (
                    f", 95% CI [{p['ci_low']:+.{dec}f}, {p['ci_high']:+.{dec}f}], paired t "
                    f"p {_p_rel(p['p_ttest'])}, Wilcoxon p {_p_rel(p['p_wilcoxon'])}."
                    if np.isfinite(p["ci_low"])
                    else "."
                )
        rel = [
            f"{i} {summary.xs(i, level='init').n_relocated_mean.mean():.2f}"
            for i in (first, second)
        ]
        lines += [f"- Empty-cluster relocations per run, averaged over k: {', '.join(rel)}.", ""]
        for m, (label, unit, better, dec, *_) in COMPARED:
            if m not in comp:
                continue
            d = comp[m]
            rows = [
                [
                    str(k),
                    str(int(r["n"])),
                    "—" if not np.isfinite(r["mean"]) else f"{r['mean']:+.{dec}f}",
                    "—"
                    if not np.isfinite(r.ci_low)
                    else f"[{r.ci_low:+.{dec}f}, {r.ci_high:+.{dec}f}]",
                    _fmt_p(r.p_ttest),
                    _fmt_p(r.p_wilcoxon),
                ]
                for k, r in d.iterrows()
            ]
            lines += [
                f"### Δ {label} ({unit}; {better} is better)",
                "",
                markdown_table(
                    pd.DataFrame(
                        rows,
                        columns=["k", "seeds", "mean Δ", "95% CI", "p (paired t)", "p (Wilcoxon)"],
                    )
                ),
                "",
            ]
        single = (comp["jclust"].n <= 1).all()
        lines += [
            "— : no interval or p-value (fewer than two paired seeds, or identical differences)."
            + (" With one seed per cell there are none at all." if single else ""),
            "",
        ]
    return lines


def _markdown(ds, vals, summary, comps, knees, counts, reps, figs: Figures, chosen: bool) -> str:
    name = ds.attrs.get("dataset") or attr_json(ds, "config").get("dataset", "?")
    lines = [f"# k-means sweep report: {name}", ""] + _run_section(ds, vals, counts)
    lines += [
        "## Results per k and initialisation",
        "",
        "Mean ± sample standard deviation (ddof = 1) over the done seeds of each cell. J_clust is "
        "the mean squared distance of an image to its centroid, mean distance the mean Euclidean "
        "distance (pixels scaled to [0, 1]); relocations are empty clusters re-seeded per run, "
        "Σ over all done seeds; "
        + (
            "test accuracy labels each cluster by the majority class of its training members."
            if labelled(ds)
            else "the data are unlabelled, so there is no accuracy."
        )
        + " In the figures the line is the mean, the band ±1 s.d., dots are seeds.",
        "",
        markdown_table(display_table(summary)),
        "",
    ]
    for alt, file in figs.vs_k:
        if file not in INDEX_FIGURES:
            lines += [f"![{alt}]({file})", ""]
    lines += _comparison_section(summary, comps)
    if figs.comparison is not None:
        lines += [f"![paired init comparison]({figs.comparison})", ""]
    lines += choosing_k_section(summary, knees, figs)
    lines += [
        "## Cluster representatives",
        "",
        f"Centroids drawn as {' × '.join(map(str, image_shape(ds)))} images "
        + (
            "(RGB, 0–1 per channel)"
            if "channel" in ds["centroids"].dims
            else "(gray, 0 = black, 1 = white)"
        )
        + (
            ", titled with the majority class of the cluster's training members and their "
            "number; clusters sorted by label. "
            if labelled(ds)
            else ", titled with the cluster's number and its training members (no labels). "
        )
        + (
            "Cell chosen on the command line."
            if chosen
            else "Per init: the largest k with a done cell and, among its done seeds, the one "
            "with the median J_clust (lower median for an even count)."
        ),
        "",
    ]
    for init, (k, seed) in reps.items():
        lines += [
            f"- {init}: k = {k}, seed = {seed}",
            "",
            f"![representatives {init}]({figs.representatives[init]})",
            "",
        ]
    return "\n".join(lines)


def write_report(
    results: xr.Dataset | str | Path,
    out_dir: Path,
    *,
    representative: tuple[int, str, int] | None = None,
    storage_options: dict | None = None,
) -> Path:
    """Write the figures and REPORT.md for a results store (a path, an fsspec URL or a Dataset)
    into the local folder out_dir; return REPORT.md."""
    from kmclust.report import figures as plot  # lazy: summary_table users need no matplotlib

    ds = open_results(results, storage_options)
    counts = status_counts(ds)
    if counts.get("done", 0) == 0:
        raise DataError(f"no cell of the results store is done ({counts}); nothing to report")
    vals, summary, inits = metric_values(ds), summary_table(ds), init_names(ds)
    reps = choose_representatives(ds, vals, representative)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the report folder {out_dir}: {exc.strerror or exc}"
        ) from None
    comps = {(inits[0], other): compare_inits(vals, inits[0], other) for other in inits[1:]}
    knees = {}
    for init in inits:
        sub = summary.xs(init, level="init")
        knees[init] = elbow(sub.index, sub.jclust_mean)
    figs = plot.report_figures(ds, vals, summary, comps, knees, reps, out_dir)
    path = out_dir / "REPORT.md"
    md = _markdown(
        ds, vals, summary, comps, knees, counts, reps, figs, chosen=representative is not None
    )
    path.write_text(md, encoding="utf-8")
    log.info("wrote %s", path)
    return path
