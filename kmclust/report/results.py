"""Reading a results store for the report: validation, done cells, metrics, names.

Shared by the tables (kmclust.report.document) and the figures
(kmclust.report.figures). What a store holds comes from the results schema
(kmclust.sweep.schema, the one module of the sweep the report imports).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from kmclust.errors import DataError
from kmclust.location import describe, locate
from kmclust.sweep.schema import CELL_DIMS, LABELLED, VARIABLES, Compared, variables

log = logging.getLogger(__name__)

GRID = CELL_DIMS
#: variables without which no report can be drawn
REQUIRED = tuple(v.name for v in VARIABLES if v.required)
#: per-cell metrics summarised per (k, init)
METRICS = tuple(v.name for v in VARIABLES if v.summary)
#: metrics compared between inits (paired over seeds), with their labels
COMPARED: tuple[tuple[str, Compared], ...] = tuple(
    (v.name, v.compared) for v in VARIABLES if v.compared
)


def open_results(
    results: xr.Dataset | str | Path, storage_options: dict | None = None
) -> xr.Dataset:
    """Open (a path or an fsspec URL) and validate a results Dataset; DataError if unusable."""
    if not isinstance(results, xr.Dataset):
        where = locate(results, storage_options)
        if where.is_local and not where.path.exists():
            raise DataError(f"results store not found: {where}")
        try:
            with warnings.catch_warnings():  # stores without consolidated metadata are fine
                warnings.filterwarnings(
                    "ignore", message="Failed to open Zarr store with consolidated"
                )
                results = xr.open_zarr(where.url, storage_options=where.storage_options())
        except FileNotFoundError:
            raise DataError(f"results store not found: {where}") from None
        except Exception as exc:  # zarr/xarray raise many types for a non-store
            if where.is_local:
                raise DataError(f"cannot open results store {where}: {exc}") from exc
            raise describe(exc, where) from None
    needed = [v.name for v in variables(labelled(results)) if v.required]
    missing = [d for d in GRID if d not in results.dims] + [v for v in needed if v not in results]
    if missing:
        raise DataError(f"results store lacks required dimensions/variables: {', '.join(missing)}")
    return with_cells_loaded(results)


def with_cells_loaded(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with its per-cell variables (dims within k × init × seed: status, metrics) in
    memory, read in one go: tables and figures read them many times, and each read of a lazy
    variable went back to the store (0.4 s a table for the default study); the per-cluster
    arrays (centroids, sizes) stay lazy."""
    small = [n for n, v in ds.data_vars.items() if set(v.dims) <= set(GRID) and v.chunks]
    return ds.assign(ds[small].load().data_vars) if small else ds


def labelled(ds: xr.Dataset) -> bool:
    """Whether the results come from labelled data (an unlabelled store's lack the label
    metrics: accuracy, NMI, ARI, purity, majority labels)."""
    return ds.attrs.get(LABELLED, True) is not False


def compared(ds: xr.Dataset) -> tuple[tuple[str, Compared], ...]:
    """The COMPARED metrics this store holds."""
    return tuple((m, c) for m, c in COMPARED if m in ds)


def strings(da: xr.DataArray) -> np.ndarray:
    """Values of a string variable as a numpy array of str (bytes decoded)."""
    vals = np.asarray(da.values, dtype=object)
    return np.vectorize(lambda s: s.decode() if isinstance(s, bytes) else str(s), otypes=[object])(
        vals
    )


def status_counts(ds: xr.Dataset) -> dict[str, int]:
    """Number of cells per status ("done", "failed", "pending", …)."""
    names, counts = np.unique(strings(ds.status).astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def done_mask(ds: xr.Dataset) -> xr.DataArray:
    """True where a (k, init, seed) cell finished; everything else is ignored."""
    return xr.DataArray(strings(ds.status) == "done", dims=ds.status.dims, coords=ds.status.coords)


def metric_values(ds: xr.Dataset) -> xr.Dataset:
    """The per-cell metrics as float (k, init, seed), NaN wherever the cell is not done."""
    done = done_mask(ds).transpose(*GRID)
    names = [m for m in METRICS if m in ds and set(ds[m].dims) == set(GRID)]
    return ds[names].transpose(*GRID).astype("f8").load().where(done)


def init_names(ds: xr.Dataset) -> list[str]:
    """The init coordinate as a list of str."""
    return [str(v) for v in strings(ds.init)]


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


def image_dims(ds: xr.Dataset) -> tuple[str, ...]:
    """The image dims of the centroids (those of the data store, e.g. ("y", "x"))."""
    return tuple(d for d in ds["centroids"].dims if d not in GRID + ("cluster",))


def image_shape(ds: xr.Dataset) -> tuple[int, ...]:
    """The size of a centroid image, read from the store's dims."""
    return tuple(int(ds.sizes[d]) for d in image_dims(ds))


def summary_inits(summary: pd.DataFrame) -> list[str]:
    """The inits of a summary_table in their store order."""
    return list(dict.fromkeys(summary.index.get_level_values("init")))


def slug(name: str) -> str:
    """A file-name-safe form of an init name ("k-means||" → "k-means-par")."""
    s = name.replace("++", "-pp").replace("||", "-par")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "init"
