"""Executors: each turns a :class:`~kmclust.lloyd.plan.PassPlan` into work and keeps what the
chunks remember between passes.

- :class:`PoolExecutor`: chunk tasks straight to a thread pool (in-memory chunks, no graph);
- :class:`GraphExecutor`: one plain dask graph a pass, on a distributed client or dask's local
  scheduler;
- :class:`SlotExecutor`: one task per worker thread over the chunks its worker holds.

Each has one method, ``run(plan) -> list[Partial]`` (one per group, reduced along
``plan.tree``, so the bits never depend on the executor), and its own chunk states.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask.utils import parse_bytes
from threadpoolctl import ThreadpoolController

from kmclust.lloyd import kernel
from kmclust.lloyd.kernel import ChunkArgs
from kmclust.lloyd.partial import ChunkState, Partial, combine
from kmclust.lloyd.placement import chunk_refs, distributed_loaded, n_threads, worker_slots
from kmclust.lloyd.plan import PassPlan, fold

#: The executors a caller may force (``executor=``; None: the driver's choice).
EXECUTORS = ("pool", "graph", "slots")

#: distributed's size above which the client warns that it sends a large graph.
_LARGE_GRAPH = "distributed.admin.large-graph-warning-threshold"

#: Chunk-task arguments above this size get a graph key of their own under a distributed Client.
SHARE_BYTES = 64 * 2**10

#: Test-only fault hook: a worker process whose chunk task stacks a run with this k kills itself.
KILL_K_ENV = "KMCLUST_TEST_KILL_K"
#: Test-only delay: a worker's chunk task that stacks a run with this k first sleeps SLOW_SECONDS
#: (so a fault can land while that k's cells are still running, however fast the others end).
SLOW_K_ENV = "KMCLUST_TEST_SLOW_K"
SLOW_SECONDS = 0.25


class Executor(Protocol):
    """Runs passes; keeps the chunks' states from one pass to the next."""

    def run(self, plan: PassPlan) -> list[Partial]:
        """Compute one pass: per group of ``plan``, its partials reduced along ``plan.tree``."""
        ...


def pick(x: da.Array, client, name: str | None, w: da.Array | None = None) -> Executor:
    """The executor ``name`` for ``x``'s chunks (and the sample weights ``w``, chunked alike),
    or (None) the one that suits them best."""
    source, chunks = chunk_refs(x)
    wsource, wchunks = chunk_refs(w) if w is not None else ({}, None)
    slots = worker_slots(client, chunks) if client is not None else None
    in_memory = not (source or wsource) and all(
        isinstance(c, np.ndarray) for c in chunks + (wchunks or [])
    )
    threaded = _threaded_here()
    if name is None:
        if client is not None:
            name = "slots" if slots is not None else "graph"
        else:
            name = "pool" if in_memory and threaded else "graph"
    if name == "slots" and slots is not None:
        return SlotExecutor(client, chunks, slots, wchunks)
    if name == "pool" and in_memory:
        return PoolExecutor(chunks, n_threads(None), wchunks)
    if name == "graph":
        return GraphExecutor({**source, **wsource}, chunks, client, wchunks)
    if name in EXECUTORS:
        raise ValueError(
            f"executor {name!r} cannot run these chunks: 'slots' needs every chunk persisted on a "
            "distributed cluster, 'pool' every chunk in this process's memory"
        )
    raise ValueError(f"unknown executor {name!r}: one of {', '.join(EXECUTORS)}")


def _chunk_task(
    x: np.ndarray,
    start: int,
    args: ChunkArgs,
    prev: list[ChunkState] | None,
    w: np.ndarray | None = None,
):
    """Entry of a chunk task: the test hooks (in a distributed worker's task thread), the kernel."""
    kill_k, slow_k = os.environ.get(KILL_K_ENV), os.environ.get(SLOW_K_ENV)
    if (kill_k or slow_k) and _in_worker():
        if kill_k and int(kill_k) in np.diff(args.offsets):
            os.kill(os.getpid(), signal.SIGKILL)
        if slow_k and int(slow_k) in np.diff(args.offsets):
            time.sleep(SLOW_SECONDS)
    return kernel.lloyd_chunk(x, start, args, prev, w)


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _threaded_here() -> bool:
    """Whether dask would compute here on its threaded scheduler (its default for arrays).

    dask's own answer (``get_scheduler``) imports distributed to look for a client; while it is
    not imported (:func:`~kmclust.lloyd.placement.distributed_loaded`) a named scheduler in dask
    config decides. Anything else is asked of dask.
    """
    name = dask.config.get("scheduler", None)
    if distributed_loaded() is None and (name is None or isinstance(name, str)):
        return name is None or dask.base.named_schedulers.get(name.lower()) is dask.threaded.get
    return dask.base.get_scheduler() in (None, dask.threaded.get)


