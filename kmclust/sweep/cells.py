"""How a sweep's pending cells are computed, and what happens when some fail.

When every worker can hold a copy of the rows, the cells are dealt into
batches, each fitted to the end on one worker (kmclust.lloyd.spread: no pass
crosses the network); else all advance as one engine batch over the data's
row chunks (kmclust.lloyd.driver), in as few groups of runs as keep every
worker thread busy. Either way finished runs go to the Collector as they
end. A batch that fails (a lost worker) is split in halves until the failing
cells are isolated; corrupt data or a lost scheduler end the job.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kmclust.errors import KmclustError, SchedulerError
from kmclust.lloyd import driver, placement, runs, spread
from kmclust.sweep.collect import SCALE, Collector
from kmclust.sweep.config import Cell, SweepConfig
from kmclust.sweep.split import DataSplit, corrupt, load_error, one_line
from kmclust.sweep.store import ResultsWriteError

log = logging.getLogger(__name__)


def run_cells(
    config: SweepConfig,
    data: DataSplit,
    cells: list[Cell],
    inits: dict[Cell, np.ndarray],
    sink: Collector,
    n_groups: int,
    tries: int = 2,
) -> None:
    """Run ``cells``: spread over the workers when every worker can hold the rows, else as one
    engine batch over row chunks; a batch that fails is split until the culprit is isolated.

    A single cell gets ``tries`` attempts: a worker that died for another
    cell can take an innocent cell's tasks with it.
    """
    client = placement.default_client()
    nbytes = data.x_train.nbytes + data.x_test.nbytes
    if client is not None and spread.fits_every_worker(client, nbytes):
        lost = _spread_cells(config, data, cells, inits, sink, placement.n_threads(client))
    else:
        lost = _batch_cells(config, data, cells, inits, sink, n_groups)
    for part, exc in lost:
        _isolate(config, data, part, exc, inits, sink, n_groups, tries)


def _batch_cells(
    config: SweepConfig,
    data: DataSplit,
    cells: list[Cell],
    inits: dict[Cell, np.ndarray],
    sink: Collector,
    n_groups: int,
) -> list[tuple[list[Cell], Exception]]:
    """``cells`` as one engine batch over the data's row chunks; if it fails, the cells that did
    not finish and the error."""
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
        unflushed = {f[0] for f in sink.finished}
        sink.finished = [f for f in sink.finished if f[0] not in cells]
        return [([c for c in cells if c not in settled or c in unflushed], exc)]
    return []


def _spread_cells(
    config: SweepConfig,
    data: DataSplit,
    cells: list[Cell],
    inits: dict[Cell, np.ndarray],
    sink: Collector,
    threads: int,
) -> list[tuple[list[Cell], Exception]]:
    """``cells`` dealt into batches (a k's cells together), each fitted on a worker holding every
    row (:mod:`kmclust.lloyd.spread`); the batches that failed and their errors."""
    t0 = time.perf_counter()
    plan = spread.deal(
        [config.ks[c[0]] for c in cells], [c[0] for c in cells], spread.BATCHES_PER_THREAD * threads
    )
    held_out = data.x_test if data.y_test.size and data.labelled else None
    log.info(
        "%d runs in %d batches over the workers, each holding every row (%.1f MiB)",
        len(cells),
        len(plan),
        (data.x_train.nbytes + data.x_test.nbytes) / 2**20,
    )
    lost = []
    for members, outcome in spread.fit_batches(
        placement.default_client(),
        data.x_train,
        held_out,
        [inits[c] for c in cells],
        plan,
        idle=sink.flush,
        tol=config.tol,
        max_iter=config.max_iter,
        scale=SCALE,
        return_labels=True,
        integer=True,
    ):
        if isinstance(outcome, Exception):
            lost.append(([cells[i] for i in members], outcome))
            continue
        for i, res, test in zip(members, *outcome, strict=True):
            sink.finish(cells[i], res, time.perf_counter() - t0, test)
        sink.flush()
    sink.flush(force=True)
    return lost


def _isolate(
    config: SweepConfig,
    data: DataSplit,
    cells: list[Cell],
    exc: Exception,
    inits: dict[Cell, np.ndarray],
    sink: Collector,
    n_groups: int,
    tries: int,
) -> None:
    """After ``cells`` failed with ``exc``: end the job if no retry can cure it, else retry them
    in halves (a single cell ``tries`` times in all), recording the culprits as failed."""
    ending = fatal(exc, data)
    if ending is not None:
        raise ending from None
    reason = one_line(exc)
    try:  # a lost worker may have taken persisted rows with it: load them afresh
        data.load()
    except Exception as again:  # noqa: BLE001 - reported as one line
        raise fatal(again, data) or load_error(again, data.store) from None
    if len(cells) == 1 and tries > 1:
        log.warning("cell %s failed (%s); trying it once more", cells[0], reason)
        run_cells(config, data, cells, inits, sink, n_groups, tries - 1)
        return
    if len(cells) <= 1:
        for cell in cells:
            sink.fail(cell, reason)
        sink.flush(force=True)
        return
    log.warning("a batch of %d cells failed (%s); retrying it in halves", len(cells), reason)
    half = len(cells) // 2
    for part in (cells[:half], cells[half:]):
        run_cells(config, data, part, inits, sink, n_groups)


def fatal(exc: Exception, data: DataSplit) -> KmclustError | None:
    """Errors that no retry of a smaller batch can cure: corrupt data, a lost scheduler."""
    if isinstance(exc, ResultsWriteError):
        return exc
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
