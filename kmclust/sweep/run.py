"""The k × init × seed sweep: the results store, the data, the cells' initial centroids, resume.

The pending cells are computed by kmclust.sweep.cells (spread over the
workers, or as one engine batch over row chunks). As soon as every
cell of a k has finished, that k's slab of the results store (chunked by k) is
written with ``status`` last, so a cell reads ``done`` only once all its data
is on disk (kmclust.sweep.collect evaluates the runs and writes the slabs in a
background thread, off the engine's loop); ``--resume`` recomputes exactly the
cells that are not ``done``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kmclust.errors import KmclustError
from kmclust.lloyd import placement, warm
from kmclust.lloyd.init import cell_seed, data_stats, init_centroids, random_from_stats
from kmclust.location import Location
from kmclust.sweep import remote_results
from kmclust.sweep.cells import Job, fatal, run_cells
from kmclust.sweep.collect import SCALE, Collector
from kmclust.sweep.config import Cell, SweepConfig, check_out, grid_size
from kmclust.sweep.lock import hold
from kmclust.sweep.split import (
    DataSplit,
    load_error,
    split_data,
    staged_image_shape,
)
from kmclust.sweep.store import (
    Place,
    check_size,
    exists,
    finish_store,
    open_results,
    open_store,
    replace_store,
    strings,
)

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    path: Place
    n_cells: int
    n_computed: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # where the seconds went

    def breakdown(self) -> str:
        """The phases as "name 1.2 s, …" (the driver's view: the engine includes its passes'
        wait for the workers; held-out passes and waits ran inside the engine's loop)."""
        return ", ".join(f"{name} {sec:.1f} s" for name, sec in self.phases.items())


def run_sweep(
    config: SweepConfig,
    out: str | Path | Location,
    *,
    resume: bool = False,
    overwrite: bool = False,
    parallel: int = 2,
    on_batch: Callable[[int, int, int], None] | None = None,
    storage_options: dict | None = None,
    break_lock: bool = False,
) -> SweepOutcome:
    """Run (or complete) the sweep into ``out`` (a path or an fsspec URL) on the current Dask
    scheduler.

    All pending cells advance as one engine batch whose passes keep ``parallel`` worker
    threads busy (:func:`n_groups`); ``on_batch(done_cells, total_cells, k)``
    reports progress each time a k's cells are written. ``storage_options``
    (credentials, endpoint) reach the data and results stores at URLs and are
    never recorded; the store's lock (kmclust.sweep.lock) is held throughout.
    """
    # the workers load the engine's kernels while this process checks, opens and draws
    with warm.warming(placement.default_client()):
        return _run_sweep(
            config, out, resume, overwrite, parallel, on_batch, storage_options, break_lock
        )


def _run_sweep(
    config: SweepConfig,
    out: str | Path | Location,
    resume: bool,
    overwrite: bool,
    parallel: int,
    on_batch: Callable | None,
    storage_options: dict | None,
    break_lock: bool,
) -> SweepOutcome:
    """:func:`run_sweep` itself (the workers warming meanwhile)."""
    t0 = time.perf_counter()
    target = check_out(out, replace=overwrite, resume=resume, storage_options=storage_options)
    with hold(target, break_lock=break_lock):
        if isinstance(target, Location):  # a swap a killed --overwrite left, then its debris
            remote_results.recover(target)
            for left in remote_results.leftovers(target):
                remote_results.remove(left)
        data = split_data(config, storage_options)
        check_out(target, inputs=(data.store,), replace=overwrite, resume=resume)
        check_size(config, data)
        out = target
        if overwrite and exists(target):  # built beside the old store, swapped in once complete
            out = (
                remote_results.sibling(target)
                if isinstance(target, Location)
                else target.with_name(f".{target.stem}.overwrite-{uuid.uuid4().hex[:8]}.zarr")
            )
        t_sweep = time.perf_counter()
        try:
            outcome = _sweep(
                config,
                data,
                out,
                resume=resume and out == target,
                parallel=parallel,
                on_batch=on_batch,
            )
        except BaseException:
            if out != target:
                _discard(out)
            raise
        if out != target:
            replace_store(out, target)
    outcome.path, outcome.seconds = target, time.perf_counter() - t0
    outcome.phases = {"checks and data split": t_sweep - t0} | outcome.phases
    return outcome


def _discard(out: Place) -> None:
    """Delete the unfinished results of a failed --overwrite (best effort)."""
    if isinstance(out, Path):
        shutil.rmtree(out, ignore_errors=True)
        return
    try:
        remote_results.remove(out)
    except KmclustError as exc:  # the storage may be what failed; the next run removes it
        log.warning("could not delete %s (%s)", out, exc)


def _initial_centroids(
    config: SweepConfig, data: DataSplit, cells: list[Cell], sink: Collector
) -> dict[Cell, np.ndarray]:
    """Each cell's initial centroids; a cell whose initialisation fails is recorded as failed.

    The workers load their rows (``data.load``) while this thread reads its own copy and
    draws the initial centroids: neither waits for the other.
    """
    pool, interrupted = ThreadPoolExecutor(1, thread_name_prefix="kmclust-load"), False
    try:
        loading = pool.submit(data.load)
        try:
            rows = data.train_rows()
            x_train_np = rows * np.float32(SCALE)
        except Exception as exc:  # damaged chunks
            raise fatal(exc, data) or load_error(exc, data.store) from None
        sink.x_train = rows  # as read (uint8): the label-free indices of every finished run
        inits = _draw(config, cells, rows, x_train_np, sink)
        try:
            loading.result()
        except Exception as exc:  # damaged chunks, a worker killed while loading
            raise fatal(exc, data) or load_error(exc, data.store) from None
    except KeyboardInterrupt:
        interrupted = True  # the SIGINT handler froze the workers: the load would never end
        raise
    finally:  # after an error the load ends (or fails) first; after a Ctrl-C the cluster's close
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    return inits


def _draw(
    config: SweepConfig, cells: list[Cell], rows: np.ndarray, x: np.ndarray, sink: Collector
) -> dict[Cell, np.ndarray]:
    """The initial centroids of ``cells`` from the training rows (``rows`` uint8, ``x`` scaled).

    A *data* init picks its rows from the uint8 rows: the same draw (scaling keeps distinct
    rows distinct) without a finiteness check of the float rows per cell; the picked rows
    are then scaled as ``x`` was, so the centroids have the same bits.
    """
    inits: dict[Cell, np.ndarray] = {}
    stats = None  # the rows' per-pixel mean and std: every random init draws from the same
    for cell in cells:
        ki, ii, si = cell
        k, init, seed = config.ks[ki], config.inits[ii], config.seeds[si]
        try:
            if init == "random" and k <= len(x):
                stats = stats or data_stats(x)
                inits[cell] = random_from_stats(*stats, k, cell_seed(seed, k, init))
            elif init == "data" and rows.dtype == np.uint8:
                picked = init_centroids(rows, k, init, cell_seed(seed, k, init))
                inits[cell] = (picked.astype(np.float32) * np.float32(SCALE)).astype(np.float64)
            else:
                inits[cell] = init_centroids(x, k, init, cell_seed(seed, k, init))
        except (ValueError, KmclustError) as exc:
            sink.fail(cell, f"initialisation failed: {exc}")
    return inits


def _sweep(
    config: SweepConfig,
    data: DataSplit,
    out: Place,
    *,
    resume: bool,
    parallel: int,
    on_batch: Callable[[int, int, int], None] | None,
) -> SweepOutcome:
    """Run the pending cells of the results store ``out`` (created here unless resumed)."""
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    lap = _lap(phases)
    results = open_results(out, config, data, resume=resume)
    status = strings(results["status"])
    cells: list[Cell] = [tuple(int(i) for i in c) for c in zip(*np.nonzero(status != "done"))]
    sink = Collector(
        config, data, results, out, cells, on_batch, int(np.sum(status == "done")), status.size
    )
    lap("results store")
    try:
        if cells:
            inits = _initial_centroids(config, data, cells, sink)
            lap("data and initial centroids")
            runnable = [c for c in cells if c in inits]
            if runnable:
                run_cells(Job(config, data, inits, sink, n_groups(parallel, data)), runnable)
            lap("engine")
            try:
                sink.flush(force=True)
            except Exception as exc:  # noqa: BLE001 - the held-out pass of the last runs
                raise fatal(exc, data) or load_error(exc, data.store) from None
            lap("last evaluations and writes")
            phases |= {f"({name}, within the above)": s for name, s in sink.seconds.items()}
    finally:
        sink.close()
    finish_store(out)
    failed = list(sink.failed)
    all_status = strings(open_store(out)["status"])
    for cell in zip(*np.nonzero(all_status != "done")):
        desc = config.cell_name(cell)
        if not any(f.startswith(desc + ":") for f in failed):
            earlier = all_status[cell] == "failed"
            failed.append(f"{desc}: {'failed in an earlier run' if earlier else 'not computed'}")
    computed = int(np.sum((status != "done") & (all_status != "pending")))
    lap("closing the store")
    return SweepOutcome(out, status.size, computed, failed, time.perf_counter() - t0, phases)


def n_groups(parallel: int, data: DataSplit) -> int:
    """Groups of runs per pass: enough that ``parallel`` threads have a task each, no more.

    Every group reads every chunk once a pass: with as many chunks as threads or more, one
    group keeps them all busy, and a second would read each chunk twice (the engine's own
    default, :func:`kmclust.lloyd.driver.lloyd`; the results do not depend on it).
    """
    return max(1, math.ceil(max(1, parallel) / data.x_train.numblocks[0]))


def _lap(phases: dict[str, float]) -> Callable[[str], None]:
    """A stopwatch: each call records the seconds since the previous one under its name."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now

    return lap


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
        f"{len(config.seeds)} seeds, in batches of runs; tol={config.tol:g}, "
        f"max_iter={config.max_iter}; training sample: {sample} (data seed {config.data_seed}); "
        f"≈ {n_centroids} centroids"
    )
    shape = staged_image_shape(config.dataset)
    if shape is None:
        return text
    return text + f" ({n_centroids * math.prod(shape) * 8 / 2**20:.1f} MiB float64)"
