"""The results store: create it from the schema, reopen it for ``--resume``, write k slabs, finish.

A store is chunked by single k, so each k's slab is written on its own, data
first and ``status`` last (the cell-done marker). A new store is written beside
its place and renamed into it; ``--overwrite`` builds the new store beside the
old one and exchanges the two at the end, so the path always holds a whole store. A store at
a URL (object storage, no rename) is created and replaced as kmclust.sweep.remote_results says.
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
from kmclust.location import Location, describe
from kmclust.sweep import remote_results, schema
from kmclust.sweep.config import SweepConfig, grid_size
from kmclust.sweep.schema import RESULTS_MARK, SCHEMA_VERSION
from kmclust.sweep.split import DataSplit

log = logging.getLogger(__name__)

#: the results template is built in memory: a larger grid is refused before anything is written
RESULTS_LIMIT = 4 * 2**30
#: a results store's place: a local path, or a URL with its storage options
Place = Path | Location


class ResultsWriteError(DataError):
    """The results store cannot be written (storage unreachable, denied): no retry of the
    cells helps; finished slabs are kept for ``--resume``."""


def _zarr_args(out: Place) -> tuple[str | Path, dict]:
    """The store argument and keyword arguments xarray and zarr take for ``out``."""
    if isinstance(out, Location):
        return out.url, {"storage_options": out.storage_options()}
    return out, {}


def exists(out: Place) -> bool:
    """Whether anything is at ``out``."""
    return remote_results.exists(out) if isinstance(out, Location) else out.exists()


def _group(out: Place):
    import zarr

    where, kw = _zarr_args(out)
    return zarr.open_group(str(where), mode="r+", **kw)


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
    arrays = schema.empty(config.grid, sizes, data.image_dims, data.labelled)
    coords = {
        "k": list(config.ks),
        "init": np.array(config.inits, dtype=object),
        "seed": list(config.seeds),
    }
    coords |= {dim: np.arange(n) for dim, n in sizes.items()}
    ds = xr.Dataset(arrays, coords=coords)
    for var in schema.variables(data.labelled):
        ds[var.name].attrs = {"long_name": var.label}
    ds.attrs = {
        RESULTS_MARK: SCHEMA_VERSION,
        "config": json.dumps(config.identity()),
        "dataset": data.name,
        "fingerprint": data.fingerprint,
        "class_names": data.class_names,
        schema.LABELLED: data.labelled,
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


def create_store(out: Place, ds: xr.Dataset) -> None:
    """Write the template beside ``out`` and move it into place (never half-written); at a URL,
    upload it with its root ``zarr.json`` last."""
    if isinstance(out, Location):

        def write(local: Path) -> None:
            with _quiet():
                ds.to_zarr(local, mode="w", encoding=_encoding(ds), consolidated=True)

        remote_results.create(out, write)
        return
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


def open_results(out: Place, config: SweepConfig, data: DataSplit, *, resume: bool) -> xr.Dataset:
    """Create the results store at a new ``out``, or reopen one for ``--resume`` after checking
    that it matches (and bringing a store of an older schema up to this one).

    A new store is returned as the template in memory (what was just written), so the
    sweep does not read it back.
    """
    if not exists(out):
        new = template(config, data)
        create_store(out, new)
        return new
    if not resume:
        raise ConfigError(
            f"results store {out} exists: use --resume to complete it or --overwrite to start again"
        )
    ds = open_store(out)
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
        ds = open_store(out)
    return ds


def open_store(out: Place) -> xr.Dataset:
    """The results store at ``out``, opened lazily."""
    where, kw = _zarr_args(out)
    try:
        return xr.open_zarr(where, **kw)
    except Exception as exc:  # zarr/xarray raise many types for a broken store
        if isinstance(out, Location):
            raise describe(exc, out) from None
        raise DataError(f"cannot open results store {out}: {exc}") from None


def _upgrade(out: Place, ds: xr.Dataset, new: xr.Dataset) -> None:
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

    where, kw = _zarr_args(out)
    with _quiet():
        if missing:
            added = new[missing]
            added = added.drop_vars(list(added.coords))
            added.to_zarr(where, mode="a", encoding=_encoding(added), consolidated=False, **kw)
        group = _group(out)
        group.attrs[RESULTS_MARK] = SCHEMA_VERSION
        zarr.consolidate_metadata(group.store)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_store(new: Place, target: Place) -> None:
    """Put the complete store ``new`` at ``target`` and delete the store it replaces.

    The two are exchanged in one atomic rename where the system allows it, so
    at every instant ``target`` holds either the old results or the new.
    Elsewhere the old store is moved aside first and deleted last; on object storage
    see kmclust.sweep.remote_results.replace.
    """
    if isinstance(new, Location) and isinstance(target, Location):
        remote_results.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(aside)
    new.rename(target)
    shutil.rmtree(aside)


def write_slab(out: Place, ki: int, slab: xr.Dataset) -> None:
    """Write one k's cells: data first, ``status`` last (the cell-done marker)."""
    region = {"k": slice(ki, ki + 1), "init": slice(None), "seed": slice(None)}
    data = slab.drop_vars([v for v in slab.coords])
    where, kw = _zarr_args(out)
    # at a URL, read the layout from the root's consolidated metadata (written at creation;
    # the slabs change no metadata) rather than with a request per array and write
    consolidated = isinstance(out, Location)
    try:
        data.drop_vars("status").to_zarr(where, region=region, consolidated=consolidated, **kw)
        data[["status"]].to_zarr(where, region=region, consolidated=consolidated, **kw)
    except Exception as exc:
        if not isinstance(out, Location):
            raise
        raise ResultsWriteError(f"cannot write the results: {describe(exc, out)}") from None


def finish_store(out: Place) -> None:
    """Stamp the end time and refresh the consolidated metadata."""
    import zarr

    try:
        with _quiet():
            group = _group(out)
            group.attrs["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            zarr.consolidate_metadata(group.store)
    except Exception as exc:
        if not isinstance(out, Location):
            raise
        raise ResultsWriteError(f"cannot write the results: {describe(exc, out)}") from None


def strings(var: xr.DataArray) -> np.ndarray:
    """A string variable as an object array (zarr v3 strings read back as numpy StringDType).

    Read in this process (dask's synchronous scheduler): a few kilobytes do not
    need a round trip through a cluster's workers.
    """
    return np.asarray(var.compute(scheduler="sync").values).astype(object)
