"""Finished runs to results: their held-out pass, metrics and label-free indices, k slabs written.

The engine calls back between its data passes; whatever is done there holds
up the next pass. So the driver's thread only decides and submits: one
held-out pass for every run that finished (when they complete some k, or
when the evaluators are idle), then the per-run metrics go to evaluator
threads and each settled k's slab write to a writer thread, while the
engine carries on. The driver's thread collects
their values on later call-backs (``flush(force=True)`` waits for all of
them), fills the slabs and keeps every count, so a failed run, a retry or a
k's ``status`` is decided in one thread only. A k's slab is handed to the
writer once all its cells are settled and is not touched again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import sklearn
import xarray as xr

from kmclust.lloyd import driver, runs
from kmclust.sweep import metrics
from kmclust.sweep.config import Cell, SweepConfig
from kmclust.sweep.split import DataSplit
from kmclust.sweep.store import strings, write_slab

log = logging.getLogger(__name__)

SCALE = 1.0 / 255.0
#: bytes of silhouette sample distances kept between flushes (2,000 rows: 32 MB per seed)
SILHOUETTE_CACHE = 512 * 2**20

#: threads computing the runs' values (numba's kernels and numpy release the GIL)
EVALUATORS = 2
#: finished runs that get their held-out pass early when the evaluators are idle (else it
#: waits until the finished runs complete some k, to keep the number of held-out passes low)
IDLE_BATCH = 4
#: a finished run waiting for its values: its cell, its result, seconds since its batch began,
#: its held-out labels if they came with it (runs spread over workers), else None
Finished = tuple[Cell, runs.RunResult, float, np.ndarray | None]


def cell_values(
    res: runs.RunResult,
    data: DataSplit,
    test: tuple[np.ndarray, ...] | None,
    seconds: float,
    indices: dict[str, float],
) -> dict[str, object]:
    """Every value of one finished run, by results variable (see kmclust.sweep.schema).

    ``indices``: its label-free indices (Davies–Bouldin, Calinski–Harabasz, silhouette),
    computed for several runs at once (Collector._evaluate).
    """
    k = res.centroids.shape[0]
    # its checks are slow per call; the rows are scaled uint8 images, so always finite
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        if data.labelled:
            values = metrics.evaluate(
                res.labels,
                data.y_train,
                test[0] if test else np.empty(0, int),
                data.y_test if test else data.y_test[:0],
                k,
                len(data.class_names),
            )
        else:  # no label metrics: the schema leaves them out of the results
            values = {"cluster_size": np.bincount(res.labels, minlength=k).astype(np.int64)}
    values |= indices
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


def fill_cell(
    slab: xr.Dataset | dict[str, np.ndarray], ii: int, si: int, values: dict[str, object]
) -> None:
    """Put one cell's values into the slab (k index 0), or into its variables' numpy arrays.

    An array fills the front of its padded dim (cluster, iteration); its other
    dims (the image's) are whole. Plain numpy writes: xarray's indexing is
    slow per call.
    """
    arrays = slab if isinstance(slab, dict) else {name: slab[name].values for name in values}
    for name, value in values.items():
        target = arrays[name]
        if target.ndim == 3:
            target[0, ii, si] = value
            continue
        value = np.asarray(value).reshape(-1, *target.shape[4:])
        target[0, ii, si, : len(value)] = value


class Collector:
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
        kis = sorted({c[0] for c in cells})
        loaded = results.isel(k=kis).load(scheduler="sync") if kis else None  # one read
        self.slabs = {ki: loaded.isel(k=slice(j, j + 1)) for j, ki in enumerate(kis)}
        # each slab's variables as numpy arrays (views: filling them fills the slab)
        self.arrays = {
            ki: {name: slab[name].values for name in slab.data_vars}
            for ki, slab in self.slabs.items()
        }
        self.pending = {ki: sum(c[0] == ki for c in cells) for ki in self.slabs}
        self.finished: list[Finished] = []
        self.failed: list[str] = []
        self.n_done, self.total = n_done, total
        # the training rows as read (uint8), once loaded: the runs cluster x_train * SCALE
        self.x_train = np.empty((0, 0), np.uint8)
        self.silhouettes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seed → sample, distances
        self.worker = ThreadPoolExecutor(EVALUATORS, thread_name_prefix="kmclust-evaluate")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="kmclust-write")
        self.jobs: deque[tuple[str, Future]] = deque()  # ("values" | "write", its future)
        self.lock = threading.Lock()  # the silhouette distances, shared by the evaluators
        # seconds the driver spent on held-out passes and waiting for the background threads
        self.seconds = {"held-out passes": 0.0, "waiting for metrics and writes": 0.0}

    def close(self) -> None:
        """Stop the background threads (after the job, or on an error: queued work is dropped)."""
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)

    def fail(self, cell: Cell, reason: str) -> None:
        ki, ii, si = cell
        at = {"k": 0, "init": ii, "seed": si}
        self.slabs[ki]["status"][at] = "failed"
        self.slabs[ki]["error"][at] = reason
        self.failed.append(f"{self.config.cell_name(cell)}: {reason}")
        self.pending[ki] -= 1

    def finish(
        self, cell: Cell, res: runs.RunResult, seconds: float, test: np.ndarray | None = None
    ) -> None:
        """Take a finished run; ``test``: its held-out labels, if its task labelled them."""
        if res.ok:
            self.finished.append((cell, res, seconds, test))
        else:
            self.fail(cell, res.error)

    def _silhouette_rows(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The silhouette's sample of training rows for ``seed`` and the distances between them.

        Kept from one flush to the next (every k scores a seed on the same rows), up to
        SILHOUETTE_CACHE bytes of distances; the oldest seed's are dropped first.
        """
        with self.lock:
            return self._silhouette_locked(seed)

    def _silhouette_locked(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        if seed not in self.silhouettes:
            sample = metrics.silhouette_rows(len(self.x_train), self.config.silhouette_sample, seed)
            kept = sum(d.nbytes for _, d in self.silhouettes.values())
            while self.silhouettes and kept + 8 * len(sample) ** 2 > SILHOUETTE_CACHE:
                _, dropped = self.silhouettes.pop(next(iter(self.silhouettes)))
                kept -= dropped.nbytes
            self.silhouettes[seed] = (sample, metrics.sample_distances(self.x_train, sample))
        return self.silhouettes[seed]

    def _evaluate(self, batch: list[Finished], tests: list) -> list[tuple[Cell, dict]]:
        """Every value of each finished run (in the background thread); Davies–Bouldin and
        Calinski–Harabasz of all of them from one read of the training rows."""
        out = []
        # by seed: the silhouette's sample, and the distances between its rows, are the
        # same for every run of a seed, so they are computed once per seed
        runs = sorted(zip(batch, tests), key=lambda f: f[0][0][2])
        labels = [res.labels for (_, res, _, _), _ in runs]
        for ((cell, res, seconds, _), test), indices in zip(
            runs, metrics.cluster_indices(self.x_train, labels, SCALE), strict=True
        ):
            sample, distances = self._silhouette_rows(self.config.seeds[cell[2]])
            indices["silhouette"] = metrics.sample_silhouette(
                self.x_train, res.labels, sample, distances
            )
            out.append((cell, cell_values(res, self.data, test, seconds, indices)))
        return out

    def _write(self, ki: int, slab: xr.Dataset) -> int:
        """Write one settled k (in the background thread); its cells that are done."""
        write_slab(self.out, ki, slab)
        return int(np.sum(strings(slab["status"]) == "done"))

    def _collect(self, wait: bool) -> None:
        """Take in the background thread's finished work, oldest first (all of it if ``wait``),
        and hand every settled k to the writer."""
        while True:
            for ki in [ki for ki, left in self.pending.items() if left == 0]:
                slab = self.slabs.pop(ki)
                del self.pending[ki], self.arrays[ki]
                job = self.writer.submit(lambda ki=ki, slab=slab: (ki, self._write(ki, slab)))
                self.jobs.append(("write", job))
            if not self.jobs or not (wait or self.jobs[0][1].done()):
                return
            kind, job = self.jobs.popleft()
            t0 = time.perf_counter()
            result = job.result()  # re-raises the background thread's error here
            self.seconds["waiting for metrics and writes"] += time.perf_counter() - t0
            if kind == "values":
                for (ki, ii, si), values in result:
                    fill_cell(self.arrays[ki], ii, si, values)
                    self.pending[ki] -= 1
                continue
            ki, n_done = result
            self.n_done += n_done
            if self.on_batch is not None:
                self.on_batch(self.n_done, self.total, self.config.ks[ki])

    def _held_out(self, batch: list[Finished]) -> list[tuple[np.ndarray, ...] | None]:
        """Per finished run, its held-out labels (as a 1-tuple); one pass for the runs that came
        without them. None when there are no labelled held-out rows (only accuracy needs them)."""
        if not (self.data.y_test.size and self.data.labelled):
            return [None] * len(batch)
        need = [f[1].centroids for f in batch if f[3] is None]
        passed = iter(
            driver.predict(self.data.x_test, need, scale=SCALE, errors=False) if need else []
        )
        return [(f[3],) if f[3] is not None else next(passed) for f in batch]

    def flush(self, force: bool = False) -> None:
        """Evaluate the finished runs and write every settled k.

        The held-out pass (one for all finished runs) waits until it completes
        some k, or until IDLE_BATCH runs wait while the evaluators are idle, so a
        sweep makes a few dozen test passes rather than one per run; ``force``
        evaluates whatever has finished and waits until every settled k is written.
        """
        self._collect(wait=False)
        waiting = {f[0][0] for f in self.finished}
        completes = any(
            sum(f[0][0] == ki for f in self.finished) == self.pending[ki] for ki in waiting
        )
        idle = not self.jobs and len(self.finished) >= IDLE_BATCH
        if self.finished and (force or completes or idle):
            batch, t0 = self.finished, time.perf_counter()
            tests = self._held_out(batch)
            self.seconds["held-out passes"] += time.perf_counter() - t0
            self.finished = []  # only now: if the held-out pass fails, the runs are retried
            for part in range(EVALUATORS):  # the runs dealt out to the evaluator threads
                job = self.worker.submit(
                    self._evaluate, batch[part::EVALUATORS], tests[part::EVALUATORS]
                )
                self.jobs.append(("values", job))
        self._collect(wait=force)
