"""The k × init × seed sweep: data split, batches of runs, results Dataset in zarr, resume.

All pending cells run as one engine batch (see kmclust.lloyd.engine): they share
every data pass, split into one group per worker thread. As soon as every
cell of a k has finished, that k's slab of the results store (chunked by k)
is written with ``status`` last, so a cell reads ``done`` only once all its
data is on disk; ``--resume`` recomputes exactly the cells that are not
``done``. A batch that fails (a lost worker) is split in halves until the
failing cells are isolated; corrupt data or a lost scheduler end the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sklearn
import xarray as xr

from kmclust.data import select
from kmclust.data import stores as datasets
from kmclust.errors import ConfigError, DataError, KmclustError, SchedulerError
from kmclust.lloyd import driver, placement, runs
from kmclust.lloyd.init import cell_seed, init_centroids
from kmclust.sweep import metrics
from kmclust.sweep.config import (  # parse_* re-exported for the entry points
    MAX_SEED,
    RESULTS_MARK,
    check_inits,
    check_ks,
    check_out,
    check_seeds,
    integer,
    number,
)

log = logging.getLogger(__name__)

SCALE = 1.0 / 255.0
#: the results template is built in memory: a larger grid is refused before anything is written
RESULTS_LIMIT = 4 * 2**30
#: version of the results layout, stored as the store's RESULTS_MARK attribute
SCHEMA_VERSION = 1
CELL_DIMS = ("k", "init", "seed")


@dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's numbers (``out`` and scheduler do not)."""

    dataset: str = "mnist-subset"
    ks: tuple[int, ...] = tuple(range(5, 21))
    inits: tuple[str, ...] = ("random", "data")
    seeds: tuple[int, ...] = tuple(range(10))
    train_per_class: int | None = 100  # None: the store's own train split
    data_seed: int = 0
    tol: float = 1e-6
    max_iter: int = 100
    chunk_rows: int | None = None  # None: the store's chunking

    def __post_init__(self) -> None:
        """Refuse values no sweep can run (the CLI checks the same values before any import)."""
        check_ks(self.ks)
        check_inits(self.inits)
        check_seeds(self.seeds)
        if self.train_per_class is not None:
            integer("--train-per-class", self.train_per_class, 1)
        integer("--data-seed", self.data_seed, 0, MAX_SEED)
        number("--tol", self.tol)
        integer("--max-iter", self.max_iter, 1)
        if self.chunk_rows is not None:
            integer("--chunk-rows", self.chunk_rows, 1)

    def identity(self) -> dict:
        """The JSON-able fields a resumed store must match."""
        d = dataclasses.asdict(self)
        return {key: list(v) if isinstance(v, tuple) else v for key, v in d.items()}


@dataclass
class DataSplit:
    """Training and held-out images of a sweep (dask arrays, uint8, (N, 784))."""

    name: str
    store: Path
    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    fingerprint: str
    class_names: list[str]
    graphs: Callable[[str], tuple[object, object]] | None = (
        None  # name → unpersisted (train, test) graphs
    )

    def load(self) -> None:
        """Persist the images on the workers (training rows as float32: integer-valued, exact sums).

        Called again after a lost worker: every load builds its graphs afresh
        under new key names, from the zarr reads on, since a key that erred
        (KilledWorker) would stay erred under its old name and fail every
        later batch; the old keys are simply released.
        """
        fresh = uuid.uuid4().hex
        x_train, x_test = self.graphs(f"kmclust-rows-{fresh}")
        self.x_train = placement.persist_balanced(
            x_train.map_blocks(np.asarray, name=f"kmclust-train-{fresh}")
        )
        self.x_test = placement.persist_balanced(
            x_test.map_blocks(np.asarray, name=f"kmclust-test-{fresh}")
        )


@dataclass
class SweepOutcome:
    path: Path
    n_cells: int
    n_computed: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- options


# ---------------------------------------------------------------- data


def resolve_store(dataset: str) -> Path:
    """A staged store path for a name or path; stages a known source when missing."""
    path = Path(dataset)
    if path.exists() or dataset.endswith(".zarr"):
        if not path.exists():
            raise DataError(f"dataset store {path} does not exist")
        return path
    if dataset not in datasets.SOURCES:
        raise DataError(
            f"dataset {dataset!r} is neither a staged store nor a known source ({', '.join(datasets.SOURCES)})"
        )
    store = datasets.default_store_path(dataset)
    if not store.exists():
        if dataset not in ("mnist-subset", "fashion-mnist"):
            raise DataError(
                f"{dataset} is not staged yet: run python data/stage.py {dataset} --from DIR first"
            )
        log.info("staging %s into %s", dataset, store)
        datasets.stage(dataset, store)
    return store


def split_data(config: SweepConfig) -> DataSplit:
    """Open the store and draw the training sample (stratified, ``data_seed``)."""
    store = resolve_store(config.dataset)
    ds = datasets.open_images(store)
    try:
        labels = np.asarray(ds["labels"].values).astype(np.int64)
        split = np.asarray(ds["split"].values).astype(object)
    except Exception as exc:  # zarr raises plain ValueErrors for damaged chunks
        raise _load_error(exc, store) from None
    is_train = split == "train"
    if config.train_per_class is None:
        train = np.flatnonzero(is_train)
        if train.size == 0:
            raise DataError(
                f"{store} has no images marked train; use --train-per-class N instead of --train all"
            )
    else:
        rng = np.random.default_rng(config.data_seed)
        picks = []
        for c in np.unique(labels[is_train]):
            members = np.flatnonzero(is_train & (labels == c))
            if config.train_per_class > members.size:
                raise ConfigError(
                    f"--train-per-class {config.train_per_class} is larger than class {c} "
                    f"({members.size} training images in {store})"
                )
            picks.append(rng.choice(members, config.train_per_class, replace=False))
        train = np.sort(np.concatenate(picks))
    test = np.setdiff1d(np.arange(labels.size), train)
    if config.train_per_class is None:
        test = np.flatnonzero(split == "test")
    if max(config.ks) > train.size:
        raise ConfigError(f"--k: k={max(config.ks)} exceeds the {train.size} training images")
    rows = config.chunk_rows or int(datasets.flat_images(ds).chunks[0][0])

    def graphs(name: str) -> tuple[object, object]:
        flat = datasets.image_rows(store, name)

        def take(idx: np.ndarray, part: str):
            return select.take_rows(flat, idx, f"{name}-{part}").rechunk(
                (max(1, min(rows, max(1, idx.size))), -1)
            )

        return take(train, "train"), take(test, "test")

    x_train, x_test = graphs(f"kmclust-rows-{uuid.uuid4().hex}")
    return DataSplit(
        name=str(ds.attrs.get("source", store.stem)),
        store=store,
        x_train=x_train,
        y_train=labels[train],
        x_test=x_test,
        y_test=labels[test],
        graphs=graphs,
        fingerprint=datasets.fingerprint(ds),
        class_names=[str(c) for c in ds.attrs.get("class_names", [str(i) for i in range(10)])],
    )


# ---------------------------------------------------------------- results store


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["kmclust", "numpy", "dask", "distributed", "xarray", "zarr", "scikit-learn"]
    return {n: version(n) for n in names}


