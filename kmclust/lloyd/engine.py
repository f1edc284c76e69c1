"""Batched Lloyd iterations as Dask map-reduce: the only module building Lloyd graphs.

Every iteration maps :func:`kmclust.lloyd.chunk.lloyd_chunk` over the data's row
chunks (× a few groups of runs, so that small data still keeps every worker
busy), combines the partials with a fixed-order tree reduction and computes
all groups in one round trip. On a cluster, with the chunks persisted, one
task per worker thread runs the kernel over the chunks its worker holds and
the driver reduces their partials in the same order: a task costs a few ms
of round trips per pass, more than a settled pass's kernels.

The driver then updates each run in float64, relocates empty clusters to
the farthest points, and drops converged runs; a converged run spends one
more pass in the stack as an *evaluation* member to get labels consistent
with its final centroids and an exact J.

Data chunks are persisted once (on the workers under a distributed Client,
in memory with the threaded scheduler) unless ``persist=False``, which
reads them from their source (zarr) every iteration. Between passes each
chunk keeps per-row state (labels, distance bounds) on its worker unless
``stream=True``: then nothing per row outlives a pass, so a worker's memory
is bounded by the chunks in flight, not by the rows it has seen.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask.utils import parse_bytes
from threadpoolctl import threadpool_limits

from kmclust.lloyd import chunk as kernels
from kmclust.lloyd import stopping

#: Partials combined per reduction task.
FAN_IN = 8


@dataclass
class RunResult:
    """Outcome of one Lloyd run; distances and centroids in scaled units."""

    centroids: np.ndarray  # (k, D) float64
    jclust: float = math.nan
    mean_distance: float = math.nan
    n_iter: int = 0
    converged: bool = False
    n_relocated: int = 0
    history: list[float] = field(default_factory=list)
    labels: np.ndarray | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class _Run:
    """Driver-side state of one run (raw data units)."""

    index: int
    c64: np.ndarray
    state: str = "active"  # active | eval | done | failed
    n_iter: int = 0
    converged: bool = False
    n_relocated: int = 0
    history: list[float] = field(default_factory=list)
    labels: list[tuple[int, np.ndarray]] = field(default_factory=list)
    error: str = ""
    sse: Fraction | float = (
        math.nan
    )  # exact sums of the final pass (kmclust.lloyd.nearest.exact_sum)
    dist: Fraction | float = math.nan
    sums: np.ndarray | None = None  # running per-cluster sums (raw units, float64) and counts
    counts: np.ndarray | None = None
    drift: np.ndarray | None = None  # how far each centroid moved in the last update (raw units)

    @property
    def k(self) -> int:
        return self.c64.shape[0]


def as_dask(x: np.ndarray | da.Array, chunk_rows: int = 10_000) -> da.Array:
    """A (N, D) dask array chunked by rows only."""
    if isinstance(x, da.Array):
        return x.rechunk({1: -1}) if x.numblocks[1] != 1 else x
    return da.from_array(np.asarray(x), chunks=(chunk_rows, -1))


def even_chunks(x: da.Array, threads: int) -> da.Array:
    """uint8 rows re-cut into a multiple of ``threads`` equal chunks, unless their count already is one.

    Every pass waits for its slowest thread: 7 chunks on 2 threads left one
    thread idle an eighth of each pass (one k=20 run on Fashion-MNIST: 19.6
    vs 17.8 ms an iteration with 8 chunks; 14 chunks of 5,000 rows cost more
    per chunk than they balance). Results do not depend on the chunking:
    labels are exact, integer sums and the eval sums are exact
    (:func:`kmclust.lloyd.nearest.exact_sum`). Float data keep their chunks (their
    float sums would round differently). A single chunk stays one: runs are
    then split into groups instead (``n_groups``).
    """
    nb, n = x.numblocks[0], x.shape[0]
    if x.dtype != np.uint8 or nb < 2 or nb % threads == 0 or n < threads:
        return x
    return x.rechunk({0: -(-n // (threads * -(-nb // threads)))})


def persist_balanced(x: da.Array) -> da.Array:
    """Persist ``x`` in evenly many chunks (:func:`even_chunks`); under distributed also place them evenly over
    the workers' threads.

    Chunk tasks run where their chunk (and its state) lives, so an uneven
    placement leaves workers idle every pass: 4 of 6 chunks landed on one of
    two workers, which then computed 39.5 s of the grid's 70.5 s (on this
    project's 2-vCPU VM the balanced placement measured no faster: the two
    vCPUs slow each other down; see BENCHMARKS.md).
    ``client.rebalance`` does not help: it only moves data off workers above
    30 % memory use. Each chunk is copied once to its worker under a new key
    (preferred, not required: a lost worker's chunks are recomputed elsewhere).
    """
    client = _client()
    x = even_chunks(x, _n_threads(client))
    if client is not None and x.numblocks[0] >= 2 and _balanced(client, x):
        return x
    x = x.persist()
    if client is None or x.numblocks[0] < 2:
        return x
    from distributed import wait

    slots = [w for w, n in sorted(client.nthreads().items()) for _ in range(n)]
    if len(slots) < 2:
        return x
    name = f"kmclust-placed-{uuid.uuid4().hex}"
    parts = [
        client.persist(
            x.blocks[b].map_blocks(_same, name=f"{name}-{b}"),
            workers=[slots[b % len(slots)]],
            allow_other_workers=True,
        )
        for b in range(x.numblocks[0])
    ]
    placed = da.concatenate(parts)
    wait(placed)
    return placed


def _by_worker(client, refs: list) -> dict[str, list[int]] | None:
    """Indices of ``refs`` per worker holding them ("": held by none), or None if some ref is not a future."""
    from distributed import Future

    if not all(isinstance(r, Future) for r in refs):
        return None
    who = client.who_has(refs)
    out: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        holders = sorted(who.get(ref.key, ()))
        out.setdefault(holders[0] if holders else "", []).append(i)
    return out


def _balanced(client, x: da.Array) -> bool:
    """Every chunk of ``x`` is persisted, and each worker holds its threads' share of them (within one chunk).

    Then placing again would only copy every chunk (~45 ms a call for Fashion-MNIST here).
    """
    refs = _chunk_refs(x)[1]
    held = _by_worker(client, refs)
    nthreads = client.nthreads()
    if held is None or set(held) - set(nthreads):
        return False
    total = sum(nthreads.values())
    return all(abs(len(held.get(w, ())) - len(refs) * n / total) < 1 for w, n in nthreads.items())


def _same(block: np.ndarray) -> np.ndarray:
    """The block itself (a new key: a copy placed on another worker)."""
    return block


def take_rows(x: da.Array, idx: np.ndarray, name: str) -> da.Array:
    """Rows ``idx`` (sorted) of ``x``, selected chunk by chunk under key names after ``name``.

    Unlike ``x[idx]`` (whose shuffle keys hash only the indices, so every
    rebuild shares them), every key here carries ``name``.
    """
    bounds = np.concatenate([[0], np.cumsum(x.chunks[0])])
    parts = []
    for b in range(x.numblocks[0]):
        sel = idx[(idx >= bounds[b]) & (idx < bounds[b + 1])] - bounds[b]
        if sel.size:
            parts.append(
                x.blocks[b].map_blocks(
                    lambda blk, s=sel: blk[s],
                    chunks=((sel.size,), x.chunks[1]),
                    dtype=x.dtype,
                    name=f"{name}-take-{b}",
                )
            )
    return da.concatenate(parts) if parts else x[:0]


def _client():
    """The default distributed Client, if one is active."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _n_threads(client) -> int:
    """Threads running chunk tasks: the cluster's, else dask's local ``num_workers`` (as :meth:`_Pass._pool`)."""
    if client is None:
        return dask.config.get("num_workers", None) or os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))