class PoolExecutor:
    """Chunk tasks straight to a pool of as many threads as dask's (``num_workers``), no graph.

    For in-memory chunks on dask's threaded scheduler: dask's local scheduler
    spent more time converting, ordering and tracking a pass's tasks than a
    settled pass's kernels take.
    """

    def __init__(self, chunks: list[np.ndarray], threads: int, weights: list | None = None):
        self.chunks = chunks
        self.threads = threads
        self.weights = weights or [None] * len(chunks)  # the chunks' sample weights
        self.states: list[list[ChunkState]] | None = None  # per chunk, per group

    def run(self, plan: PassPlan) -> list[Partial]:
        prev = self.states if plan.stateful else None
        calls = [
            [
                (blk, start, args, prev[c] if prev else None, wb)
                for c, (blk, start, wb) in enumerate(zip(self.chunks, plan.starts, self.weights))
            ]
            for args in plan.tasks
        ]
        if len(calls) == 1 and len(calls[0]) == 1:  # one task (small data): no hand-off to a thread
            done = [[_chunk_task(*calls[0][0])]]
        else:
            pool = _thread_pool(self.threads)
            pending = [[pool.submit(_chunk_task, *call) for call in group] for group in calls]
            done = [[f.result() for f in per_group] for per_group in pending]
        if plan.stateful:
            self.states = [[per_group[c][1] for per_group in done] for c in range(len(self.chunks))]
        return [fold([part for part, _ in per_group], plan.tree, combine) for per_group in done]


class GraphExecutor:
    """One plain task graph a pass (dask's custom-graph dicts), computed in one call.

    Building it through ``dask.delayed`` cost more in expression handling
    than a settled pass's kernels take. On a distributed ``client`` the
    states stay on the workers as futures (never gathered); without one,
    dask's current local scheduler computes the graph. ``source`` is the
    graph the chunk references need (streamed chunks), else empty.
    """

    def __init__(self, source: dict, chunks: list, client=None, weights: list | None = None):
        self.source = source
        self.chunks = chunks
        self.client = client
        self.weights = weights or [None] * len(chunks)  # the chunks' sample weights
        self.states: list[list] | None = None  # per chunk, per group: futures or ChunkStates
        self._held: list = []  # futures dropped only after the next submission (see submit)

    def run(self, plan: PassPlan) -> list[Partial]:
        token = plan.token
        dsk = dict(self.source)
        roots: list = []
        state_keys: list[list] = [[] for _ in self.chunks]
        carried = 0  # bytes of centroids in the graph: once per chunk task unless shared
        for g, args in enumerate(plan.tasks):
            ref = _share(dsk, f"kmclust-args-{token}-{g}", args, self.client)
            carried += args.nbytes * (1 if ref is not args else len(self.chunks))
            parts = []
            for c, (blk, start) in enumerate(zip(self.chunks, plan.starts)):
                prev = self.states[c] if plan.stateful and self.states else None
                task = (f"kmclust-chunk-{token}", g, c)
                dsk[task] = (_chunk_task, blk, start, ref, prev, self.weights[c])
                dsk[(f"kmclust-part-{token}", g, c)] = (operator.getitem, task, 0)
                parts.append((f"kmclust-part-{token}", g, c))
                if plan.stateful:
                    dsk[(f"kmclust-state-{token}", g, c)] = (operator.getitem, task, 1)
                    state_keys[c].append((f"kmclust-state-{token}", g, c))
            roots.append(fold(parts, plan.tree, _add_combine(dsk, f"kmclust-combine-{token}-{g}")))
        flat = [k for per_chunk in state_keys for k in per_chunk]
        if self.client is None:
            get = dask.base.get_scheduler() or dask.threaded.get
            out = get(dsk, roots + flat)
            results, states = out[: len(roots)], out[len(roots) :]
        else:  # one submission: states stay on the workers as futures
            futures = submit(self.client, dsk, roots + flat, carried)
            self._held = [futures]
            earlier = [f for per_chunk in self.states or [] for f in per_chunk]
            results = _gather(self.client, futures, len(roots), earlier)
            states = futures[len(roots) :]
        if plan.stateful:
            per = len(plan.tasks)
            if self.client is not None:
                self._held.append(self.states)
            self.states = [list(states[c * per : (c + 1) * per]) for c in range(len(self.chunks))]
        return list(results)


