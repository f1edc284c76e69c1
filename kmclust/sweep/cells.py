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
from dataclasses import dataclass

import numpy as np

from kmclust.errors import KmclustError, SchedulerError
from kmclust.lloyd import driver, placement, runs, spread
from kmclust.sweep.collect import SCALE, Collector
from kmclust.sweep.config import Cell, SweepConfig
from kmclust.sweep.split import DataSplit, corrupt, load_error, one_line
from kmclust.sweep.store import ResultsWriteError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What every way of computing cells shares: the config, the data, each cell's initial
    centroids, the Collector of finished runs, the groups per pass of a batch over row chunks."""

    config: SweepConfig
    data: DataSplit
    inits: dict[Cell, np.ndarray]
    sink: Collector
    n_groups: int


def run_cells(job: Job, cells: list[Cell], tries: int = 2) -> None:
    """Run ``cells``: spread over the workers when every worker can hold the rows, else as one
    engine batch over row chunks; a batch that fails is split until the culprit is isolated.

    A single cell gets ``tries`` attempts: a worker that died for another
    cell can take an innocent cell's tasks with it.
    """
    client = placement.default_client()
    nbytes = job.data.x_train.nbytes + job.data.x_test.nbytes
    if client is not None and spread.fits_every_worker(client, nbytes):
        lost = _spread_cells(job, cells, client)
    else:
        lost = _batch_cells(job, cells)
    for part, exc in lost:
        _isolate(job, part, exc, tries)


def _batch_cells(job: Job, cells: list[Cell]) -> list[tuple[list[Cell], Exception]]:
    """``cells`` as one engine batch over the data's row chunks; if it fails, the cells that did
    not finish and the error."""
    t0, sink = time.perf_counter(), job.sink
    settled: set[Cell] = set()

    def done(i: int, res: runs.RunResult) -> None:
        settled.add(cells[i])
        sink.finish(cells[i], res, time.perf_counter() - t0)

    try:
        driver.lloyd(
            job.data.x_train,
            [job.inits[c] for c in cells],
            persist=False,
            n_groups=job.n_groups,
            on_done=done,
            progress=lambda *_: sink.flush(),
            **_lloyd_kw(job.config),
        )
        sink.flush(force=True)
    except Exception as exc:  # a lost worker, an impossible task: isolate the failing cells
        unflushed = {f[0] for f in sink.finished}
        sink.finished = [f for f in sink.finished if f[0] not in cells]
        return [([c for c in cells if c not in settled or c in unflushed], exc)]
    return []


def _spread_cells(job: Job, cells: list[Cell], client) -> list[tuple[list[Cell], Exception]]:
    """``cells`` dealt into batches (a k's cells together), each fitted on a worker holding every
    row (:mod:`kmclust.lloyd.spread`); the batches that failed and their errors."""
    t0, data, sink = time.perf_counter(), job.data, job.sink
    plan = spread.deal(
        [job.config.ks[c[0]] for c in cells],
        [c[0] for c in cells],
        spread.BATCHES_PER_THREAD * placement.n_threads(client),
    )
    log.info(
        "%d runs in %d batches over the workers, each holding every row (%.1f MiB)",
        len(cells),
        len(plan),
        (data.x_train.nbytes + data.x_test.nbytes) / 2**20,
    )
    lost = []
    for members, outcome in spread.fit_batches(
        client,
        data.x_train,
        data.x_test if data.y_test.size and data.labelled else None,  # only accuracy needs it
        [job.inits[c] for c in cells],
        plan,
        idle=sink.flush,
        **_lloyd_kw(job.config),
    ):
        if isinstance(outcome, Exception):
            lost.append(([cells[i] for i in members], outcome))
            continue
        for i, res, test in zip(members, *outcome, strict=True):
            sink.finish(cells[i], res, time.perf_counter() - t0, test)
        sink.flush()
    sink.flush(force=True)
    return lost


def _lloyd_kw(config: SweepConfig) -> dict:
    """The engine's options for every run of the sweep, whichever way the runs are computed."""
    return dict(
        tol=config.tol, max_iter=config.max_iter, scale=SCALE, return_labels=True, integer=True
    )


def _isolate(job: Job, cells: list[Cell], exc: Exception, tries: int) -> None:
    """After ``cells`` failed with ``exc``: end the job if no retry can cure it, else retry them
    in halves (a single cell ``tries`` times in all), recording the culprits as failed."""
    ending = fatal(exc, job.data)
    if ending is not None:
        raise ending from None
    reason = one_line(exc)
    try:  # a lost worker may have taken persisted rows with it: load them afresh
        job.data.load()
    except Exception as again:  # noqa: BLE001 - reported as one line
        raise fatal(again, job.data) or load_error(again, job.data.store) from None
    if len(cells) == 1 and tries > 1:
        log.warning("cell %s failed (%s); trying it once more", cells[0], reason)
        run_cells(job, cells, tries - 1)
        return
    if len(cells) <= 1:
        for cell in cells:
            job.sink.fail(cell, reason)
        job.sink.flush(force=True)
        return
    log.warning("a batch of %d cells failed (%s); retrying it in halves", len(cells), reason)
    half = len(cells) // 2
    for part in (cells[:half], cells[half:]):
        run_cells(job, part)


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
