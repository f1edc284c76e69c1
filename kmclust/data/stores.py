"""Staged stores: stage a source into a zarr v3 store, open a store, verify one.

A store holds `images` (uint8, sample × y × x, in the source's image size, or
sample × y × x × channel for colour), `labels` (uint8, sample, an index into
the `class_names` attribute) and `split` ("train"/"test", the source's own
split). An unlabelled store (attr `labelled: false`, from a folder of images
without class folders) has no `labels` and no `class_names`. A store knows its own image
shape (its `images` array) and class names (its attrs): nothing here assumes
an image size. `split` is stored as a variable-length UTF-8 string array (zarr
v3's "string" type, which round-trips without warnings); `open_images` hands
it out as fixed-width `<U5`, which every numpy/xarray operation accepts. The
sources are defined in kmclust.data.sources and kmclust.data.synthetic; how a
store is written (codecs, chunks, the atomic rename) is kmclust.data.staging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kmclust.data import remote, sources, synthetic
from kmclust.data.staging import Plan, check_target, write_store
from kmclust.errors import ConfigError, DataError
from kmclust.location import Location, locate

# xarray, zarr and dask are imported where they are used, so that a CLI run failing on
# bad input exits quickly instead of waiting for their imports.
if TYPE_CHECKING:
    import dask.array as da
    import xarray as xr

log = logging.getLogger(__name__)

SOURCES = (*sources.REGISTRY, synthetic.NAME)  # the sources data/stage.py offers
_STORE_KEY = "kmclust_store"  # ds.encoding key holding the store path
_LOCATION_KEY = "kmclust_location"  # … and its Location (URL and storage options)
CHUNK_ROWS = 10_000  # rows per chunk by default…
CHUNK_BYTES = 64 * 2**20  # …fewer when a chunk of images would exceed this
IMAGE_DIMS = (("sample", "y", "x"), ("sample", "y", "x", "channel"))


def default_store_path(source: str) -> Path:
    """Where `stage` writes a source when no `out` is given (relative to the cwd)."""
    return Path("data") / f"{source}.zarr"


def _fingerprint(sha256: dict[str, str], extra: dict | None = None) -> str:
    """sha256 over the sorted input digests (plus generation parameters, if any)."""
    doc = sorted(sha256.items()) if not extra else {"sha256": sorted(sha256.items()), **extra}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _plan_source(source: sources.Source, from_dir: str | Path | None, download: bool) -> Plan:
    """Load a registered source into memory and plan its store."""
    data = source.load(from_dir, download)
    n = len(data.labels)
    if n == 0:
        raise DataError(f"{source.name}: the source holds no images")
    shape = source.image_shape or data.images.shape[1:]  # None: the input's own (array)
    names = data.class_names or source.class_names
    if data.images.shape[1:] != shape:
        raise DataError(f"{source.name}: images of shape {data.images.shape[1:]}, expected {shape}")
    if int(data.labels.max()) >= len(names):
        raise DataError(f"{source.name}: a label exceeds its {len(names)} classes")

    def rows(start: int, stop: int) -> dict[str, np.ndarray]:
        sl = slice(start, stop)
        return {"images": data.images[sl], "labels": data.labels[sl], "is_test": data.is_test[sl]}

    attrs = {
        "class_names": list(names),
        "sha256": data.sha256,
        "fingerprint": _fingerprint(data.sha256),
    }
    return Plan(n, shape, rows, attrs)


def _plan_synthetic(parent_store: str | Path, n: int, seed: int) -> Plan:
    """Read a staged parent into memory and plan `n` synthetic rows made from it."""
    ds = open_images(parent_store)
    if not labelled(ds) or ds["images"].ndim != 3:
        raise DataError(
            f"{parent_store}: synthetic needs a labelled grayscale (sample, y, x) store"
        )
    parent = {
        "images": _compute(ds, ds.images.data),
        "labels": _compute(ds, ds.labels.data),
        "is_test": _compute(ds, ds.split.data) == "test",
    }
    pa = ds.attrs
    sha = dict(pa.get("sha256", {}))
    gen = synthetic.generation(fingerprint(ds), n, seed)
    attrs = {"sha256": sha, "fingerprint": _fingerprint(sha, gen)}
    if "class_names" in pa:
        attrs["class_names"] = list(pa["class_names"])
    attrs.update({"parent_source": pa.get("source", "unknown"), **gen})
    return Plan(
        n,
        parent["images"].shape[1:],
        lambda start, stop: synthetic.synthetic_rows(parent, seed, start, stop),
        attrs,
        synthetic.EXTRA_ARRAYS,
    )


def _is_int(value: object, low: int) -> bool:
    """An int (not a bool) of at least `low`."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def stage(
    source: str,
    out: str | Path | None = None,
    *,
    from_dir: str | Path | None = None,
    chunk_rows: int | None = None,
    force: bool = False,
    download: bool = False,
    rows: int | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    **image_options: object,
) -> Path | Location:
    """Stage `source` into a zarr store at `out` (default data/<source>.zarr); return its place.

    out: a path or an fsspec URL (``s3://bucket/x.zarr``, with ``storage_options``); a
    store at a URL is staged on local disk first and then uploaded (kmclust.data.remote).
    chunk_rows: rows per chunk, by default CHUNK_ROWS or as many as fit in CHUNK_BYTES.
    image_options: the images source's size, mode, workers and parallel
    (see kmclust.data.images.stage_folder).
    """
    registered = sources.REGISTRY.get(source)
    if registered is None and source != synthetic.NAME:
        names = (*sources.REGISTRY, synthetic.NAME)
        raise ConfigError(f"unknown source {source!r}; choose one of {', '.join(names)}")
    if chunk_rows is not None and not _is_int(chunk_rows, 1):
        raise ConfigError(f"--chunk-rows must be a positive integer, got {chunk_rows!r}")
    given = sorted(k for k, v in image_options.items() if v is not None)
    if given and not (registered and registered.stream):
        raise ConfigError(f"--{given[0]} applies only to the images source")
    if download and not (registered and registered.downloadable):
        names = [s.name for s in sources.REGISTRY.values() if s.downloadable]
        raise ConfigError(f"--download applies only to the {' and '.join(names)} source")
    if source != synthetic.NAME and rows is not None:
        raise ConfigError("--rows applies only to the synthetic source")
    where = locate(out if out is not None else default_store_path(source), storage_options)
    if not where.is_local:
        remote.check_target(where, force)
        with tempfile.TemporaryDirectory(prefix="kmclust-stage-") as tmp:
            local = Path(tmp) / where.name
            stage(
                source,
                local,
                from_dir=from_dir,
                chunk_rows=chunk_rows,
                download=download,
                rows=rows,
                seed=seed,
                **image_options,
            )
            remote.publish(local, where)
        return where
    out = where.path
    check_target(out, force)
    if registered is None:
        if from_dir is None:
            raise ConfigError(
                "synthetic needs --from STORE (a staged store, e.g. data/fashion-mnist.zarr)"
            )
        if not _is_int(rows, 1):
            raise ConfigError(f"synthetic needs --rows N with N >= 1, got {rows!r}")
        if not _is_int(seed, 0):
            raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")
        if Path(from_dir).resolve() == out.resolve():
            raise ConfigError(f"--from and --out are the same store ({out})")
        plan = _plan_synthetic(from_dir, rows, seed)
    elif registered.stream is not None:

        def write(plan: Plan) -> None:
            log.info("writing %s store to %s", source, out)
            write_store(out, source, plan, chunk_rows or _chunk_rows(plan.image_shape))

        opts = {k: v for k, v in image_options.items() if v is not None}
        registered.stream(from_dir, write, **opts)
        return out
    else:
        plan = _plan_source(registered, from_dir, download)

    log.info("writing %s store to %s", source, out)
    write_store(out, source, plan, chunk_rows or _chunk_rows(plan.image_shape))
    return out


