"""Running a pass over the chunks: a thread pool, a dask graph, or one task per worker thread."""

from __future__ import annotations

import functools
import operator
import os
import signal
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import dask.threaded
import numpy as np
from dask.utils import parse_bytes
from threadpoolctl import threadpool_limits

from kmclust.lloyd import chunk as kernels
from kmclust.lloyd.placement import by_worker, n_threads
from kmclust.lloyd.plan import PassArgs, chunk_refs, group_runs, reduce_parts, tree_graph
from kmclust.lloyd.runs import Run

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


def _slot_task(blocks: list, starts: list, prevs: list, prev_index: list, args: PassArgs):
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


def _in_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


class Pass:
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
        self.source, self.chunks = chunk_refs(x)
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
        per_worker = by_worker(self.client, self.chunks) if self.client is not None else None
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
        runs: list[Run],
        want_labels: bool,
        want_errors: bool = True,
        patches: dict | None = None,
    ) -> list[tuple[list[Run], list[int], kernels.Partial]]:
        """Compute one pass; per group: its runs, the stack positions being evaluated, the partial."""
        groups = group_runs(runs, self.n_groups)
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
            roots.append(tree_graph(dsk, parts, f"kmclust-combine-{token}-{g}"))
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
        return _thread_pool(n_threads(None))

    def _finish_pool(self, groups: list, eval_pos: list, pending: list[list]) -> list:
        """Wait for a pool pass; reduce each group's partials in chunk order (as :func:`tree_graph`); keep the states."""
        done = [[f.result() for f in per_group] for per_group in pending]
        if self.stateful:
            self.states = [
                [done[g][c][1] for g in range(len(groups))] for c in range(len(self.chunks))
            ]
        return list(
            zip(
                groups,
                eval_pos,
                [reduce_parts([part for part, _ in per_group]) for per_group in done],
            )
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
                PassArgs(args, f"{token}-{g}"),
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
            results.append(reduce_parts(by_chunk))
        return list(zip(groups, eval_pos, results))


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
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper
