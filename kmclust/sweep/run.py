"""The k × init × seed sweep: batches of runs, the cells they fill, error isolation, resume.

All pending cells run as one engine batch (see kmclust.lloyd.driver): they
share every data pass, split into one group per worker thread. As soon as every
cell of a k has finished, that k's slab of the results store (chunked by k) is
written with ``status`` last, so a cell reads ``done`` only once all its data
is on disk; ``--resume`` recomputes exactly the cells that are not ``done``. A
batch that fails (a lost worker) is split in halves until the failing cells are
isolated; corrupt data or a lost scheduler end the job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sklearn
import xarray as xr

from kmclust.errors import KmclustError, SchedulerError
from kmclust.lloyd import driver, placement, runs
from kmclust.lloyd.init import cell_seed, init_centroids
from kmclust.sweep import metrics
from kmclust.sweep.config import Cell, SweepConfig, check_out, grid_size
from kmclust.sweep.split import (
    DataSplit,
    corrupt,
    load_error,
    one_line,
    split_data,
    staged_image_shape,
)
from kmclust.sweep.store import (
    check_size,
    finish_store,
    open_results,
    replace_store,
    strings,
    write_slab,
)

log = logging.getLogger(__name__)

SCALE = 1.0 / 255.0


@dataclass
class SweepOutcome:
    path: Path
    n_cells: int
    n_computed: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cell_values(
    res: runs.RunResult,
    data: DataSplit,
    test: tuple[np.ndarray, float, float] | None,
    seconds: float,
    x_train: np.ndarray,
    silhouette: tuple[np.ndarray, np.ndarray],
) -> dict[str, object]:
    """Every value of one finished run, by results variable (see kmclust.sweep.schema).

    ``x_train``: the training rows on the driver (float, [0, 1]); ``silhouette``: the
    indices of those the silhouette is computed on and their distances (metrics.silhouette_rows,
    metrics.sample_distances).
    """
    k = res.centroids.shape[0]
    # its checks are slow per call; the rows are scaled uint8 images, so always finite
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        values = metrics.evaluate(
            res.labels,
            data.y_train,
            test[0] if test else np.empty(0, int),
            data.y_test if test else data.y_test[:0],
            k,
            len(data.class_names),
        )
        values |= metrics.internal_indices(x_train, res.labels, *silhouette)
    return values | {
        "jclust": res.jclust,
        "mean_distance": res.mean_distance,
        "n_iter": res.n_iter,
        "converged": res.converged,
        "n_relocated": res.n_relocated,
        "centroids": res.centroids,
        "jclust_history": res.history,
        "seconds": seconds,
        "status": "done",
    }


def fill_cell(slab: xr.Dataset, ii: int, si: int, values: dict[str, object]) -> None:
    """Put one cell's values into the slab (k index 0).

    An array fills the front of its padded dim (cluster, iteration); its other
    dims (the image's) are whole. Plain numpy writes: xarray's indexing is
    slow per call.
    """
    for name, value in values.items():
        target = slab[name].values
        if target.ndim == 3:
            target[0, ii, si] = value
            continue
        value = np.asarray(value).reshape(-1, *target.shape[4:])
        target[0, ii, si, : len(value)] = value


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
        self.x_train = np.empty((0, 0), np.float32)  # the training rows, once loaded

    def fail(self, cell: Cell, reason: str) -> None:
        ki, ii, si = cell
        at = {"k": 0, "init": ii, "seed": si}
        self.slabs[ki]["status"][at] = "failed"
        self.slabs[ki]["error"][at] = reason
        self.failed.append(f"{self.config.cell_name(cell)}: {reason}")
        self.pending[ki] -= 1

    def finish(self, cell: Cell, res: runs.RunResult, seconds: float) -> None:
        if res.ok:
            self.finished.append((cell, res, seconds))
        else:
            self.fail(cell, res.error)

    def _silhouette_rows(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The silhouette's sample of training rows for ``seed`` and the distances between them."""
        sample = metrics.silhouette_rows(len(self.x_train), self.config.silhouette_sample, seed)
        return sample, metrics.sample_distances(self.x_train, sample)

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
            # by seed: the silhouette's sample, and the distances between its rows, are the
            # same for every run of a seed, so they are computed once per seed and batch
            seed_of = {}
            for (cell, res, seconds), test in sorted(zip(batch, tests), key=lambda f: f[0][0][2]):
                if cell[2] not in seed_of:
                    seed_of = {cell[2]: self._silhouette_rows(self.config.seeds[cell[2]])}
                values = cell_values(res, self.data, test, seconds, self.x_train, seed_of[cell[2]])
                fill_cell(self.slabs[cell[0]], cell[1], cell[2], values)
                self.pending[cell[0]] -= 1
        for ki in [ki for ki, left in self.pending.items() if left == 0]:
            slab = self.slabs.pop(ki)
            del self.pending[ki]
            write_slab(self.out, ki, slab)
            self.n_done += int(np.sum(strings(slab["status"]) == "done"))
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
    """Run ``cells`` as one engine batch; if the batch itself fails, split it until the culprit
    is isolated.

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
    except Exception as exc:  # a lost worker, an impossible task: isolate the failing cells
        fatal = _fatal(exc, data)
        if fatal is not None:
            raise fatal from None
        unflushed = {f[0] for f in sink.finished}
        sink.finished = [f for f in sink.finished if f[0] not in cells]
        rest = [c for c in cells if c not in settled or c in unflushed]
        reason = one_line(exc)
        try:  # a lost worker may have taken persisted rows with it: load them afresh
            data.load()
        except Exception as again:  # noqa: BLE001 - reported as one line
            raise _fatal(again, data) or load_error(again, data.store) from None
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


def _fatal(exc: Exception, data: DataSplit) -> KmclustError | None:
    """Errors that no retry of a smaller batch can cure: corrupt data, a lost scheduler."""
    text = one_line(exc)
    if (damaged := corrupt(text, data.store)) is not None:
        return damaged
    client = placement.default_client()
    if client is not None and (client.status != "running" or "scheduler-connection-lost" in text):
        return SchedulerError(
            f"lost the Dask scheduler ({text}); finished cells are saved — "
            "rerun with --resume against a live scheduler"
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
    check_size(config, data)
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


def _initial_centroids(
    config: SweepConfig, data: DataSplit, cells: list[Cell], sink: _Collector
) -> dict[Cell, np.ndarray]:
    """Each cell's initial centroids; a cell whose initialisation fails is recorded as failed."""
    try:
        data.load()
        x_train_np = np.asarray(data.x_train.compute()) * np.float32(SCALE)
    except Exception as exc:  # damaged chunks, a worker killed while loading
        raise _fatal(exc, data) or load_error(exc, data.store) from None
    sink.x_train = x_train_np  # kept for the label-free indices of every finished run
    inits: dict[Cell, np.ndarray] = {}
    for cell in cells:
        ki, ii, si = cell
        k, init, seed = config.ks[ki], config.inits[ii], config.seeds[si]
        try:
            inits[cell] = init_centroids(x_train_np, k, init, cell_seed(seed, k, init))
        except (ValueError, KmclustError) as exc:
            sink.fail(cell, f"initialisation failed: {exc}")
    return inits


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
    status = strings(results["status"])
    cells: list[Cell] = [tuple(int(i) for i in c) for c in zip(*np.nonzero(status != "done"))]
    sink = _Collector(
        config, data, results, out, cells, on_batch, int(np.sum(status == "done")), status.size
    )
    if cells:
        inits = _initial_centroids(config, data, cells, sink)
        runnable = [c for c in cells if c in inits]
        if runnable:
            _run_cells(config, data, runnable, inits, sink, max(1, parallel))
        try:
            sink.flush(force=True)
        except Exception as exc:  # noqa: BLE001 - the held-out pass of the last runs
            raise _fatal(exc, data) or load_error(exc, data.store) from None
    finish_store(out)
    failed = list(sink.failed)
    all_status = strings(xr.open_zarr(out)["status"])
    for cell in zip(*np.nonzero(all_status != "done")):
        desc = config.cell_name(cell)
        if not any(f.startswith(desc + ":") for f in failed):
            earlier = all_status[cell] == "failed"
            failed.append(f"{desc}: {'failed in an earlier run' if earlier else 'not computed'}")
    computed = int(np.sum((status != "done") & (all_status != "pending")))
    return SweepOutcome(out, status.size, computed, failed, time.perf_counter() - t0)


@contextlib.contextmanager
def scheduler(
    spec: str, cluster_config: str | Path | None, timeout: float = 10
) -> Iterator[object]:
    """``threads`` → dask's threaded scheduler (no cluster); else kmclust.cluster's connect."""
    if spec == "threads":
        yield None
        return
    from kmclust.cluster.connect import connect

    with connect(spec, cluster_config, timeout=timeout) as client:
        yield client


def estimate_runs(config: SweepConfig) -> str:
    """A one-paragraph description of what would run (for --dry-run)."""
    sample = (
        "store split" if config.train_per_class is None else f"{config.train_per_class} per class"
    )
    n_centroids = sum(config.ks) * len(config.inits) * len(config.seeds)
    text = (
        f"{grid_size(config)} runs: k in {list(config.ks)} × init {list(config.inits)} × "
        f"{len(config.seeds)} seeds, advanced as one batch; tol={config.tol:g}, "
        f"max_iter={config.max_iter}; training sample: {sample} (data seed {config.data_seed}); "
        f"≈ {n_centroids} centroids"
    )
    shape = staged_image_shape(config.dataset)
    if shape is None:
        return text
    return text + f" ({n_centroids * math.prod(shape) * 8 / 2**20:.1f} MiB float64)"