def _chunk_rows(image_shape: tuple[int, ...]) -> int:
    """CHUNK_ROWS, or fewer so that a chunk of images stays within CHUNK_BYTES."""
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // math.prod(image_shape)))


def store_summary(path: str | Path | Location) -> str:
    """One line for a staged store: its place, number of images and the train/test counts."""
    ds = open_images(path)
    n, a = ds.sizes["sample"], ds.attrs
    return f"{path}: {n:,} images ({a['n_train']:,} train, {a['n_test']:,} test)"


# ---------------------------------------------------------------- reading


def _store(ds: xr.Dataset) -> str:
    return ds.encoding.get(_STORE_KEY, "<store>")


def _compute(ds: xr.Dataset, arr: da.Array) -> np.ndarray:
    """Compute a dask array from a store; a corrupt chunk becomes DataError naming the store."""
    try:
        return np.asarray(arr.compute())
    except (ValueError, RuntimeError, OSError) as exc:
        raise DataError(f"{_store(ds)}: cannot read data ({exc})") from None


def _open(loc: Location) -> xr.Dataset:
    """The store at ``loc`` opened lazily (no layout checks yet)."""
    import xarray as xr

    if loc.is_local:
        path = loc.path
        if not path.exists():
            raise DataError(f"{path}: no such store (stage one with data/stage.py)")
        if not path.is_dir():
            raise DataError(f"{path}: is a file, not a zarr store")
        meta = path / "zarr.json"
        if not meta.is_file():
            raise DataError(f"{path}: not a zarr v3 store (no zarr.json)")
        consolidated = json.loads(meta.read_text()).get("consolidated_metadata") is not None
    else:
        remote.check_readable(loc)
        consolidated = remote.consolidated(loc)
    try:
        return xr.open_zarr(
            loc.url,
            consolidated=consolidated,
            zarr_format=3,
            storage_options=loc.storage_options(),
        )
    except Exception as exc:  # zarr/xarray raise many types for a broken store
        raise DataError(
            f"{loc}: cannot open as a zarr store ({type(exc).__name__}: {exc})"
        ) from None


def open_images(path: str | Path | Location, storage_options: dict | None = None) -> xr.Dataset:
    """Open a staged store (a path or an fsspec URL) lazily, checking its layout.

    The dask arrays read chunks from the store's own place: on a cluster each
    worker reads its chunks (from object storage, say) without the driver.
    """
    loc = locate(path, storage_options)
    path = loc.path if loc.is_local else loc
    ds = _open(loc)
    unlabelled = ds.attrs.get("labelled") is False
    for name in ("images", "split") if unlabelled else ("images", "labels", "split"):
        if name not in ds.data_vars:
            raise DataError(f"{path}: no '{name}' variable; not a staged kmclust store")
    images, split = ds["images"], ds["split"]
    if images.dims not in IMAGE_DIMS or images.dtype != np.uint8:
        raise DataError(
            f"{path}: 'images' must be uint8 (sample, y, x) or (sample, y, x, channel), "
            f"got {images.dtype} {dict(zip(images.dims, images.shape))}"
        )
    if images.chunks[1:] != tuple((size,) for size in images.shape[1:]):
        raise DataError(f"{path}: 'images' must be chunked along sample only")
    if unlabelled and "labels" in ds.data_vars:
        raise DataError(f"{path}: marked unlabelled (labelled: false) but has a 'labels' variable")
    labels = ds.get("labels")
    if labels is not None and (labels.dims != ("sample",) or labels.dtype != np.uint8):
        raise DataError(
            f"{path}: 'labels' must be uint8 along sample, got {labels.dtype} {labels.dims}"
        )
    if split.dims != ("sample",) or split.dtype.kind not in "TUO":
        raise DataError(
            f"{path}: 'split' must be strings along sample, got {split.dtype} {split.dims}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{path}: the store holds no images")
    ds["split"] = split.astype("<U5")
    ds.encoding[_STORE_KEY] = str(path)
    ds.encoding[_LOCATION_KEY] = loc
    return ds