def _share(dsk: dict, key: str, args: ChunkArgs, client) -> ChunkArgs | str:
    """A group's arguments for its tasks: inline, or (large, on a cluster) one data key.

    As a key a large centroid stack travels to one worker once a pass and from it
    to the others (inline, it went through the scheduler once per task: 12.5 MB each
    for the default study's 4,000 centroids). A key, unlike scattered data, is
    computed again if the worker holding it dies: a scatter with ``broadcast``
    hung for good when a worker was killed during it.
    """
    if client is None or args.nbytes < SHARE_BYTES:
        return args
    dsk[key] = args
    return key


def _add_combine(dsk: dict, name: str) -> Callable[[list], tuple]:
    """A ``merge`` for :func:`~kmclust.lloyd.plan.fold` that adds a combine task to ``dsk``."""
    counter = itertools.count()

    def merge(keys: list) -> tuple:
        key = (name, next(counter))
        dsk[key] = (combine, keys)
        return key

    return merge


def _slot_task(
    blocks: list, starts: list, prevs: list, prev_index: list, args: ChunkArgs, weights: list
):
    """Entry of a slot task: the chunk task for each of one worker thread's chunks in turn.

    ``prevs`` are the previous pass's slot results holding these chunks'
    states; ``prev_index[i]`` lists (result, position) pairs, flattened, for
    chunk ``i``; ``weights`` the chunks' sample weights (or Nones). Returns the
    chunks' partials (in ``blocks`` order) and states.
    """
    parts, states = [], []
    for blk, start, where, wb in zip(blocks, starts, prev_index, weights):
        prev = [prevs[r][1][j] for r, j in zip(where[::2], where[1::2])] or None
        part, state = _chunk_task(blk, start, args, prev, wb)
        parts.append(part)
        states.append(state)
    return parts, states


