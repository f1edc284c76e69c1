"""Report of a sweep: summary tables, paired init comparison, elbow and REPORT.md.

Reads the results Dataset written by the sweep (dims k × init × seed), ignores
every cell whose status is not "done", and writes figures (kmclust.report.figures) and a
Markdown report whose sentences are generated from the numbers it shows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from kmclust.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GRID = ("k", "init", "seed")
REQUIRED = (
    "jclust",
    "mean_distance",
    "n_iter",
    "n_relocated",
    "train_accuracy",
    "test_accuracy",
    "status",
    "cluster_size",
    "cluster_label",
    "centroids",
)
METRICS = (
    "jclust",
    "mean_distance",
    "n_iter",
    "n_relocated",
    "train_accuracy",
    "test_accuracy",
    "nmi",
    "ari",
    "acc",
    "seconds",
)
# metric, label, unit, better direction, decimals — for the init comparison
COMPARED = (
    ("jclust", "J_clust", "pixel intensity²", "lower", 3),
    ("test_accuracy", "test accuracy", "fraction correct", "higher", 3),
    ("n_iter", "Lloyd iterations", "count", "lower", 1),
)
_VERB = {
    "jclust": ("reaches lower J_clust", "is lower"),
    "test_accuracy": ("reaches higher test accuracy", "is higher"),
    "n_iter": ("needs fewer Lloyd iterations", "needs fewer"),
}
_BETTER = {m: better for m, _, _, better, _ in COMPARED}


# ----------------------------------------------------------------------------- loading
def open_results(results: xr.Dataset | str | Path) -> xr.Dataset:
    """Open (if a path) and validate a results Dataset; DataError if unusable."""
    if not isinstance(results, xr.Dataset):
        path = Path(results)
        if not path.exists():
            raise DataError(f"results store not found: {path}")
        try:
            with warnings.catch_warnings():  # stores without consolidated metadata are fine
                warnings.filterwarnings(
                    "ignore", message="Failed to open Zarr store with consolidated"
                )
                results = xr.open_zarr(path)
        except Exception as exc:  # zarr/xarray raise many types for a non-store
            raise DataError(f"cannot open results store {path}: {exc}") from exc
    missing = [d for d in GRID if d not in results.dims] + [v for v in REQUIRED if v not in results]
    if missing:
        raise DataError(f"results store lacks required dimensions/variables: {', '.join(missing)}")
    return results


def _strings(da: xr.DataArray) -> np.ndarray:
    """Values of a string variable as a numpy array of str (bytes decoded)."""
    vals = np.asarray(da.values, dtype=object)
    return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else str(s), otypes=[object])(
        vals
    )


def status_counts(ds: xr.Dataset) -> dict[str, int]:
    """Number of cells per status ("done", "failed", "pending", …)."""
    names, counts = np.unique(_strings(ds.status).astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def done_mask(ds: xr.Dataset) -> xr.DataArray:
    """True where a (k, init, seed) cell finished; everything else is ignored."""
    return xr.DataArray(_strings(ds.status) == "done", dims=ds.status.dims, coords=ds.status.coords)


def metric_values(ds: xr.Dataset) -> xr.Dataset:
    """The per-cell metrics as float (k, init, seed), NaN wherever the cell is not done."""
    done = done_mask(ds).transpose(*GRID)
    names = [m for m in METRICS if m in ds and set(ds[m].dims) == set(GRID)]
    return ds[names].transpose(*GRID).astype("f8").load().where(done)


def init_names(ds: xr.Dataset) -> list[str]:
    """The init coordinate as a list of str."""
    return [str(v) for v in _strings(ds.init)]


def attr_json(ds: xr.Dataset, name: str) -> dict:
    """A JSON-string (or mapping) attribute as a dict; {} if absent or malformed."""
    raw = ds.attrs.get(name, {})
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        return {}


def class_names(ds: xr.Dataset) -> list[str]:
    """Class names from the attrs (a list or a JSON list), or [] if absent."""
    raw = ds.attrs.get("class_names", [])
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = [raw]
    return [str(c) for c in np.atleast_1d(raw)]


# ----------------------------------------------------------------------------- tables
def summary_table(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (k, init): cell counts and mean/std over done seeds of every metric.

    Columns: n_done, n_failed, n_pending, <metric>_mean, <metric>_std (sample std,
    ddof=1; NaN with fewer than two done seeds) and n_relocated_sum.
    """
    vals, status = metric_values(ds), _strings(ds.status.transpose(*GRID))
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


def summary_inits(summary: pd.DataFrame) -> list[str]:
    """The inits of a summary_table in their store order."""
    return list(dict.fromkeys(summary.index.get_level_values("init")))


def _pm(mean: float, std: float, dec: int) -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.{dec}f}" if not np.isfinite(std) else f"{mean:.{dec}f} ± {std:.{dec}f}"


