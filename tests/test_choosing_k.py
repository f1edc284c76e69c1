"""The label-free indices for choosing k, end to end: a real sweep against scikit-learn, resuming
a store that predates them, and the report's choosing-k section."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from kmclust.errors import DataError
from kmclust.lloyd.init import cell_seed, data_stats, init_centroids, random_from_stats
from kmclust.report.document import write_report
from kmclust.sweep import schema, store
from kmclust.sweep.config import SweepConfig
from kmclust.sweep.run import _draw, n_groups, run_sweep
from kmclust.sweep.split import DataSplit, split_data

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata")

INDICES = ("davies_bouldin", "calinski_harabasz", "silhouette")
SAMPLE = 300  # fewer than the 1,000 training rows, so the silhouette really samples
SEED = 3


def _config(store_path: Path) -> SweepConfig:
    return SweepConfig(
        dataset=str(store_path),
        ks=(5, 8),
        inits=("random", "data"),
        seeds=(SEED,),
        silhouette_sample=SAMPLE,
    )


@pytest.fixture(scope="module")
def swept(mnist_subset_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("choosing-k") / "r.zarr"
    outcome = run_sweep(_config(mnist_subset_store), out, parallel=2)  # dask's threads
    assert not outcome.failed
    # the phases the command logs: consecutive laps that add up to the sweep's time; the
    # held-out passes and waits ran within them
    laps = {n: s for n, s in outcome.phases.items() if not n.endswith("within the above)")}
    assert {"engine", "data and initial centroids", "checks and data split"} <= set(laps)
    assert 0.95 * outcome.seconds <= sum(laps.values()) <= outcome.seconds
    inside = sum(outcome.phases.values()) - sum(laps.values())
    assert 0 < inside <= laps["engine"] + laps["last evaluations and writes"]
    return out


@pytest.fixture(scope="module")
def rows(mnist_subset_store: Path) -> np.ndarray:
    """The sweep's training rows in float64, uint8 / 255 (the indices' exact rows)."""
    data = split_data(_config(mnist_subset_store))
    return np.asarray(data.x_train.compute()).astype(np.float64) / 255.0


def test_stored_indices_equal_sklearn(swept: Path, rows: np.ndarray) -> None:
    """Labels are not stored: each training row's label is recomputed as its nearest stored
    centroid (the final assignment of a converged run), checked against the stored sizes."""
    ds = xr.open_zarr(swept)
    # the documented sample: seeded by the cell's seed alone, sorted row indices
    sample = np.sort(np.random.default_rng([SEED, 1]).choice(len(rows), SAMPLE, replace=False))
    for k in ds.k.values:
        for init in ds.init.values:
            cell = ds.sel(k=k, init=init, seed=SEED)
            assert bool(cell.converged)
            cents = cell.centroids.values[:k].reshape(k, -1).astype(np.float64)
            sq = (rows**2).sum(1)[:, None] - 2 * rows @ cents.T + (cents**2).sum(1)[None, :]
            labels = sq.argmin(axis=1)
            sizes = np.bincount(labels, minlength=k)
            np.testing.assert_array_equal(sizes, cell.cluster_size.values[:k])
            want = {
                "davies_bouldin": davies_bouldin_score(rows, labels),
                "calinski_harabasz": calinski_harabasz_score(rows, labels),
                "silhouette": silhouette_score(rows[sample], labels[sample]),
            }
            for name, value in want.items():
                got = float(cell[name])
                # float32-scaled rows would be ~1e-8 away; both sides are float64 from here
                assert got == pytest.approx(value, rel=1e-10), (int(k), str(init), name)


def test_silhouette_sample_zero_turns_it_off(mnist_subset_store: Path, tmp_path: Path) -> None:
    config = SweepConfig(
        dataset=str(mnist_subset_store), ks=(4,), inits=("data",), seeds=(0,), silhouette_sample=0
    )
    run_sweep(config, tmp_path / "off.zarr", parallel=1)
    ds = xr.open_zarr(tmp_path / "off.zarr")
    assert np.isnan(ds.silhouette.values).all()
    assert np.isfinite(ds.davies_bouldin.values).all()
    assert np.isfinite(ds.calinski_harabasz.values).all()


def test_a_config_without_the_sample_size_means_the_default() -> None:
    config = SweepConfig()
    mine = config.identity()
    assert mine["silhouette_sample"] == 2000
    older = {key: v for key, v in mine.items() if key != "silhouette_sample"}
    assert config.differences(older) == []
    assert SweepConfig(silhouette_sample=500).differences(older) == ["silhouette_sample"]
    assert config.differences(mine | {"silhouette_sample": 0}) == ["silhouette_sample"]


def test_resume_adds_the_indices_to_an_older_store(
    mnist_subset_store: Path, swept: Path, tmp_path: Path
) -> None:
    """A store written before the indices (no variables, no config key, no schema mark) with
    k = 8 pending: resume adds the variables, computes them for k = 8 only."""
    ds = xr.open_zarr(swept).load().drop_vars(list(INDICES))
    for name in ("status", "error"):
        ds[name] = ds[name].astype(object)
    for var in ds.variables.values():
        var.encoding = {}
    del ds.attrs[schema.RESULTS_MARK]
    config = json.loads(ds.attrs["config"])
    del config["silhouette_sample"]
    ds.attrs["config"] = json.dumps(config)
    ds["status"].loc[{"k": 8}] = "pending"
    old = tmp_path / "old.zarr"
    ds.to_zarr(old, encoding=store._encoding(ds), consolidated=True)
    # the older store's cells used the default sample size: resume with it
    resumed = SweepConfig(**{**_config(mnist_subset_store).__dict__, "silhouette_sample": 2000})
    outcome = run_sweep(resumed, old, resume=True, parallel=1)
    assert not outcome.failed and outcome.n_computed == 2
    got = xr.open_zarr(old)
    for name in INDICES:
        assert np.isnan(got[name].sel(k=5).values).all(), name
        assert np.isfinite(got[name].sel(k=8).values).all(), name


def test_report_shows_the_indices_and_the_k_they_pick(swept: Path, tmp_path: Path) -> None:
    md = write_report(swept, tmp_path / "report").read_text(encoding="utf-8")
    section = md[md.index("## Choosing k") : md.index("## Cluster representatives")]
    assert "**Label-free indices.**" in section
    ds = xr.open_zarr(swept)
    for init in ("random", "data"):
        cells, ks = ds.sel(init=init, seed=SEED), ds.k.values
        db = ks[np.argmin(cells.davies_bouldin.values)]
        ch = ks[np.argmax(cells.calinski_harabasz.values)]
        sil = ks[np.argmax(cells.silhouette.values)]
        assert (
            f"- {init}: Davies–Bouldin (lowest) k = {db}; Calinski–Harabasz (highest) k = {ch}; "
            f"silhouette (highest) k = {sil}." in section
        )
    for file in ("davies_bouldin_vs_k.png", "calinski_harabasz_vs_k.png", "silhouette_vs_k.png"):
        assert f"]({file})" in section and (tmp_path / "report" / file).stat().st_size > 10_000


# ---------------------------------------------------------------- the sweep's shortcuts


def test_data_inits_from_the_uint8_rows_have_the_float_rows_bits() -> None:
    """The sweep draws *data* inits from its uint8 rows: the same centroids, bit for bit, as
    drawn from the scaled float32 rows (its earlier path), repeated rows included."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (300, 16), dtype=np.uint8)
    rows[100:250] = rows[0]  # 150 distinct rows: draws must replace their repeats
    x = rows * np.float32(1 / 255)
    ks = (3, 40, 150, 151)  # k = 151: more than the distinct rows, a data init fails
    config = SweepConfig(dataset="unused", ks=ks, inits=("data", "random"), seeds=(0, 1))
    cells = [(ki, ii, si) for ki in range(len(ks)) for ii in range(2) for si in range(2)]
    failed: list[tuple] = []
    got = _draw(config, cells, rows, x, SimpleNamespace(fail=lambda *a: failed.append(a)))
    stats = data_stats(x)
    for ki, ii, si in cells:
        k, init = ks[ki], config.inits[ii]
        seed = cell_seed(config.seeds[si], k, init)
        if init == "random":
            np.testing.assert_array_equal(got[(ki, ii, si)], random_from_stats(*stats, k, seed))
        elif k == 151:
            with pytest.raises(ValueError, match="distinct"):
                init_centroids(x, k, "data", seed)
            assert (ki, ii, si) not in got
        else:
            assert got[(ki, ii, si)].dtype == np.float64
            np.testing.assert_array_equal(got[(ki, ii, si)], init_centroids(x, k, "data", seed))
    assert [cell for cell, _ in failed] == [(3, 0, 0), (3, 0, 1)]
    assert all("initialisation failed" in why for _, why in failed)


@pytest.mark.parametrize(
    ("parallel", "chunks", "want"),
    [(2, 6, 1), (2, 2, 1), (2, 1, 2), (4, 3, 2), (3, 1, 3), (0, 4, 1)],
)
def test_groups_keep_every_thread_busy_and_read_each_chunk_once(parallel, chunks, want) -> None:
    data = SimpleNamespace(x_train=da.zeros((10 * chunks, 4), chunks=(10, 4)))
    assert n_groups(parallel, data) == want


def test_a_failed_load_on_the_workers_ends_in_one_line(
    mnist_subset_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers load their rows while the driver draws the inits: their failure still ends
    the job with the load's one line."""

    def broken(self) -> None:
        raise OSError("the disk went away\nsecond line")

    monkeypatch.setattr(DataSplit, "load", broken)
    with pytest.raises(DataError, match=r"could not load the images .*the disk went away$"):
        run_sweep(_config(mnist_subset_store), tmp_path / "r.zarr", parallel=1)