#: distributed's size above which the client warns that it sends a large graph.
_LARGE_GRAPH = "distributed.admin.large-graph-warning-threshold"

#: Driver-side objects above this size get a graph key of their own under a distributed Client.
SHARE_BYTES = 64 * 2**10


#: Test-only fault hook: a worker process whose chunk task stacks a run with this k kills itself.
KILL_K_ENV = "KMCLUST_TEST_KILL_K"


def _chunk_task(*args):
    """Worker-side entry of a chunk task: the fault hook (distributed workers only), then the pure kernel."""
    kill_k = os.environ.get(KILL_K_ENV)
    if kill_k and int(kill_k) in np.diff(args[3]) and _in_worker():
        os.kill(os.getpid(), signal.SIGKILL)
    return kernels.lloyd_chunk(*args)


class _Args:
    """A pass's arguments for its slot tasks, tokenized by the pass's fresh token.

    ``Client.get`` tokenizes the whole graph (sha1 over every array in it):
    ~1 s of the driver's time over the 96-run grid for the centroid stacks alone.
    """

    __slots__ = ("value", "token")

    def __init__(self, value: tuple, token: str):
        self.value, self.token = value, token

    def __dask_tokenize__(self) -> str:
        return self.token

    def __reduce__(self):
        return _Args, (self.value, self.token)