def template(config: SweepConfig, data: DataSplit) -> xr.Dataset:
    """The empty results Dataset: every cell ``pending``, padding NaN."""
    shape = (len(config.ks), len(config.inits), len(config.seeds))
    kmax = max(config.ks)

    def full(extra: tuple[int, ...], value, dtype) -> np.ndarray:
        return np.full(shape + extra, value, dtype=dtype)

    cell = CELL_DIMS
    ds = xr.Dataset(
        {
            "jclust": (cell, full((), np.nan, "f8")),
            "mean_distance": (cell, full((), np.nan, "f8")),
            "n_iter": (cell, full((), 0, "i4")),
            "converged": (cell, full((), False, bool)),
            "n_relocated": (cell, full((), 0, "i4")),
            "train_accuracy": (cell, full((), np.nan, "f8")),
            "test_accuracy": (cell, full((), np.nan, "f8")),
            "nmi": (cell, full((), np.nan, "f8")),
            "ari": (cell, full((), np.nan, "f8")),
            "acc": (cell, full((), np.nan, "f8")),
            "purity": (cell, full((), np.nan, "f8")),
            "seconds": (cell, full((), np.nan, "f8")),
            "status": (cell, full((), "pending", object)),
            "error": (cell, full((), "", object)),
            "cluster_size": (cell + ("cluster",), full((kmax,), np.nan, "f8")),
            "cluster_label": (cell + ("cluster",), full((kmax,), np.nan, "f8")),
            "centroids": (cell + ("cluster", "y", "x"), full((kmax, 28, 28), np.nan, "f4")),
            "jclust_history": (cell + ("iteration",), full((config.max_iter,), np.nan, "f8")),
        },
        coords={
            "k": list(config.ks),
            "init": np.array(config.inits, dtype=object),
            "seed": list(config.seeds),
            "cluster": np.arange(kmax),
            "iteration": np.arange(config.max_iter),
            "y": np.arange(28),
            "x": np.arange(28),
        },
    )
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
    ds["jclust"].attrs = {
        "long_name": "J_clust: mean squared distance to the assigned centroid (pixels in [0,1])"
    }
    ds["mean_distance"].attrs = {
        "long_name": "mean distance to the assigned centroid (the original study's J_clust)"
    }
    ds["seconds"].attrs = {
        "long_name": "wall seconds from the start of the cell's batch until the cell was done"
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
    """Create the results store at a new ``out``, or reopen one for ``--resume`` after checking it matches."""
    if not out.exists():
        create_store(out, template(config, data))
    elif not resume:
        raise ConfigError(
            f"results store {out} exists: use --resume to complete it or --overwrite to start again"
        )
    try:
        ds = xr.open_zarr(out)
    except Exception as exc:  # zarr/xarray raise many types for a broken store
        raise DataError(f"cannot open results store {out}: {exc}") from None
    theirs = json.loads(ds.attrs.get("config", "{}"))
    mine = config.identity()
    diff = sorted(key for key in set(theirs) | set(mine) if theirs.get(key) != mine.get(key))
    if diff:
        raise ConfigError(
            f"results store {out} was made with a different config ({', '.join(diff)} differ); "
            "use another --out or --overwrite"
        )
    if ds.attrs.get("fingerprint") != data.fingerprint:
        raise ConfigError(
            f"results store {out} was made from different data (fingerprint differs); use another --out"
        )
    return ds


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


# ---------------------------------------------------------------- running


def _strings(var: xr.DataArray) -> np.ndarray:
    """A string variable as an object array (zarr v3 strings read back as numpy StringDType)."""
    return np.asarray(var.values).astype(object)


def _fill_cell(
    slab: xr.Dataset,
    ii: int,
    si: int,
    res: runs.RunResult,
    data: DataSplit,
    test: tuple[np.ndarray, float, float] | None,
    seconds: float,
) -> None:
    """Put one finished run into the slab (k index 0)."""
    k = res.centroids.shape[0]
    with sklearn.config_context(skip_parameter_validation=True):  # ~5 ms per call otherwise
        ev = metrics.evaluate(
            res.labels,
            data.y_train,
            test[0] if test else np.empty(0, int),
            data.y_test if test else data.y_test[:0],
            k,
            len(data.class_names),
        )
    values = {
        name: ev[name]
        for name in ("train_accuracy", "test_accuracy", "nmi", "ari", "acc", "purity")
    }
    values |= {
        "jclust": res.jclust,
        "mean_distance": res.mean_distance,
        "n_iter": res.n_iter,
        "converged": res.converged,
        "n_relocated": res.n_relocated,
        "seconds": seconds,
        "status": "done",
    }
    for name, value in values.items():  # plain numpy writes: xarray's indexing costs ~1 ms per call
        slab[name].values[0, ii, si] = value
    slab["cluster_size"].values[0, ii, si, :k] = ev["cluster_size"]
    slab["cluster_label"].values[0, ii, si, :k] = ev["cluster_label"]
    slab["centroids"].values[0, ii, si, :k] = res.centroids.reshape(k, 28, 28)
    slab["jclust_history"].values[0, ii, si, : len(res.history)] = res.history


Cell = tuple[int, int, int]  # (k index, init index, seed index)


class _Collector:
    """Gathers finished runs per k and writes each k's slab as soon as all its cells are settled."""

    def __init__(
        self,
        config: SweepConfig,
        data: DataSplit,
        results: xr.Dataset,
        out: Path,
        cells: list[Cell],
        on_batch: Callable[[int, int, int], None] | None,
        n_done: int,
        total: int,
    ):
        self.config, self.data, self.out, self.on_batch = config, data, out, on_batch
        self.slabs = {
            ki: results.isel(k=slice(ki, ki + 1)).load(scheduler="sync")
            for ki in sorted({c[0] for c in cells})
        }
        self.pending = {ki: sum(c[0] == ki for c in cells) for ki in self.slabs}
        self.finished: list[tuple[Cell, runs.RunResult, float]] = []
        self.failed: list[str] = []
        self.n_done, self.total = n_done, total

    def fail(self, cell: Cell, reason: str) -> None:
        ki, ii, si = cell
        at = {"k": 0, "init": ii, "seed": si}
        self.slabs[ki]["status"][at] = "failed"
        self.slabs[ki]["error"][at] = reason
        self.failed.append(
            f"k={self.config.ks[ki]} init={self.config.inits[ii]} "
            f"seed={self.config.seeds[si]}: {reason}"
        )
        self.pending[ki] -= 1

    def finish(self, cell: Cell, res: runs.RunResult, seconds: float) -> None:
        if res.ok:
            self.finished.append((cell, res, seconds))
        else:
            self.fail(cell, res.error)

    def flush(self, force: bool = False) -> None:
        """Evaluate the finished runs and write every settled k.

        The held-out pass (one for all finished runs) waits until it completes
        some k, so a sweep makes a handful of test passes rather than one per
        Lloyd pass; ``force`` evaluates whatever has finished.
        """
        waiting = {cell[0] for cell, _, _ in self.finished}
        completes = any(
            sum(c[0] == ki for c, _, _ in self.finished) == self.pending[ki] for ki in waiting
        )
        if self.finished and (force or completes):
            batch = self.finished
            tests = (
                driver.predict(
                    self.data.x_test, [r.centroids for _, r, _ in batch], scale=SCALE, errors=False
                )
                if self.data.y_test.size
                else [None] * len(batch)
            )
            self.finished = []  # only now: if the held-out pass fails, the runs are retried
            for (cell, res, seconds), test in zip(batch, tests):
                _fill_cell(self.slabs[cell[0]], cell[1], cell[2], res, self.data, test, seconds)
                self.pending[cell[0]] -= 1
        for ki in [ki for ki, left in self.pending.items() if left == 0]:
            slab = self.slabs.pop(ki)
            del self.pending[ki]
            write_slab(self.out, ki, slab)
            self.n_done += int(np.sum(_strings(slab["status"]) == "done"))
            if self.on_batch is not None:
                self.on_batch(self.n_done, self.total, self.config.ks[ki])


def _run_cells(
    config: SweepConfig,
    data: DataSplit,
    cells: list[Cell],
    inits: dict[Cell, np.ndarray],
    sink: _Collector,
    n_groups: int,
    tries: int = 2,
) -> None:
    """Run ``cells`` as one engine batch; if the batch itself fails, split it until the culprit is isolated.

    A single cell gets ``tries`` attempts: a worker that died for another
    cell can take an innocent cell's tasks with it.
    """
    t0 = time.perf_counter()
    settled: set[Cell] = set()

    def done(i: int, res: runs.RunResult) -> None:
        settled.add(cells[i])
        sink.finish(cells[i], res, time.perf_counter() - t0)

    try:
        driver.lloyd(
            data.x_train,
            [inits[c] for c in cells],
            tol=config.tol,
            max_iter=config.max_iter,
            scale=SCALE,
            return_labels=True,
            persist=False,
            n_groups=n_groups,
            integer=True,
            on_done=done,
            progress=lambda *_: sink.flush(),
        )
        sink.flush(force=True)
    except (
        Exception
    ) as exc:  # a lost worker, an impossible task: isolate the failing cells, keep the rest
        fatal = _fatal(exc, data)
        if fatal is not None:
            raise fatal from None
        unflushed = {f[0] for f in sink.finished}
        sink.finished = [f for f in sink.finished if f[0] not in cells]
        rest = [c for c in cells if c not in settled or c in unflushed]
        reason = _one_line(exc)
        try:  # a lost worker may have taken persisted rows with it: load them afresh
            data.load()
        except Exception as again:  # noqa: BLE001 - reported as one line
            raise _fatal(again, data) or _load_error(again, data.store) from None
        if len(rest) == 1 and tries > 1:
            log.warning("cell %s failed (%s); trying it once more", rest[0], reason)
            _run_cells(config, data, rest, inits, sink, n_groups, tries - 1)
            return
        if len(rest) <= 1:
            for cell in rest:
                sink.fail(cell, reason)
            sink.flush(force=True)
            return
        log.warning("a batch of %d cells failed (%s); retrying it in halves", len(rest), reason)
        half = len(rest) // 2
        for part in (rest[:half], rest[half:]):
            _run_cells(config, data, part, inits, sink, n_groups)


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _corrupt(text: str, store: Path) -> DataError | None:
    """A checksum failure means a damaged store: no retry helps, restaging does."""
    if "checksum" not in text.lower():
        return None
    return DataError(
        f"data store {store} is corrupted ({text}); restage it with data/stage.py --force"
    )


def _load_error(exc: Exception, store: Path) -> KmclustError:
    """One readable line for a failure while reading the data."""
    text = _one_line(exc)
    if (corrupt := _corrupt(text, store)) is not None:
        return corrupt
    if "KilledWorker" in text:
        return DataError(
            f"could not load the images of {store}: a worker died while loading them ({text}); "
            "is the workers' memory_limit too small for --chunk-rows?"
        )
    return DataError(f"could not load the images of {store}: {text}")


def _fatal(exc: Exception, data: DataSplit) -> KmclustError | None:
    """Errors that no retry of a smaller batch can cure: corrupt data, a lost scheduler."""
    text = _one_line(exc)
    if (corrupt := _corrupt(text, data.store)) is not None:
        return corrupt
    client = placement.default_client()
    if client is not None and (client.status != "running" or "scheduler-connection-lost" in text):
        return SchedulerError(
            f"lost the Dask scheduler ({text}); finished cells are saved — rerun with --resume against a live scheduler"
        )
    return None


def run_sweep(
    config: SweepConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    parallel: int = 2,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> SweepOutcome:
    """Run (or complete) the sweep into ``out`` on the current Dask scheduler.

    All pending cells advance as one engine batch split into ``parallel``
    groups (one per worker thread); ``on_batch(done_cells, total_cells, k)``
    reports progress each time a k's cells are written.
    """
    t0 = time.perf_counter()
    target = check_out(out, replace=overwrite, resume=resume)
    data = split_data(config)
    check_out(target, inputs=(data.store,), replace=overwrite, resume=resume)
    _check_size(config, data)
    out = target
    if overwrite and target.exists():  # built beside the old store, swapped in once complete
        out = target.with_name(f".{target.stem}.overwrite-{uuid.uuid4().hex[:8]}.zarr")
    try:
        outcome = _sweep(
            config, data, out, resume=resume and out == target, parallel=parallel, on_batch=on_batch
        )
    except BaseException:
        if out != target:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out != target:
        replace_store(out, target)
    outcome.path, outcome.seconds = target, time.perf_counter() - t0
    return outcome


def _check_size(config: SweepConfig, data: DataSplit) -> None:
    """Refuse a grid whose results would not fit in memory (the template is built there)."""
    d = int(np.prod(data.x_train.shape[1:]))
    per_cell = max(config.ks) * (d * 4 + 16) + config.max_iter * 8 + 64
    nbytes = grid_size(config) * per_cell
    if nbytes > RESULTS_LIMIT:
        raise ConfigError(
            f"the results of this grid would take {nbytes / 2**30:,.1f} GiB (per cell: centroids of up to "
            f"k={max(config.ks)} clusters and --max-iter {config.max_iter} J values); at most "
            f"{RESULTS_LIMIT / 2**30:g} GiB: use fewer k values or seeds, or a smaller --max-iter"
        )


def _sweep(
    config: SweepConfig,
    data: DataSplit,
    out: Path,
    *,
    resume: bool,
    parallel: int,
    on_batch: Callable[[int, int, int], None] | None,
) -> SweepOutcome:
    """Run the pending cells of the results store ``out`` (created here unless resumed)."""
    t0 = time.perf_counter()
    results = open_results(out, config, data, resume=resume)
    status = _strings(results["status"])
    cells: list[Cell] = [tuple(int(i) for i in c) for c in zip(*np.nonzero(status != "done"))]
    sink = _Collector(
        config, data, results, out, cells, on_batch, int(np.sum(status == "done")), status.size
    )
    if cells:
        try:
            data.load()
            x_train_np = np.asarray(data.x_train.compute()) * np.float32(SCALE)
        except Exception as exc:  # damaged chunks, a worker killed while loading
            raise _fatal(exc, data) or _load_error(exc, data.store) from None
        inits: dict[Cell, np.ndarray] = {}
        for cell in cells:
            ki, ii, si = cell
            k, init, seed = config.ks[ki], config.inits[ii], config.seeds[si]
            try:
                inits[cell] = init_centroids(x_train_np, k, init, cell_seed(seed, k, init))
            except (ValueError, KmclustError) as exc:
                sink.fail(cell, f"initialisation failed: {exc}")
        runnable = [c for c in cells if c in inits]
        if runnable:
            _run_cells(config, data, runnable, inits, sink, max(1, parallel))
        try:
            sink.flush(force=True)
        except Exception as exc:  # noqa: BLE001 - the held-out pass of the last runs
            raise _fatal(exc, data) or _load_error(exc, data.store) from None
    finish_store(out)
    failed = list(sink.failed)
    all_status = _strings(xr.open_zarr(out)["status"])
    for ki, ii, si in zip(*np.nonzero(all_status != "done")):
        desc = f"k={config.ks[ki]} init={config.inits[ii]} seed={config.seeds[si]}"
        if not any(f.startswith(desc + ":") for f in failed):
            why = (
                "failed in an earlier run" if all_status[ki, ii, si] == "failed" else "not computed"
            )
            failed.append(f"{desc}: {why}")
    computed = int(np.sum((status != "done") & (all_status != "pending")))
    return SweepOutcome(out, status.size, computed, failed, time.perf_counter() - t0)


@contextlib.contextmanager
def scheduler(
    spec: str, cluster_config: str | Path | None, timeout: float = 10
) -> Iterator[object]:
    """``threads`` → dask's threaded scheduler (no cluster); anything else → kmclust.cluster.connect."""
    if spec == "threads":
        yield None
        return
    from kmclust import cluster

    with cluster.connect(spec, cluster_config, timeout=timeout) as client:
        yield client


def worker_threads(client) -> int:
    """How many batches to run at once: one per worker thread."""
    if client is None:
        import os

        return os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))


def grid_size(config: SweepConfig) -> int:
    return len(config.ks) * len(config.inits) * len(config.seeds)


def estimate_runs(config: SweepConfig) -> str:
    """A one-paragraph description of what would run (for --dry-run)."""
    return (
        f"{grid_size(config)} runs: k in {list(config.ks)} × init {list(config.inits)} × "
        f"{len(config.seeds)} seeds, advanced as one batch; tol={config.tol:g}, max_iter={config.max_iter}; "
        f"training sample: {'store split' if config.train_per_class is None else f'{config.train_per_class} per class'}"
        f" (data seed {config.data_seed}); ≈ {sum(config.ks) * len(config.inits) * len(config.seeds)} centroids"
        f" ({math.fsum(config.ks) * len(config.inits) * len(config.seeds) * 784 * 8 / 2**20:.1f} MiB float64)"
    )
