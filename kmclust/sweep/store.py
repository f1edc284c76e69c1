"""The results store: create it from the schema, reopen it for ``--resume``, write k slabs, finish.

A store is chunked by single k, so each k's slab is written on its own, data
first and ``status`` last (the cell-done marker). A new store is written beside
its place and renamed into it; ``--overwrite`` builds the new store beside the
old one and exchanges the two at the end, so the path always holds a whole store.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import xarray as xr

from kmclust.errors import ConfigError, DataError
from kmclust.sweep import schema
from kmclust.sweep.config import SweepConfig, grid_size
from kmclust.sweep.schema import RESULTS_MARK, SCHEMA_VERSION
from kmclust.sweep.split import DataSplit

log = logging.getLogger(__name__)

#: the results template is built in memory: a larger grid is refused before anything is written
RESULTS_LIMIT = 4 * 2**30


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["kmclust", "numpy", "dask", "distributed", "xarray", "zarr", "scikit-learn"]
    return {n: version(n) for n in names}


def check_size(config: SweepConfig, data: DataSplit) -> None:
    """Refuse a grid whose results would not fit in memory (the template is built there)."""
    per_cell = max(config.ks) * (math.prod(data.image_shape) * 4 + 16) + config.max_iter * 8 + 64
    nbytes = grid_size(config) * per_cell
    if nbytes > RESULTS_LIMIT:
        raise ConfigError(
            f"the results of this grid would take {nbytes / 2**30:,.1f} GiB (per cell: centroids "
            f"of up to k={max(config.ks)} clusters and --max-iter {config.max_iter} J values); "
            f"at most {RESULTS_LIMIT / 2**30:g} GiB: use fewer k values or seeds, "
            "or a smaller --max-iter"
        )


def template(config: SweepConfig, data: DataSplit) -> xr.Dataset:
    """The empty results Dataset: every cell ``pending``, padding NaN."""
    kmax = max(config.ks)
    sizes = {"cluster": kmax, "iteration": config.max_iter}
    sizes |= dict(zip(data.image_dims, data.image_shape))
    arrays = schema.empty(config.grid, sizes, data.image_dims)
    coords = {
        "k": list(config.ks),
        "init": np.array(config.inits, dtype=object),
        "seed": list(config.seeds),
    }
    coords |= {dim: np.arange(n) for dim, n in sizes.items()}
    ds = xr.Dataset(arrays, coords=coords)
    for var in schema.VARIABLES:
        ds[var.name].attrs = {"long_name": var.label}
    ds.attrs = {
        RESULTS_MARK: SCHEMA_VERSION,
        "config": json.dumps(config.identity()),
        "dataset": data.name,
        "fingerprint": data.fingerprint,
        "class_names": data.class_names,
        "n_train": int(data.y_train.size),
        "n_test": int(data.y_test.size),
        "versions": json.dumps(_versions()),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "finished": "",
    }
    return ds


def _encoding(ds: xr.Dataset) -> dict:
    """Chunk every variable by single k so that a batch writes its own chunks only."""
    return {name: {"chunks": (1,) + var.shape[1:]} for name, var in ds.data_vars.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence zarr's note that consolidated metadata is not in the v3 spec (xarray reads it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        yield


def create_store(out: Path, ds: xr.Dataset) -> None:
    """Write the template beside ``out`` and move it into place (never half-written)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ConfigError(f"cannot create results store {out}: {exc.strerror or exc}") from None
    try:
        with _quiet():
            ds.to_zarr(tmp / "store.zarr", mode="w", encoding=_encoding(ds), consolidated=True)
        (tmp / "store.zarr").rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_results(out: Path, config: SweepConfig, data: DataSplit, *, resume: bool) -> xr.Dataset:
    """Create the results store at a new ``out``, or reopen one for ``--resume`` after checking
    that it matches (and bringing a store of an older schema up to this one)."""
    if not out.exists():
        create_store(out, template(config, data))
    elif not resume:
        raise ConfigError(
            f"results store {out} exists: use --resume to complete it or --overwrite to start again"
        )
    ds = _open(out)
    diff = config.differences(json.loads(ds.attrs.get("config", "{}")))
    if diff:
        raise ConfigError(
            f"results store {out} was made with a different config ({', '.join(diff)} differ); "
            "use another --out or --overwrite"
        )
    if ds.attrs.get("fingerprint") != data.fingerprint:
        raise ConfigError(
            f"results store {out} was made from different data (fingerprint differs); "
            "use another --out"
        )
    if ds.attrs.get(RESULTS_MARK) != SCHEMA_VERSION:
        _upgrade(out, ds, template(config, data))
        ds = _open(out)
    return ds


def _open(out: Path) -> xr.Dataset:
    try:
        return xr.open_zarr(out)
    except Exception as exc:  # zarr/xarray raise many types for a broken store
        raise DataError(f"cannot open results store {out}: {exc}") from None


def _upgrade(out: Path, ds: xr.Dataset, new: xr.Dataset) -> None:
    """Bring a store of an older schema to this one: add the variables it lacks (their fill
    values) and stamp the schema version; ConfigError if that cannot make it whole."""
    version = ds.attrs.get(RESULTS_MARK, 0)
    refuse = f"results store {out} has results schema version {version}"
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ConfigError(
            f"{refuse}; this kmclust writes version {SCHEMA_VERSION}: use a newer kmclust, "
            "another --out or --overwrite"
        )
    missing = [name for name in new.data_vars if name not in ds]
    unfillable = [name for name in missing if schema.BY_NAME[name].required]
    unfillable += [
        name
        for name in new.data_vars
        if name in ds and (ds[name].dims != new[name].dims or ds[name].shape != new[name].shape)
    ]
    if unfillable:
        raise ConfigError(
            f"{refuse} and cannot be completed ({', '.join(unfillable)} missing or of another "
            "shape): use another --out or --overwrite"
        )
    log.info("bringing results store %s to schema version %d", out, SCHEMA_VERSION)
    import zarr

    with _quiet():
        if missing:
            added = new[missing]
            added = added.drop_vars(list(added.coords))
            added.to_zarr(out, mode="a", encoding=_encoding(added), consolidated=False)
        group = zarr.open_group(str(out), mode="r+")
        group.attrs[RESULTS_MARK] = SCHEMA_VERSION
        zarr.consolidate_metadata(str(out))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_store(new: Path, target: Path) -> None:
    """Put the complete store ``new`` at ``target`` and delete the store it replaces.

    The two are exchanged in one atomic rename where the system allows it, so
    at every instant ``target`` holds either the old results or the new.
    Elsewhere the old store is moved aside first and deleted last.
    """
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(aside)
    new.rename(target)
    shutil.rmtree(aside)


def write_slab(out: Path, ki: int, slab: xr.Dataset) -> None:
    """Write one k's cells: data first, ``status`` last (the cell-done marker)."""
    region = {"k": slice(ki, ki + 1), "init": slice(None), "seed": slice(None)}
    data = slab.drop_vars([v for v in slab.coords])
    data.drop_vars("status").to_zarr(out, region=region, consolidated=False)
    data[["status"]].to_zarr(out, region=region, consolidated=False)


def finish_store(out: Path) -> None:
    """Stamp the end time and refresh the consolidated metadata."""
    import zarr

    with _quiet():
        group = zarr.open_group(str(out), mode="r+")
        group.attrs["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        zarr.consolidate_metadata(str(out))


def strings(var: xr.DataArray) -> np.ndarray:
    """A string variable as an object array (zarr v3 strings read back as numpy StringDType)."""
    return np.asarray(var.values).astype(object)