def _slot_task(blocks: list, starts: list, prevs: list, prev_index: list, args: _Args):
    """Worker-side entry of a slot task: the chunk task for each of one worker thread's chunks in turn.

    ``prevs`` are the previous pass's slot results holding these chunks'
    states; ``prev_index[i]`` lists (result, position) pairs, flattened, for
    chunk ``i``. Returns the chunks' partials (in ``blocks`` order) and states.
    """
    head, tail = args.value  # the chunk task's arguments before and after its previous states
    parts, states = [], []
    for blk, start, where in zip(blocks, starts, prev_index):
        prev = [prevs[r][1][j] for r, j in zip(where[::2], where[1::2])] or None
        part, state = _chunk_task(blk, start, *head, prev, *tail)
        parts.append(part)
        states.append(state)
    return parts, states


def _reduce(parts: list) -> kernels.Partial:
    """The fixed-order tree reduction of :func:`_tree`, in one process (the same sums, bit for bit)."""
    while len(parts) > 1:
        parts = [kernels.combine(parts[i : i + FAN_IN]) for i in range(0, len(parts), FAN_IN)]
    return parts[0]


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _tree(dsk: dict, parts: list, name: str) -> object:
    """Add a fixed-order tree reduction of the ``parts`` keys to ``dsk``; return the root key (deterministic sums)."""
    level = 0
    while len(parts) > 1:
        nxt = []
        for i in range(0, len(parts), FAN_IN):
            key = (name, level, i // FAN_IN)
            dsk[key] = (kernels.combine, parts[i : i + FAN_IN])
            nxt.append(key)
        parts, level = nxt, level + 1
    return parts[0]


def _groups(runs: list[_Run], n_groups: int) -> list[list[_Run]]:
    """Split runs into groups of balanced ΣK (greedy, deterministic), each ordered by k."""
    bins: list[list[_Run]] = [[] for _ in range(max(1, min(n_groups, len(runs))))]
    load = [0] * len(bins)
    for run in sorted(runs, key=lambda r: (-r.k, r.index)):
        g = load.index(min(load))
        bins[g].append(run)
        load[g] += run.k
    return [sorted(b, key=lambda r: (r.k, r.index)) for b in bins if b]


def _chunk_refs(x: da.Array) -> tuple[dict, list]:
    """What a pass's chunk tasks take for each chunk of ``x``, and the graph those references need.

    A persisted chunk is passed as itself (a numpy array, or a future on a
    cluster): no graph entry. Through an alias key (as after ``concatenate``)
    every pass would recompute the alias on some worker and move the chunk
    there, undoing the placement. Any other chunk is the key of the task that
    reads it, with ``x``'s graph.
    """
    from distributed import Future

    graph = dict(x.__dask_graph__())
    refs, needs_graph = [], False
    for row in x.__dask_keys__():
        key = row[0]
        while _is_key(graph.get(key), graph):  # follow aliases
            key = graph[key]
        value = graph.get(key)
        if isinstance(value, (np.ndarray, Future)):
            refs.append(value)
        else:
            refs.append(key)
            needs_graph = True
    return (graph if needs_graph else {}), refs


def _is_key(value, graph: dict) -> bool:
    try:
        return isinstance(value, (str, tuple)) and value in graph
    except TypeError:  # a task tuple holding unhashable arguments
        return False


class _Pass:
    """Map-reduce passes of the kernel over all chunks for a set of runs.

    For integer-valued data each chunk task also leaves its labels on the
    worker as state for the next pass (kept there, never gathered), so the
    kernel can send only changes of the cluster sums.

    Each pass is one plain task graph (dask's custom-graph dicts) computed in
    one call: building it through ``dask.delayed`` cost ~5 ms per pass in
    expression handling, more than a settled pass's kernels take. On dask's
    threaded scheduler with in-memory chunks the chunk tasks skip the graph
    and go to a thread pool (:meth:`_pool`); the partials are added in the
    same order either way, so the bits do not depend on the scheduler.
    """

    def __init__(
        self, x: da.Array, client, n_groups: int, integer: bool, stateful: bool, prune: bool = False
    ):
        self.x = x
        self.client = client
        self.n_groups = n_groups
        self.integer = integer
        self.stateful = stateful and integer
        self.prune = prune and self.stateful
        self.source, self.chunks = _chunk_refs(x)
        self.starts = np.concatenate([[0], np.cumsum(x.chunks[0])[:-1]]).tolist()
        self.cdtype = kernels.compute_dtype(x.dtype)
        self.states: list[list] | None = (
            None  # per chunk: the previous pass's states (objects or futures)
        )
        self._held: list = []  # futures no longer needed, dropped only after the next submission (see _submit)
        self._carried = 0  # bytes of centroids the pass being built carries (see _submit)
        self.slots = self._slots()

    def _slots(self) -> list[list[int]] | None:
        """Chunk indices per worker thread when every chunk is persisted on a cluster, else None.

        Each pass then runs one task per thread over its chunks instead of one
        per chunk: on a LocalCluster of this 2-vCPU machine every task costs a
        few ms of scheduler and worker round trips per pass, more than a
        settled pass's kernels take (see BENCHMARKS.md). A slot task's result,
        held as its chunks' state until the next pass, also keeps their
        partials there (int32 sums: ΣK × D × 4 bytes a chunk, sparse after
        the first passes).
        """
        per_worker = _by_worker(self.client, self.chunks) if self.client is not None else None
        if per_worker is None:
            return None
        nthreads = self.client.nthreads()
        slots = []
        for w in sorted(per_worker):
            mine = per_worker[w]
            n = min(len(mine), max(1, nthreads.get(w, 1)))
            slots.extend(mine[i::n] for i in range(n))
        return slots

    def _share(self, dsk: dict, key: str, obj, nbytes: int):
        """A driver-side object for the pass's tasks: inline, or (large, on a cluster) one data key.

        As a key a 4 MB centroid stack travels once per pass instead of once per chunk task. Slot tasks
        (one per worker thread) take it inline: a data key would cost a task and a hop between workers.
        """
        if self.client is None or self.slots is not None or nbytes < SHARE_BYTES:
            return obj
        dsk[key] = obj
        return key

    def run(
        self,
        runs: list[_Run],
        want_labels: bool,
        want_errors: bool = True,
        patches: dict | None = None,
    ) -> list[tuple[list[_Run], list[int], kernels.Partial]]:
        """Compute one pass; per group: its runs, the stack positions being evaluated, the partial."""
        groups = _groups(runs, self.n_groups)
        self._carried = 0
        token = (
            uuid.uuid4().hex
        )  # fresh keys every pass: nothing to hash, nothing shared with a failed pass
        dsk = dict(self.source)
        roots, eval_pos, slot_parts = [], [], []
        state_keys: list[list] = [[] for _ in self.chunks]
        patches = patches or {}
        patches_ref = self._share(
            dsk,
            f"kmclust-patches-{token}",
            patches,
            sum(i.nbytes + lab.nbytes for i, lab in patches.values()),
        )
        drift = {r.index: r.drift for r in runs if r.drift is not None} if self.prune else None
        pool = self._pool()
        pending: list[list] = []  # per group, the pool's futures of its chunk tasks
        for g, group in enumerate(groups):
            stack = np.concatenate([r.c64 for r in group]).astype(self.cdtype)
            offsets = np.concatenate([[0], np.cumsum([r.k for r in group])]).astype(np.int64)
            run_ids = np.array([r.index for r in group], dtype=np.int64)
            evals = {p: r.c64 for p, r in enumerate(group) if r.state == "eval"}
            self._carried += stack.nbytes + sum(c.nbytes for c in evals.values())
            eval_pos.append(sorted(evals))
            m = max(r.k for r in group)
            stack_ref = self._share(dsk, f"kmclust-stack-{token}-{g}", stack, stack.nbytes)
            evals_ref = self._share(
                dsk, f"kmclust-evals-{token}-{g}", evals, sum(c.nbytes for c in evals.values())
            )
            if self.slots is not None:
                args = (
                    (
                        stack_ref,
                        offsets,
                        run_ids,
                        evals_ref,
                        m,
                        self.integer,
                        want_labels,
                        want_errors,
                    ),
                    (patches_ref, drift, self.prune),
                )
                slot_parts.append(self._slot_graph(dsk, token, g, args, state_keys))
                continue
            if pool is not None:
                pending.append(
                    [
                        pool.submit(
                            _chunk_task,
                            blk,
                            start,
                            stack,
                            offsets,
                            run_ids,
                            evals,
                            m,
                            self.integer,
                            want_labels,
                            want_errors,
                            self.states[c] if self.states else None,
                            patches,
                            drift,
                            self.prune,
                        )
                        for c, (blk, start) in enumerate(zip(self.chunks, self.starts))
                    ]
                )
                continue
            parts = []
            for c, (blk, start) in enumerate(zip(self.chunks, self.starts)):
                prev = self.states[c] if self.stateful and self.states else None
                task = (f"kmclust-chunk-{token}", g, c)
                dsk[task] = (
                    _chunk_task,
                    blk,
                    start,
                    stack_ref,
                    offsets,
                    run_ids,
                    evals_ref,
                    m,
                    self.integer,
                    want_labels,
                    want_errors,
                    prev,
                    patches_ref,
                    drift,
                    self.prune,
                )
                dsk[(f"kmclust-part-{token}", g, c)] = (operator.getitem, task, 0)
                parts.append((f"kmclust-part-{token}", g, c))
                if self.stateful:
                    dsk[(f"kmclust-state-{token}", g, c)] = (operator.getitem, task, 1)
                    state_keys[c].append((f"kmclust-state-{token}", g, c))
            roots.append(_tree(dsk, parts, f"kmclust-combine-{token}-{g}"))
        if self.slots is not None:
            return self._run_slots(dsk, groups, eval_pos, slot_parts, state_keys)
        if pool is not None:
            return self._finish_pool(groups, eval_pos, pending)
        flat = [k for per_chunk in state_keys for k in per_chunk]
        if self.client is not None:  # one submission: states stay on the workers as futures
            futures = self._submit(dsk, roots + flat)
            try:
                results = self.client.gather(futures[: len(roots)])
            except BaseException:
                # drop the pass's queued tasks: left running, a task that kills its worker would go
                # on killing workers while the caller reloads data or retries other runs
                self.client.cancel(futures + [f for per in self.states or [] for f in per])
                raise
            states = futures[len(roots) :]
        else:
            get = dask.base.get_scheduler() or dask.threaded.get
            out = get(dsk, roots + flat)
            results, states = out[: len(roots)], out[len(roots) :]
        if self.stateful:
            per = len(groups)
            if self.client is not None:
                self._held.append(self.states)
            self.states = [states[c * per : (c + 1) * per] for c in range(len(self.chunks))]
        return list(zip(groups, eval_pos, results))

    def _pool(self) -> ThreadPoolExecutor | None:
        """Threads for this pass's chunk tasks, when dask's threaded scheduler would run them on in-memory chunks.

        The tasks then go straight to a pool of as many threads as dask's
        (``num_workers``), no graph: dask's local scheduler spent ~4 ms a
        pass converting, ordering and tracking the ~25 tasks of a pass (one
        k=20 run: more than a settled pass's kernels). Any other scheduler
        (``sync``, ``processes``, a client) and chunks that must be read
        (streaming) keep the dask graph.
        """
        if (
            self.client is not None
            or self.source
            or dask.base.get_scheduler() not in (None, dask.threaded.get)
        ):
            return None
        return _thread_pool(_n_threads(None))

    def _finish_pool(self, groups: list, eval_pos: list, pending: list[list]) -> list:
        """Wait for a pool pass; reduce each group's partials in chunk order (as :func:`_tree`); keep the states."""
        done = [[f.result() for f in per_group] for per_group in pending]
        if self.stateful:
            self.states = [
                [done[g][c][1] for g in range(len(groups))] for c in range(len(self.chunks))
            ]
        return list(
            zip(groups, eval_pos, [_reduce([part for part, _ in per_group]) for per_group in done])
        )

    def _submit(self, dsk: dict, keys: list) -> list:
        """Submit a pass's graph; only then drop the futures of earlier passes (held until now).

        The client sends both the graph and the release of dropped futures
        through one batched stream, at most one message per 10 ms: releases
        sent at the end of a pass held the next pass's graph back by up to
        10 ms, and the scheduler's own 5 ms batches to the workers (freeing
        those keys) then held the tasks back again (LocalCluster, k=20 run:
        ~9 ms of a 20-35 ms pass; see BENCHMARKS.md). Sent after the graph,
        the releases delay nothing.
        """
        # The graph carries the pass's centroids (inline once per slot task): by design, so distributed's
        # "Sending large graph" warning (10 MB by default; 12 MB a pass in `make sweep`) is raised above that.
        copies = len(self.slots) if self.slots is not None else 1
        limit = max(parse_bytes(dask.config.get(_LARGE_GRAPH, "10MB")), 2 * copies * self._carried)
        with dask.config.set({_LARGE_GRAPH: limit}):
            futures = self.client.get(dsk, keys, sync=False)
        self._held = [futures]
        return futures

    def _slot_graph(
        self, dsk: dict, token: str, g: int, args: tuple, state_keys: list[list]
    ) -> list:
        """Add group ``g``'s slot tasks and their partials' keys to ``dsk``; return those keys.

        ``state_keys[c]`` receives (slot task key, position) for chunk ``c``.
        """
        keys = []
        for s, members in enumerate(self.slots):
            prevs: dict[str, int] = {}
            refs, where = [], []
            for c in members:
                flat = []
                for fut, j in self.states[c] if self.stateful and self.states else []:
                    if fut.key not in prevs:
                        prevs[fut.key] = len(refs)
                        refs.append(fut)
                    flat += [prevs[fut.key], j]
                where.append(flat)
            task = (f"kmclust-slot-{token}", g, s)
            dsk[task] = (
                _slot_task,
                [self.chunks[c] for c in members],
                [self.starts[c] for c in members],
                refs,
                where,
                _Args(args, f"{token}-{g}"),
            )
            dsk[(f"kmclust-part-{token}", g, s)] = (operator.getitem, task, 0)
            keys.append((f"kmclust-part-{token}", g, s))
            for j, c in enumerate(members):
                state_keys[c].append((task, j))
        return keys

    def _run_slots(
        self, dsk: dict, groups: list, eval_pos: list, slot_parts: list, state_keys: list[list]
    ) -> list:
        """Compute a slot-task pass: gather each slot's per-chunk partials, reduce them in chunk order here."""
        tasks = (
            sorted({key for per_chunk in state_keys for key, _ in per_chunk})
            if self.stateful
            else []
        )
        flat = [k for keys in slot_parts for k in keys]
        futures = self._submit(dsk, flat + tasks)
        try:
            gathered = self.client.gather(futures[: len(flat)], direct=True)
        except BaseException:
            self.client.cancel(futures + [f for per in self.states or [] for f, _ in per])
            raise
        if self.stateful:
            held = dict(zip(tasks, futures[len(flat) :]))
            self._held.append(self.states)
            self.states = [[(held[key], j) for key, j in per_chunk] for per_chunk in state_keys]
        results, at = [], 0
        for keys in slot_parts:
            by_chunk: list = [None] * len(self.chunks)
            for members, parts in zip(self.slots, gathered[at : at + len(keys)]):
                for c, part in zip(members, parts):
                    by_chunk[c] = part
            at += len(keys)
            results.append(_reduce(by_chunk))
        return list(zip(groups, eval_pos, results))


@functools.cache
def _thread_pool(n: int) -> ThreadPoolExecutor:
    """One pool of ``n`` threads per process, kept for later passes and calls."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="kmclust-chunk")


def _one_blas_thread(fn: Callable) -> Callable:
    """Run ``fn`` with one BLAS thread per task, as distributed's worker processes do.

    The same bits on every scheduler (OpenBLAS rounds differently with more
    threads), and no BLAS threads competing with dask's threads for cores.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@_one_blas_thread
def lloyd(
    x: np.ndarray | da.Array,
    inits: Sequence[np.ndarray],
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    scale: float = 1.0,
    return_labels: bool = False,
    persist: bool = True,
    n_groups: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, RunResult], None] | None = None,
    integer: bool | None = None,
    prune: bool = True,
    stream: bool = False,
) -> list[RunResult]:
    """Run Lloyd's algorithm for every initial centroid set, all in one batch.

    ``x`` is (N, D) (numpy or dask, uint8 or float); ``inits`` are (k, D)
    arrays in *scaled* units (data · ``scale``; e.g. uint8 images with
    ``scale=1/255`` and centroids in [0, 1]). ``tol`` bounds every centroid's
    L2 move (scaled units); a run also stops when its centroids no longer
    change (no label change). ``progress(done, total)`` is called after each
    pass, ``on_done(index, result)`` as soon as a run has finished. A run
    that cannot proceed (k > N, k above the number of distinct
    points) ends with ``error`` set; the others go on. ``integer`` says the
    data are integer-valued (default: uint8 input), which makes cluster sums
    exact and lets passes after the first send only changes of the sums;
    uint8 data stay uint8 in memory (a quarter of float32's bytes), the
    kernels convert a cache-sized block of rows at a time.
    ``prune`` (integer data) skips rows whose label provably cannot change
    (Hamerly-style bounds, the runner-up tracked apart; a bound per centroid, as Elkan's, for a batch
    of one run or of runs of many centroids); results are bit-identical to the unpruned
    computation because labels are the exact nearest centroid
    (:mod:`kmclust.lloyd.nearest`). Runs needing many rows share one GEMM over
    their rows' union, the others a compiled per-pair step; ``prune=False``
    keeps one GEMM over all rows (the reference the bench compares with).
    ``stream=True`` reads the chunks from their source every pass and keeps
    no per-row state between passes (implies ``persist=False``, no delta sums,
    no pruning): worker memory stays bounded by the chunk size for data far
    larger than the cluster's memory. Results are bit-identical either way.
    """
    x = as_dask(x)
    persist = persist and not stream
    n, d = x.shape
    client = _client()
    if integer is None:
        integer = x.dtype == np.uint8
    if persist:
        x = persist_balanced(x)
    if n_groups is None:
        n_groups = max(1, math.ceil(_n_threads(client) / x.numblocks[0]))
    runs = [_Run(i, np.asarray(c, dtype=np.float64) / scale) for i, c in enumerate(inits)]
    for run in runs:
        if run.c64.ndim != 2 or run.c64.shape[1] != d:
            run.state, run.error = (
                "failed",
                f"initial centroids have shape {run.c64.shape}, expected (k, {d})",
            )
        elif not 1 <= run.k <= n:
            run.state, run.error = (
                "failed",
                f"k={run.k} must be between 1 and the number of samples ({n})",
            )
        elif not np.all(np.isfinite(run.c64)):
            run.state, run.error = "failed", "initial centroids contain NaN or inf"
    if on_done is not None:
        for run in runs:
            if run.state == "failed":
                on_done(run.index, _result(run, n, scale))
    passes = _Pass(x, client, n_groups, integer, stateful=not stream, prune=prune)
    tol_raw = tol / scale
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sqnorm = math.nan  # Σ‖x‖², from the first pass
    while True:
        live = [r for r in runs if r.state in ("active", "eval")]
        if not live:
            break
        relocations: list[tuple[_Run, kernels.Partial, int]] = []
        for group, evals, part in passes.run(live, return_labels, patches=patches):
            if not math.isnan(part.sqnorm):
                sqnorm = part.sqnorm
            offs = np.concatenate([[0], np.cumsum([r.k for r in group])])
            sums = part.dense_sums()
            for pos, run in enumerate(group):
                lo, hi = offs[pos], offs[pos + 1]
                if run.state == "eval":
                    run.sse, run.dist = part.eval_sse[pos], part.eval_dist[pos]
                    run.labels = _labels_of(part, evals, pos)
                    run.state = "done"
                    continue
                if part.delta:
                    run.sums = run.sums + sums[lo:hi]
                    run.counts = run.counts + part.counts[lo:hi]
                else:
                    run.sums, run.counts = sums[lo:hi].copy(), part.counts[lo:hi].copy()
                run.history.append(_sse(sqnorm, run.c64, run.sums, run.counts) / n * scale**2)
                run.n_iter += 1
                if np.any(run.counts == 0):
                    relocations.append((run, part, pos))
                else:
                    _update(run, tol_raw, max_iter)
        if relocations and any(part.pruned for _, part, _ in relocations):
            relocations = _exact_candidates(passes, [run for run, _, _ in relocations])
        patches = _relocate(x, relocations, max_iter) if relocations else {}
        if on_done is not None:
            for run in live:
                if run.state in ("done", "failed"):
                    on_done(run.index, _result(run, n, scale))
        if progress is not None:
            progress(sum(r.state in ("done", "failed") for r in runs), len(runs))
    return [_result(r, n, scale) for r in runs]


