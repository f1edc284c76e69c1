"""Tests of the sweep report: figures, REPORT.md, statistics, masking and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from results_factory import ABSURD, make_results
from scipy import stats

from kmclust.errors import ConfigError, DataError
from kmclust.report import document as report
from kmclust.report import results
from kmclust.report.stats import elbow, paired_differences

ROOT = Path(__file__).resolve().parents[1]
FAILED = (6, "random", 1)
PENDING = (8, "data", 2)
KS, INITS, SEEDS = (5, 6, 7, 8), ("random", "data"), 3
FIGURES = (
    "representatives_random.png",
    "representatives_data.png",
    "jclust_vs_k.png",
    "mean_distance_vs_k.png",
    "accuracy_vs_k.png",
    "iterations_vs_k.png",
    "relocations_vs_k.png",
    "init_comparison.png",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_zarr(path, consolidated=False)
    return path


def _open(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, consolidated=False)


@pytest.fixture(scope="module")
def truth() -> xr.Dataset:
    """The in-memory Dataset the store is written from (reference values)."""
    return make_results(KS, INITS, SEEDS, failed=[FAILED], pending=[PENDING])


@pytest.fixture(scope="module")
def store(truth, tmp_path_factory) -> Path:
    return _write(truth, tmp_path_factory.mktemp("results") / "fake.zarr")


@pytest.fixture(scope="module")
def built(store, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    md = report.write_report(_open(store), out)
    assert md == out / "REPORT.md"
    return out, md.read_text(encoding="utf-8")


def _done_seeds(k: int, init: str) -> list[int]:
    return [s for s in range(SEEDS) if (k, init, s) not in (FAILED, PENDING)]


def _cell_values(truth: xr.Dataset, var: str, k: int, init: str) -> np.ndarray:
    """Values over the done seeds, picked by position (independent of the report code)."""
    return truth[var].values[KS.index(k), INITS.index(init), _done_seeds(k, init)].astype(float)


def _table_row(md: str, k: int, init: str) -> str:
    rows = [
        ln for ln in md.splitlines() if re.match(rf"^\| {k} \| {re.escape(init)} \| \d+/\d+ \|", ln)
    ]
    assert len(rows) == 1, rows
    return rows[0]


# ----------------------------------------------------------------------------- figures and text
@pytest.mark.parametrize("name", FIGURES)
def test_every_figure_is_a_valid_png(built, name):
    path = built[0] / name
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        dpi = img.info.get("dpi")
    assert width >= 600 and height >= 400
    assert dpi is not None and round(dpi[0]) == 150
    assert f"]({name})" in built[1]  # referenced by relative path


def test_report_opens_with_what_was_run(built, truth):
    md = built[1]
    assert md.splitlines()[0].startswith("# ") and "fake-mnist" in md.splitlines()[0]
    assert truth.attrs["fingerprint"] in md
    assert "1000 training images" in md and "4000 held-out test images" in md
    assert "22 done, 1 failed, 1 pending" in md
    assert "k = 6, init = random, seed = 1: failed — RuntimeError: simulated failure" in md
    assert "tol = 1e-06, max_iter = 12" in md
    assert truth.attrs["started"] in md and truth.attrs["finished"] in md


def test_table_has_a_row_for_every_k_and_init(built):
    for k in KS:
        for init in INITS:
            _table_row(built[1], k, init)


def test_failed_and_pending_cells_do_not_move_the_means(built, truth, store):
    md = built[1]
    summary = report.summary_table(_open(store))
    for (k, init, _), n_done in ((FAILED, 2), (PENDING, 2), ((7, "data", 0), 3)):
        row = _table_row(md, k, init)
        assert f"| {n_done}/3 |" in row
        for var, dec in (("jclust", 3), ("mean_distance", 3), ("n_iter", 1), ("test_accuracy", 3)):
            x = _cell_values(truth, var, k, init)
            assert summary.loc[(k, init), f"{var}_mean"] == pytest.approx(x.mean(), rel=1e-12)
            assert summary.loc[(k, init), f"{var}_std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
            assert f"{x.mean():.{dec}f} ± {x.std(ddof=1):.{dec}f}" in row
        reloc = _cell_values(truth, "n_relocated", k, init)
        assert summary.loc[(k, init), "n_relocated_sum"] == reloc.sum()
    assert not re.search(r"1e\+0?9|1000000000|99999", md)


def test_conclusion_sentence_counts_the_k_where_data_is_lower(built, truth):
    wins = 0
    for k in KS:
        both = [s for s in _done_seeds(k, "random") if s in _done_seeds(k, "data")]
        j = truth.jclust.values[KS.index(k)]
        wins += (j[0, both] - j[1, both]).mean() > 0
    sentence = re.search(
        r"data init reaches lower J_clust than random at (\d+) of (\d+) values of k"
        r" \(95% CI excludes 0 at \d+\)",
        built[1],
    )
    assert sentence, "conclusion sentence missing"
    assert (int(sentence[1]), int(sentence[2])) == (wins, len(KS))


def test_choosing_k_section(built):
    md = built[1]
    assert "## Choosing k" in md and "Elbow estimate" in md and "Held-out accuracy" in md
    assert re.search(r"random: mean J_clust [\d.]+ at k = 5 → [\d.]+ at k = 8", md)


# ----------------------------------------------------------------------------- statistics
def test_paired_differences_match_a_hand_computed_t_interval(truth):
    vals = results.metric_values(truth)
    diff = paired_differences(vals, "jclust", "random", "data")
    for k in KS:
        both = [s for s in _done_seeds(k, "random") if s in _done_seeds(k, "data")]
        d = truth.jclust.values[KS.index(k), 0, both] - truth.jclust.values[KS.index(k), 1, both]
        n, m, se = d.size, d.mean(), d.std(ddof=1) / np.sqrt(d.size)
        half = stats.t.ppf(0.975, n - 1) * se
        row = diff.loc[k]
        assert row["n"] == n
        assert row["mean"] == pytest.approx(m)
        assert (row.ci_low, row.ci_high) == pytest.approx((m - half, m + half))
        assert row.p_ttest == pytest.approx(2 * stats.t.sf(abs(m / se), n - 1))
    pooled = diff.attrs["pooled"]
    assert pooled["n"] == sum(
        len([s for s in _done_seeds(k, "random") if s in _done_seeds(k, "data")]) for k in KS
    )


def test_elbow_finds_the_knee_of_a_handmade_curve():
    ks = np.arange(1, 9)
    assert elbow(ks, [100, 50, 20, 15, 12, 10, 9, 8.5]) == 3
    assert elbow(ks, [40, 30, 20, 10, 9.5, 9, 8.5, 8]) == 4  # two straight pieces
    assert elbow(ks[::-1], [8, 8.5, 9, 9.5, 10, 20, 30, 40]) == 4  # order does not matter
    assert elbow(ks, 50 - 2.0 * ks) is None  # a straight line has no elbow
    assert elbow([5, 6], [3.0, 2.0]) is None


def test_default_representatives_take_largest_k_and_median_seed(truth):
    vals = results.metric_values(truth)
    chosen = report.choose_representatives(truth, vals)
    for init in INITS:
        seeds = _done_seeds(8, init)
        j = _cell_values(truth, "jclust", 8, init)
        expected = seeds[np.argsort(j)[(len(seeds) - 1) // 2]]
        assert chosen[init] == (8, expected)


def test_explicit_representative_is_checked(truth):
    vals = results.metric_values(truth)
    assert report.choose_representatives(truth, vals, (7, "data", 1)) == {"data": (7, 1)}
    with pytest.raises(ConfigError, match="not done"):
        report.choose_representatives(truth, vals, FAILED)
    with pytest.raises(ConfigError, match="--k 99"):
        report.choose_representatives(truth, vals, (99, "data", 0))


def test_single_seed_report_says_there_is_no_interval(tmp_path):
    path = _write(make_results(ks=range(5, 8), seeds=1), tmp_path / "one.zarr")
    md = report.write_report(path, tmp_path / "out").read_text(encoding="utf-8")
    assert "one seed per cell" in md
    assert (tmp_path / "out" / "init_comparison.png").stat().st_size > 10_000


def test_store_without_done_cells_is_refused():
    cells = [(5, i, 0) for i in INITS]
    with pytest.raises(DataError, match="no cell"):
        report.write_report(make_results(ks=[5], seeds=1, failed=cells), Path("unused"))


def test_format_table_lists_every_cell(store):
    text = report.format_table(report.summary_table(_open(store)))
    lines = text.splitlines()
    assert len(lines) == 1 + len(KS) * len(INITS)
    assert "J_clust" in lines[0] and "±" in text and str(ABSURD) not in text


# ----------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "report.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_missing_store(tmp_path):
    line = _one_error_line(_cli(str(tmp_path / "nope.zarr")))
    assert "nope.zarr" in line


def test_cli_store_lacking_variables(truth, tmp_path):
    path = _write(truth.drop_vars(["centroids", "jclust"]), tmp_path / "partial.zarr")
    line = _one_error_line(_cli(str(path)))
    assert "jclust" in line and "centroids" in line


def test_cli_needs_a_whole_cell(store):
    _one_error_line(_cli(str(store), "--k", "7"))


def test_cli_writes_next_to_the_store_for_a_chosen_cell(truth, tmp_path):
    path = _write(truth, tmp_path / "fake.zarr")
    proc = _cli(str(path), "--k", "7", "--init", "data", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "fake-report"
    assert proc.stdout.strip() == str(out / "REPORT.md")
    assert (out / "representatives_data.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (out / "representatives_random.png").exists()
    assert "- data: k = 7, seed = 1" in (out / "REPORT.md").read_text(encoding="utf-8")


def test_init_names_become_distinct_safe_file_names():
    names = [results.slug(n) for n in ("random", "data", "k-means++", "k-means||")]
    assert len(set(names)) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)


def test_open_results_reads_the_per_cell_variables_once_and_leaves_the_clusters_lazy(store, truth):
    ds = results.open_results(store)
    assert ds.status.chunks is None and ds.jclust.chunks is None  # in memory: read in one go
    assert ds.centroids.chunks is not None  # per-cluster arrays still read on demand
    np.testing.assert_array_equal(ds.jclust.values, truth.jclust.values)
    assert list(results.strings(ds.status).ravel()) == list(results.strings(truth.status).ravel())
