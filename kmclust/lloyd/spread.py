"""Batches of runs spread over a cluster's workers, every worker holding a copy of the rows.

Over row chunks (:mod:`kmclust.lloyd.executors`) every pass of a batch is a
round trip to the workers carrying the batch's centroids each way: on a
LocalCluster here ~20 ms with nothing to compute, 150-500 ms for the default
study's 4,000 centroids on 1,000 rows whose kernels take ~20-60 ms. When the
rows are small enough for every worker to hold them, the runs are dealt out
instead: one task per batch of runs fits them to the end in its worker's
process (:func:`kmclust.lloyd.driver.lloyd` on the task's own thread), then
labels the held-out rows with their centroids. No pass leaves the worker.

The bits are the engine's: a run's result depends neither on the other runs
of its batch nor on the chunking or the executor that computes it.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import dask
import dask.array as da
import numpy as np
from dask.utils import parse_bytes

from kmclust.lloyd.executors import submit
from kmclust.lloyd.runs import RunResult

#: dask config key: the most bytes of rows (training and held-out) every worker may be asked to
#: hold a copy of (a number or a string such as "64 MiB"; 0: never, always row chunks)
COPY_BYTES_KEY = "kmclust.copy-bytes"
COPY_BYTES = 256 * 2**20  # its default
#: ... and at most this share of each worker's memory limit (the copy, the chunks it is made of,
#: per-row state of every run of a batch, distance blocks)
MEMORY_SHARE = 1 / 8
#: batches per worker thread: finer batches balance the threads better and report sooner, each
#: costs its own passes' overhead (the default study on one thread: 2-4 batches 3.2 s, 8 3.5 s,
#: 16 4.2 s, 32 5.7 s)
BATCHES_PER_THREAD = 4

#: seconds between looks at the batches while none has ended
TICK = 0.05

#: What a batch gives back: its fits, and per fit the held-out labels (None: no held-out rows,
#: or a failed fit); or the error that ended the batch's task.
Outcome = tuple[list[RunResult], list[np.ndarray | None]] | BaseException


def fits_every_worker(client, nbytes: int) -> bool:
    """Whether ``nbytes`` of rows may be copied to every worker of ``client``."""
    if nbytes > parse_bytes(dask.config.get(COPY_BYTES_KEY, COPY_BYTES)):
        return False
    workers = client.scheduler_info().get("workers", {}).values()
    limits = [w.get("memory_limit") or 0 for w in workers]
    return bool(limits) and all(not m or nbytes <= m * MEMORY_SHARE for m in limits)


def deal(ks: Sequence[int], keys: Sequence[object], n: int) -> list[list[int]]:
    """Run indices dealt into at most ``n`` batches of about equal cost (Σ k).

    Runs sharing a key (the sweep's k) stay in one batch when there are at
    least ``n`` keys, so whole keys finish together; else each run is dealt
    alone. Largest first, each to the cheapest batch so far (LPT).
    """
    whole = len(set(keys)) >= n
    units: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        units.setdefault(key if whole else i, []).append(i)
    order = sorted(units.values(), key=lambda u: (-sum(ks[i] for i in u), u[0]))
    heap = [(0, b) for b in range(min(n, len(order)))]
    batches: list[list[int]] = [[] for _ in heap]
    for unit in order:
        cost, b = heapq.heappop(heap)
        batches[b] += unit
        heapq.heappush(heap, (cost + sum(ks[i] for i in unit), b))
    return [sorted(b) for b in batches if b]


def fit_batches(
    client,
    x: da.Array,
    held_out: da.Array | None,
    inits: Sequence[np.ndarray],
    batches: list[list[int]],
    idle: Callable[[], None] | None = None,
    **lloyd_kw,
) -> Iterator[tuple[list[int], Outcome]]:
    """Fit the runs of each batch in a task of its own; yields ``(batch, outcome)`` as batches end,
    and calls ``idle()`` every TICK seconds while none ends (the caller's background work: the
    sweep hands its finished k slabs to the writer there).

    ``x`` and ``held_out`` (dask arrays, persisted or not) become one array
    each on some worker, which the others copy from it; a lost worker's copy
    is made again from their graphs. ``lloyd_kw`` go to every
    :func:`~kmclust.lloyd.driver.lloyd` call.
    """
    from distributed import as_completed

    token = uuid.uuid4().hex
    dsk: dict = {}
    rows = _whole(dsk, x, f"kmclust-copy-{token}")
    test = _whole(dsk, held_out, f"kmclust-copy-test-{token}") if held_out is not None else None
    keys = []
    for b, members in enumerate(batches):
        key = f"kmclust-batch-{token}-{b}"
        dsk[key] = (_fit, rows, test, [inits[i] for i in members], lloyd_kw)
        keys.append(key)
    futures = submit(client, dsk, keys, sum(np.asarray(c).nbytes for c in inits))
    which = {f.key: b for b, f in enumerate(futures)}
    ended = as_completed(futures, loop=client.loop)
    try:
        while not ended.is_empty():
            ready = ended.next_batch(block=False)
            if not ready:
                if idle is not None:
                    idle()
                time.sleep(TICK)
            for future in ready:
                members = batches[which[future.key]]
                try:
                    yield members, future.result()
                except Exception as exc:  # noqa: BLE001 - the caller decides (lost worker, bad data)
                    yield members, exc
    finally:
        client.cancel(futures)


def _whole(dsk: dict, x: da.Array, name: str) -> str:
    """Add ``x``'s graph and a task making it one numpy array to ``dsk``; that task's key."""
    one = x.rechunk(x.shape)
    dsk.update(one.__dask_graph__())
    dsk[name] = (np.asarray, (one.name,) + (0,) * one.ndim)
    return name


def _fit(
    rows: np.ndarray, test: np.ndarray | None, inits: list[np.ndarray], kw: dict
) -> tuple[list[RunResult], list[np.ndarray | None]]:
    """A batch's task: its Lloyd loop on this worker's rows, then its fits' held-out labels."""
    from kmclust.lloyd import driver

    # in this process, one thread (the task's), whatever dask would reach from inside a task
    with dask.config.set(scheduler="threads", num_workers=1):
        fits = driver.lloyd(rows, inits, persist=False, executor="pool", **kw)
        done = [f for f in fits if f.ok]
        labels = iter(
            driver.predict(
                test, [f.centroids for f in done], scale=kw.get("scale", 1.0), errors=False
            )
            if test is not None and done
            else []
        )
    return fits, [next(labels)[0] if f.ok and test is not None else None for f in fits]