def location(ds: xr.Dataset) -> Location:
    """Where a store opened by :func:`open_images` lives (its URL and storage options)."""
    return ds.encoding[_LOCATION_KEY]


def labelled(ds: xr.Dataset) -> bool:
    """Whether a store (from open_images) has labels; unlabelled ones have no `labels`."""
    return "labels" in ds.data_vars


def flat_images(ds: xr.Dataset) -> da.Array:
    """Images as an (N, pixels) uint8 dask array, row chunks as stored (y, x, channel order)."""
    img = ds["images"].data
    return img.reshape(img.shape[0], -1)


def image_rows(store: str | Path | Location, name: str) -> da.Array:
    """(N, pixels) uint8 rows read straight from the store's zarr array, keys named after ``name``.

    Pixels of a colour store are (y, x, channel) flattened in C order, as in flat_images.

    A fresh ``name`` gives a graph that shares no key with earlier ones: after
    a lost worker, a key that erred (KilledWorker) would stay erred under its
    old name and fail every later computation that uses it.
    """
    import dask.array as da

    loc = locate(store)
    img = da.from_zarr(
        loc.url, component="images", name=name, storage_options=loc.storage_options()
    )
    return img.reshape(img.shape[0], -1)


def as_float(ds: xr.Dataset) -> da.Array:
    """Images as an (N, pixels) float32 dask array in [0, 1] (uint8 / 255)."""
    return flat_images(ds).astype(np.float32) / np.float32(255)


def load_images(ds: xr.Dataset) -> np.ndarray:
    """All images in memory as (N, pixels) uint8; a corrupt chunk raises DataError naming it."""
    return _compute(ds, flat_images(ds))


def fingerprint(ds: xr.Dataset) -> str:
    """The store's data fingerprint (sha256 over its input files' digests)."""
    fp = ds.attrs.get("fingerprint")
    if not isinstance(fp, str):
        raise DataError(f"{_store(ds)}: no fingerprint attribute; restage it with data/stage.py")
    return fp


def verify_store(path: str | Path | Location) -> None:
    """Read every chunk of every variable; DataError naming the store and variable on damage."""
    import zarr

    ds = open_images(path)  # layout first
    n_classes = len(ds.attrs.get("class_names", range(256)))
    loc = location(ds)
    path = loc.path if loc.is_local else loc
    group = zarr.open_group(loc.url, mode="r", storage_options=loc.storage_options())
    for name, arr in group.arrays():
        if arr.nchunks_initialized < arr.nchunks:
            raise DataError(
                f"{path}: variable '{name}' is missing {arr.nchunks - arr.nchunks_initialized} "
                f"of {arr.nchunks} chunks"
            )
        step = arr.chunks[0]
        for i, start in enumerate(range(0, arr.shape[0], step)):
            try:
                block = arr[start : start + step]
            except Exception as exc:  # checksum mismatch (ValueError), bad zstd frame, I/O error
                raise DataError(
                    f"{path}: variable '{name}' chunk {i} (rows {start}-{start + step - 1}) "
                    f"is corrupt: {exc}"
                ) from None
            if name == "labels" and block.size and int(block.max()) >= n_classes:
                raise DataError(
                    f"{path}: variable 'labels' chunk {i} holds a label outside 0-{n_classes - 1}"
                )
            if name == "split" and not np.isin(block, ["train", "test"]).all():
                raise DataError(
                    f"{path}: variable 'split' chunk {i} holds values other than train/test"
                )
    log.info("%s: every chunk verified", path)