class SlotExecutor:
    """One task per worker thread and group over the chunks its worker holds (all persisted).

    ``slots`` lists the chunk indices of each worker thread
    (:func:`kmclust.lloyd.placement.worker_slots`). A slot task's result, held
    as its chunks' state until the next pass, also keeps their partials there
    (int32 sums, sparse after the first passes); the driver reduces the
    gathered partials along the plan's tree. Small arguments go inline, a large
    centroid stack as one data key a pass (:func:`_share`).
    """

    def __init__(self, client, chunks: list, slots: list[list[int]], weights: list | None = None):
        self.client = client
        self.chunks = chunks
        self.slots = slots
        self.weights = weights or [None] * len(chunks)  # the chunks' sample weights
        self.states: list[list] | None = None  # per chunk, per group: (slot future, position)
        self._held: list = []  # futures dropped only after the next submission (see submit)

    def run(self, plan: PassPlan) -> list[Partial]:
        dsk: dict = {}
        part_keys = []  # per group, per slot
        state_keys: list[list] = [[] for _ in self.chunks]  # per chunk: (slot task key, position)
        shared = [
            _share(dsk, f"kmclust-args-{plan.token}-{g}", a, self.client)
            for g, a in enumerate(plan.tasks)
        ]
        carried = sum(
            a.nbytes * (1 if r is not a else len(self.slots)) for a, r in zip(plan.tasks, shared)
        )
        for g, args in enumerate(shared):
            for s, members in enumerate(self.slots):
                refs, where = (
                    self._previous(members) if plan.stateful else ([], [[]] * len(members))
                )
                task = (f"kmclust-slot-{plan.token}", g, s)
                blocks = [self.chunks[c] for c in members]
                dsk[task] = (
                    _slot_task,
                    blocks,
                    [plan.starts[c] for c in members],
                    refs,
                    where,
                    args,
                    [self.weights[c] for c in members],
                )
                dsk[(f"kmclust-part-{plan.token}", g, s)] = (operator.getitem, task, 0)
                part_keys.append((f"kmclust-part-{plan.token}", g, s))
                for j, c in enumerate(members):
                    state_keys[c].append((task, j))
        tasks = sorted({key for per in state_keys for key, _ in per}) if plan.stateful else []
        futures = submit(self.client, dsk, part_keys + tasks, carried)
        self._held = [futures]
        earlier = [f for per_chunk in self.states or [] for f, _ in per_chunk]
        gathered = _gather(self.client, futures, len(part_keys), earlier, direct=True)
        if plan.stateful:
            held = dict(zip(tasks, futures[len(part_keys) :]))
            self._held.append(self.states)
            self.states = [[(held[key], j) for key, j in per] for per in state_keys]
        results, n = [], len(self.slots)
        for g in range(len(plan.tasks)):
            by_chunk: list = [None] * len(self.chunks)
            for members, parts in zip(self.slots, gathered[g * n : (g + 1) * n]):
                for c, part in zip(members, parts):
                    by_chunk[c] = part
            results.append(fold(by_chunk, plan.tree, combine))
        return results

    def _previous(self, members: list[int]) -> tuple[list, list[list[int]]]:
        """The previous slot results holding the states of chunks ``members``, and per chunk its
        (result, position) pairs, flattened."""
        index: dict[str, int] = {}
        refs, where = [], []
        for c in members:
            flat = []
            for fut, j in self.states[c] if self.states else []:
                if fut.key not in index:
                    index[fut.key] = len(refs)
                    refs.append(fut)
                flat += [index[fut.key], j]
            where.append(flat)
        return refs, where


def submit(client, dsk: dict, keys: list, carried: int) -> list:
    """Submit a pass's graph (or kmclust.lloyd.spread's batches, whose initial centroids it carries
    likewise); the caller drops the futures of earlier passes only after this.

    The client sends both the graph and the release of dropped futures
    through one batched stream, at most one message per batch interval:
    releases sent at the end of a pass held the next pass's graph back, and
    the scheduler's own batches to the workers (freeing those keys) then held
    the tasks back again (see BENCHMARKS.md). Sent after the graph, the
    releases delay nothing. The graph carries the pass's centroids
    (``carried`` bytes, inline in tasks) by design, so distributed's
    "Sending large graph" warning is raised above that.
    """
    limit = max(parse_bytes(dask.config.get(_LARGE_GRAPH, "10MB")), 2 * carried)
    with dask.config.set({_LARGE_GRAPH: limit}):
        return client.get(dsk, keys, sync=False)


def _gather(client, futures: list, n: int, earlier: list, direct: bool | None = None) -> list:
    """The results of the first ``n`` futures; on failure cancel the pass and the earlier states.

    Left running, a task that kills its worker would go on killing workers
    while the caller reloads data or retries other runs.
    """
    try:
        return client.gather(futures[:n], direct=direct)
    except BaseException:
        client.cancel(futures + earlier)
        raise


@functools.cache
def _thread_pool(n: int) -> ThreadPoolExecutor:
    """One pool of ``n`` threads per process, kept for later passes and calls."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="kmclust-chunk")


def one_blas_thread(fn: Callable) -> Callable:
    """Run ``fn`` with one BLAS thread per task, as distributed's worker processes do.

    The same bits on every scheduler (OpenBLAS rounds differently with more
    threads), and no BLAS threads competing with dask's threads for cores.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _blas().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@functools.cache
def _blas() -> ThreadpoolController:
    """The process's thread pools, found once: each search reads every loaded library's path
    (~7 ms here, more than a whole small fit of scikit-learn's). The BLAS the kernels call is
    numpy's, loaded before kmclust is."""
    return ThreadpoolController()