_SHOWN = (
    ("jclust", "J_clust", 3),
    ("mean_distance", "mean distance", 3),
    ("n_iter", "iterations", 1),
    ("test_accuracy", "test accuracy", 3),
    ("n_relocated", "relocations/run", 1),
)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The summary as strings "mean ± std" (the columns REPORT.md and the console show)."""
    out = pd.DataFrame(index=df.index)
    out["done"] = [f"{d}/{d + f + p}" for d, f, p in zip(df.n_done, df.n_failed, df.n_pending)]
    for m, label, dec in _SHOWN:
        out[label] = [_pm(a, b, dec) for a, b in zip(df[f"{m}_mean"], df[f"{m}_std"])]
    out["Σ relocations"] = [("—" if not np.isfinite(s) else f"{s:.0f}") for s in df.n_relocated_sum]
    return out.reset_index()


def format_table(df: pd.DataFrame) -> str:
    """A summary_table as fixed-width text for the console."""
    return display_table(df).to_string(index=False)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown table (no tabulate needed)."""
    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += [
        "| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics
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
                "p_wilcoxon": stats.wilcoxon(a, b).pvalue,
            }
    return row


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
    """paired_differences for every compared metric (J, test accuracy, iterations)."""
    return {m: paired_differences(vals, m, first, second) for m, *_ in COMPARED}


def conclusion(diff: pd.DataFrame, metric: str, first: str, second: str) -> str:
    """A plain sentence on who wins at how many k, and where the 95% CI excludes 0."""
    verb, short = _VERB[metric]
    d = diff[diff.n > 0]
    if d.empty:
        return f"not available: no k has values for both {first} and {second} (e.g. no test set)."
    # d = first − second; flip so that > 0 always favours `second`
    flip = 1.0 if _BETTER[metric] == "lower" else -1.0
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


def slug(name: str) -> str:
    """A file-name-safe form of an init name ("k-means||" → "k-means-par")."""
    s = name.replace("++", "-pp").replace("||", "-par")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "init"


def default_out_dir(store: str | Path) -> Path:
    """results/NAME.zarr → results/NAME-report/."""
    store = Path(store)
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
        f"{ds.attrs.get('n_train', '?')} training images (fitting and majority labels), "
        f"{ds.attrs.get('n_test', '?')} held-out test images; {len(classes)} classes"
        + (f" ({', '.join(classes)})." if classes else "."),
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
    status = _strings(ds.status.transpose(*GRID))
    error = _strings(ds.error.transpose(*GRID)) if "error" in ds else None
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
        wall = f"; {(datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds():.0f} s"
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
            "seeds where both cells are done. 95% confidence intervals are t-intervals and p-values "
            "two-sided paired t-tests (scipy.stats.ttest_rel), with Wilcoxon signed-rank p-values "
            "(scipy.stats.wilcoxon) beside them; per k, not corrected for multiple comparisons.",
            "",
            "**Conclusion.**",
            "",
        ]
        for m, label, unit, better, dec in COMPARED:
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
        for m, label, unit, better, dec in COMPARED:
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


def _choosing_k_section(summary, knees) -> list[str]:
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
    return lines


def _markdown(ds, vals, summary, comps, knees, counts, reps, figs, chosen: bool) -> str:
    name = ds.attrs.get("dataset") or attr_json(ds, "config").get("dataset", "?")
    lines = [f"# k-means sweep report: {name}", ""] + _run_section(ds, vals, counts)
    lines += [
        "## Results per k and initialisation",
        "",
        "Mean ± sample standard deviation (ddof = 1) over the done seeds of each cell. J_clust is "
        "the mean squared distance of an image to its centroid, mean distance the mean Euclidean "
        "distance (pixels scaled to [0, 1]); relocations are empty clusters re-seeded per run, "
        "Σ over all done seeds; test accuracy labels each cluster by the majority class of its "
        "training members. In the figures the line is the mean, the band ±1 s.d., dots are seeds.",
        "",
        markdown_table(display_table(summary)),
        "",
    ]
    for key, alt in (
        ("jclust", "J_clust vs k"),
        ("mean_distance", "mean distance vs k"),
        ("accuracy", "accuracy vs k"),
        ("n_iter", "iterations vs k"),
        ("n_relocated", "relocations vs k"),
    ):
        lines += [f"![{alt}]({figs[key]})", ""]
    lines += _comparison_section(summary, comps)
    if "comparison" in figs:
        lines += [f"![paired init comparison]({figs['comparison']})", ""]
    lines += _choosing_k_section(summary, knees)
    lines += [
        "## Cluster representatives",
        "",
        "Centroids drawn as 28 × 28 images (gray, 0 = black, 1 = white), titled with the majority "
        "class of the cluster's training members and their number; clusters sorted by label. "
        + (
            "Cell chosen on the command line."
            if chosen
            else "Per init: the largest k with a done cell and, among its done seeds, the one with the "
            "median J_clust (lower median for an even count)."
        ),
        "",
    ]
    for init, (k, seed) in reps.items():
        lines += [
            f"- {init}: k = {k}, seed = {seed}",
            "",
            f"![representatives {init}]({figs['rep:' + init]})",
            "",
        ]
    return "\n".join(lines)


def write_report(
    results: xr.Dataset | str | Path,
    out_dir: Path,
    *,
    representative: tuple[int, str, int] | None = None,
) -> Path:
    """Write the figures and REPORT.md for a results store into out_dir; return REPORT.md."""
    from kmclust.report import figures as plot  # lazy: summary_table users need no matplotlib

    ds = open_results(results)
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
