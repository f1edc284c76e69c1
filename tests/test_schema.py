"""The results schema table, the stopping rule in the config identity, and resuming older stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from kmclust.errors import ConfigError
from kmclust.lloyd.stopping import RULE_VERSION
from kmclust.report import results
from kmclust.sweep import schema, store
from kmclust.sweep.config import SweepConfig
from kmclust.sweep.run import run_sweep

#: the variables a rerun reproduces bit for bit (all numbers but the timing)
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata")

NUMERIC = [v.name for v in schema.VARIABLES if v.dtype != "O" and v.name != "seconds"]


# ---------------------------------------------------------------- the table
def test_schema_rows_are_consistent() -> None:
    names = [v.name for v in schema.VARIABLES]
    assert len(set(names)) == len(names)
    for var in schema.VARIABLES:
        np.dtype(var.dtype)  # a real dtype
        assert var.label
        if var.shown or var.compared or var.plot:
            assert var.summary, f"{var.name} is reported but not summarised"
            assert not var.extra, f"{var.name}: only per-cell scalars are summarised"
        if var.compared:
            assert var.compared.better in ("lower", "higher")
    files = [v.plot.file for v in schema.VARIABLES if v.plot]
    assert len(set(files)) == len(files)


def test_empty_arrays_follow_the_rows() -> None:
    arrays = schema.empty((2, 1, 3), {"cluster": 4, "iteration": 5, "r": 6, "c": 7}, ("r", "c"))
    assert list(arrays) == [v.name for v in schema.VARIABLES]
    dims, centroids = arrays["centroids"]
    assert dims == ("k", "init", "seed", "cluster", "r", "c")
    assert centroids.shape == (2, 1, 3, 4, 6, 7) and centroids.dtype == np.float32
    assert (arrays["status"][1] == "pending").all()
    assert arrays["n_iter"][1].dtype == np.int32 and (arrays["n_iter"][1] == 0).all()


def test_report_reads_its_columns_from_the_schema() -> None:
    assert set(results.REQUIRED) <= {v.name for v in schema.VARIABLES}
    assert "purity" not in results.METRICS and "jclust" in results.METRICS
    assert [m for m, _ in results.COMPARED] == ["jclust", "n_iter", "test_accuracy"]


# ---------------------------------------------------------------- config identity
def test_identity_carries_the_stopping_rule_version() -> None:
    config = SweepConfig()
    mine = config.identity()
    assert mine["rule_version"] == RULE_VERSION
    older = {key: value for key, value in mine.items() if key != "rule_version"}
    assert config.differences(json.loads(json.dumps(older))) == []  # an older store: rule 1
    assert config.differences(mine | {"rule_version": RULE_VERSION + 1}) == ["rule_version"]
    assert config.differences(mine | {"tol": 0.5}) == ["tol"]


# ---------------------------------------------------------------- resuming older stores
def _config(store_path: Path) -> SweepConfig:
    return SweepConfig(
        dataset=str(store_path), ks=(3, 4), inits=("data",), seeds=(0, 1), train_per_class=10
    )


@pytest.fixture(scope="module")
def reference(mnist_subset_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store written by the current sweep."""
    out = tmp_path_factory.mktemp("schema") / "ref.zarr"
    outcome = run_sweep(_config(mnist_subset_store), out, parallel=1)
    assert not outcome.failed
    return out


def _older(reference: Path, out: Path, *, drop: str, pending_k: int | None = 4) -> Path:
    """A copy of ``reference`` as an older writer left it: without ``drop``, the schema mark and
    the config's rule version, the cells of ``pending_k`` not yet done."""
    ds = xr.open_zarr(reference).load().drop_vars(drop)
    for name in ("status", "error"):
        ds[name] = ds[name].astype(object)
    for var in ds.variables.values():
        var.encoding = {}
    del ds.attrs[schema.RESULTS_MARK]
    config = json.loads(ds.attrs["config"])
    del config["rule_version"]
    ds.attrs["config"] = json.dumps(config)
    if pending_k is not None:
        ds["status"].loc[{"k": pending_k}] = "pending"
    ds.to_zarr(out, encoding=store._encoding(ds), consolidated=True)
    return out


def test_resume_completes_a_store_without_a_newer_variable(
    mnist_subset_store: Path, reference: Path, tmp_path: Path
) -> None:
    old = _older(reference, tmp_path / "old.zarr", drop="purity")
    outcome = run_sweep(_config(mnist_subset_store), old, resume=True, parallel=1)
    assert not outcome.failed and outcome.n_computed == 2
    got, ref = xr.open_zarr(old), xr.open_zarr(reference)
    assert got.attrs[schema.RESULTS_MARK] == schema.SCHEMA_VERSION
    for name in NUMERIC:
        if name != "purity":
            np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)
    assert (store.strings(got.status) == "done").all()
    # the added variable: its fill value in the cells done before, computed in the rest
    assert np.isnan(got.purity.sel(k=3).values).all()
    np.testing.assert_array_equal(got.purity.sel(k=4).values, ref.purity.sel(k=4).values)


def test_resume_of_an_older_complete_store_only_stamps_it(
    mnist_subset_store: Path, reference: Path, tmp_path: Path
) -> None:
    old = _older(reference, tmp_path / "old.zarr", drop="seconds", pending_k=None)
    outcome = run_sweep(_config(mnist_subset_store), old, resume=True, parallel=1)
    assert outcome.n_computed == 0
    got = xr.open_zarr(old)
    assert got.attrs[schema.RESULTS_MARK] == schema.SCHEMA_VERSION
    assert np.isnan(got.seconds.values).all()


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_resume_refuses_an_older_store_lacking_a_required_variable(
    mnist_subset_store: Path, reference: Path, tmp_path: Path
) -> None:
    old = _older(reference, tmp_path / "old.zarr", drop="centroids")
    before = _files(old)
    with pytest.raises(ConfigError, match="cannot be completed.*centroids") as caught:
        run_sweep(_config(mnist_subset_store), old, resume=True, parallel=1)
    assert "\n" not in str(caught.value)
    assert _files(old) == before


def test_resume_refuses_a_newer_schema(
    mnist_subset_store: Path, reference: Path, tmp_path: Path
) -> None:
    import zarr

    newer = tmp_path / "newer.zarr"
    ds = xr.open_zarr(reference).load()
    for name in ("status", "error"):
        ds[name] = ds[name].astype(object)
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(newer, encoding=store._encoding(ds), consolidated=True)
    zarr.open_group(str(newer), mode="r+").attrs[schema.RESULTS_MARK] = schema.SCHEMA_VERSION + 1
    zarr.consolidate_metadata(str(newer))
    with pytest.raises(ConfigError, match=f"schema version {schema.SCHEMA_VERSION + 1}"):
        run_sweep(_config(mnist_subset_store), newer, resume=True, parallel=1)