def _sse(sqnorm: float, c: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> float:
    """Σ‖x − c_label‖² from exact sums: Σ‖x‖² − 2Σ c·S + Σ n‖c‖² (float64, no float32 cancellation)."""
    return float(
        sqnorm - 2.0 * np.einsum("ij,ij->", c, sums) + counts @ np.einsum("ij,ij->i", c, c)
    )


def _exact_candidates(passes: _Pass, runs: list[_Run]) -> list[tuple[_Run, kernels.Partial, int]]:
    """Relocation candidates from an unpruned pass (pruned passes only know upper bounds)."""
    plain = _Pass(passes.x, passes.client, passes.n_groups, passes.integer, stateful=False)
    found = {}
    for group, _, part in plain.run(runs, False, False):
        for pos, run in enumerate(group):
            found[run.index] = (run, part, pos)
    return [found[r.index] for r in runs]


def _move(run: _Run, new: np.ndarray) -> float:
    """Replace the centroids; remember each one's move (for the bounds); return the largest."""
    move = new - run.c64
    run.drift = np.sqrt(np.einsum("ij,ij->i", move, move))
    run.c64 = new
    return float(run.drift.max())


def _update(run: _Run, tol_raw: float, max_iter: int) -> None:
    """New centroids = means; decide convergence."""
    done, run.converged = stopping.stop(
        _move(run, run.sums / run.counts[:, None]), tol_raw, run.n_iter, max_iter
    )
    if done:
        run.state = "eval"


def _relocate(x: da.Array, items: list, max_iter: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Move the farthest points into empty clusters (scikit-learn's policy), then update.

    Returns the label patches (run → global row indices, new labels) that the
    next pass applies to the labels its chunks remember.
    """
    plans = []
    wanted: set[int] = set()
    for run, part, pos in items:
        empty = np.flatnonzero(run.counts == 0)
        picks, left = [], run.counts.copy()
        for dist, idx, lab in zip(part.cand_d[pos], part.cand_i[pos], part.cand_l[pos]):
            if len(picks) == empty.size:
                break
            if idx < 0 or dist <= 0 or left[lab] <= 1:
                continue
            left[lab] -= 1
            picks.append((int(idx), int(lab)))
        if len(picks) < empty.size:
            run.state = "failed"
            run.error = (
                f"k={run.k} exceeds the number of distinct points: "
                f"{empty.size} empty cluster(s) and no point left to move into them"
            )
            continue
        plans.append((run, empty, picks))
        wanted.update(i for i, _ in picks)
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if not plans:
        return patches
    order = np.array(sorted(wanted))
    fetched = take_rows(x, order, f"kmclust-relocate-{uuid.uuid4().hex}").compute()
    rows = dict(zip(order.tolist(), np.asarray(fetched, dtype=np.float64)))
    for run, empty, picks in plans:
        for e, (idx, lab) in zip(empty, picks):
            run.sums[lab] -= rows[idx]
            run.counts[lab] -= 1
            run.sums[e] = rows[idx]
            run.counts[e] = 1
        patches[run.index] = (np.array([i for i, _ in picks]), empty.astype(np.int64))
        run.n_relocated += empty.size
        _move(run, run.sums / run.counts[:, None])
        if stopping.stop(math.inf, 0.0, run.n_iter, max_iter)[0]:
            run.state = "eval"
    return patches


def _labels_of(part: kernels.Partial, evals: list[int], pos: int) -> list[tuple[int, np.ndarray]]:
    """The label columns of stack position ``pos`` among the evaluated positions."""
    col = evals.index(pos)
    return [(start, lab[:, col]) for start, lab in part.labels]


def _result(run: _Run, n: int, scale: float) -> RunResult:
    labels = None
    if run.labels:
        labels = np.concatenate([lab for _, lab in sorted(run.labels, key=lambda t: t[0])])
    return RunResult(
        centroids=run.c64 * scale,
        jclust=float(run.sse / n * scale**2)
        if not run.error
        else math.nan,  # exact sums (Fractions) → float
        mean_distance=float(run.dist / n * scale) if not run.error else math.nan,
        n_iter=run.n_iter,
        converged=run.converged,
        n_relocated=run.n_relocated,
        history=run.history,
        labels=labels,
        error=run.error,
    )


@_one_blas_thread
def predict(
    x: np.ndarray | da.Array,
    centroids: Sequence[np.ndarray],
    *,
    scale: float = 1.0,
    persist: bool = False,
    errors: bool = True,
) -> list[tuple[np.ndarray, float, float]]:
    """Labels, Σ‖x − z‖² / N and Σ‖x − z‖ / N of ``x`` for each centroid set, in one pass.

    ``errors=False`` skips the exact float64 distances (both are then NaN).
    """
    x = as_dask(x)
    if persist:
        x = x.persist()
    n = x.shape[0]
    client = _client()
    runs = [
        _Run(i, np.asarray(c, dtype=np.float64) / scale, state="eval")
        for i, c in enumerate(centroids)
    ]
    n_groups = max(1, math.ceil(_n_threads(client) / x.numblocks[0]))
    out: dict[int, tuple[np.ndarray, float, float]] = {}
    nan = math.nan
    integer = x.dtype == np.uint8
    for group, evals, part in _Pass(x, client, n_groups, integer, stateful=False).run(
        runs, True, errors
    ):
        for pos, run in enumerate(group):
            labels = np.concatenate(
                [lab for _, lab in sorted(_labels_of(part, evals, pos), key=lambda t: t[0])]
            )
            j, md = (
                (float(part.eval_sse[pos] / n * scale**2), float(part.eval_dist[pos] / n * scale))
                if errors
                else (nan, nan)
            )
            out[run.index] = (labels, j, md)
    return [out[i] for i in range(len(runs))]
