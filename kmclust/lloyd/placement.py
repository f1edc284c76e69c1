"""Where the data live: row-chunked dask arrays, even chunks placed evenly over the workers, and
what a pass's tasks take for each chunk."""

from __future__ import annotations

import functools
import os
import sys
import uuid

import dask
import dask.array as da
import numpy as np

#: In-memory rows are cut into chunks of at least this many rows (one chunk if no more) ...
CHUNK_ROWS = 10_000
#: ... or of this many bytes, if more rows (rows of a few features: a 10,000-row chunk of 2
#: float32 features is 80 kB, and each pass's fixed cost per chunk task outweighed its work)
CHUNK_BYTES = 8 * 2**20


def as_dask(x: np.ndarray | da.Array, chunk_rows: int | None = None, threads: int = 1) -> da.Array:
    """A (N, D) dask array chunked by rows only.

    An in-memory array is cut into views of itself, C-contiguous (copied only
    if it is not), in a multiple of ``threads`` near-equal chunks of at most
    ``chunk_rows`` rows (default: ``CHUNK_ROWS`` or ``CHUNK_BYTES`` of rows, whichever is more;
    a single chunk if the data have no more than ``CHUNK_ROWS``), under a fresh name:
    ``da.from_array`` would copy the whole array and hash it, a fixed cost
    per call as large as a few Lloyd passes, for a deduplication nothing here
    uses (every call builds its own chunks). The caller must not change ``x``
    while the array is in use.
    """
    if isinstance(x, da.Array):
        return x.rechunk({1: -1}) if x.numblocks[1] != 1 else x
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    if chunk_rows is None:
        chunk_rows = max(CHUNK_ROWS, CHUNK_BYTES // max(x[:1].nbytes, 1))
    nb = max(1, -(-n // chunk_rows))
    if nb > 1 or n > CHUNK_ROWS:  # every pass waits for its slowest thread (see even_chunks)
        nb = threads * -(-nb // threads)
    nb = min(nb, max(n, 1))
    rows = tuple(n // nb + (b < n % nb) for b in range(nb))  # sizes differ by one at most
    edges = np.concatenate([[0], np.cumsum(rows)]).tolist()
    name = f"kmclust-rows-{uuid.uuid4().hex}"
    blocks = {(name, b, 0): x[edges[b] : edges[b + 1]] for b in range(nb)}
    return da.Array(blocks, name, (rows, x.shape[1:]), dtype=x.dtype, meta=x[:0])


def even_chunks(x: da.Array, threads: int, split: bool = False) -> da.Array:
    """uint8 rows re-cut into a multiple of ``threads`` equal chunks (unless they already are).

    Every pass waits for its slowest thread: 7 chunks on 2 threads left one
    thread idle an eighth of each pass (8 chunks measured faster; twice as
    many smaller chunks cost more per chunk than they balance). Results do
    not depend on the chunking: labels are exact, integer sums and the eval
    sums are exact (:func:`kmclust.lloyd.exact.exact_sum`). Float data keep
    their chunks (their float sums would round differently). A single chunk
    stays one unless ``split``: in one process runs are split into groups
    instead (``n_groups``), but on a cluster every task of a chunk runs where
    the chunk and its state live, so one chunk would keep one worker busy and
    the others idle (``split`` is set under a distributed client).
    """
    nb, n = x.numblocks[0], x.shape[0]
    if x.dtype != np.uint8 or n < threads or nb % threads == 0 or (nb < 2 and not split):
        return x
    return x.rechunk({0: -(-n // (threads * -(-nb // threads)))})


def persist_balanced(x: da.Array) -> da.Array:
    """Persist ``x`` in evenly many chunks (:func:`even_chunks`); under distributed also place them
    evenly over the workers' threads.

    Chunk tasks run where their chunk (and its state) lives, so an uneven
    placement leaves workers idle every pass: 4 of 6 chunks landed on one of
    two workers, which then computed most of the grid (on this project's
    2-vCPU VM the balanced placement measured no faster: the two vCPUs slow
    each other down; see BENCHMARKS.md).
    ``client.rebalance`` does not help: it only moves data off workers above
    30 % memory use. Each chunk is copied once to its worker under a new key
    (preferred, not required: a lost worker's chunks are recomputed elsewhere).
    """
    client = default_client()
    x = even_chunks(x, n_threads(client), split=client is not None)
    if client is not None and x.numblocks[0] >= 2 and _balanced(client, x):
        return x
    x = persist_here(x, client)
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


def persist_like(w: da.Array, x: da.Array) -> da.Array:
    """``w`` (per-row values, e.g. sample weights) in ``x``'s row chunks, persisted; under
    distributed each chunk on the worker holding the same rows of ``x`` (their tasks run there)."""
    w = w.rechunk({0: x.chunks[0]})
    client = default_client()
    held = by_worker(client, chunk_refs(x)[1]) if client is not None else None
    if held is None:
        return w.persist()
    from distributed import wait

    where = {b: worker for worker, idx in held.items() for b in idx}
    name = f"kmclust-beside-{uuid.uuid4().hex}"
    parts = [
        client.persist(
            w.blocks[b].map_blocks(_same, name=f"{name}-{b}"),
            workers=[where[b]] if where.get(b) else None,
            allow_other_workers=True,
        )
        for b in range(w.numblocks[0])
    ]
    placed = da.concatenate(parts)
    wait(placed)
    return placed


def chunk_refs(x: da.Array) -> tuple[dict, list]:
    """What a pass's chunk tasks take for each chunk of ``x``, and the graph those references need.

    A persisted chunk is passed as itself (a numpy array, or a future on a
    cluster): no graph entry. Through an alias key (as after ``concatenate``)
    every pass would recompute the alias on some worker and move the chunk
    there, undoing the placement. Any other chunk is the key of the task that
    reads it, with ``x``'s graph.
    """
    graph = dict(x.__dask_graph__())
    refs, needs_graph = [], False
    for row in x.__dask_keys__():
        key = row[0]
        while _is_key(graph.get(key), graph):  # follow aliases
            key = graph[key]
        value = graph.get(key)
        if isinstance(value, (np.ndarray, *_futures())):
            refs.append(value)
        else:
            refs.append(key)
            needs_graph = True
    return (graph if needs_graph else {}), refs


def persist_here(x: da.Array, client) -> da.Array:
    """``x`` persisted, unless it is in this process (no ``client``) with every chunk a numpy
    array already (as :func:`as_dask` cuts one): persisting would only run a graph of
    constants (~2 ms, as long as a small fit's passes)."""
    if client is None:
        graph, refs = chunk_refs(x)
        if not graph and all(isinstance(r, np.ndarray) for r in refs):
            return x
    return x.persist()


def distributed_loaded():
    """The distributed module if something imported it, else None: no client or future can exist
    before then, and importing it only to look would cost a fit without a cluster ~0.5 s."""
    return sys.modules.get("distributed")


def _futures() -> tuple[type, ...]:
    """distributed's ``Future``, or nothing while distributed is not imported."""
    loaded = distributed_loaded()
    return (loaded.Future,) if loaded is not None else ()


def _is_key(value, graph: dict) -> bool:
    try:
        return isinstance(value, (str, tuple)) and value in graph
    except TypeError:  # a task tuple holding unhashable arguments
        return False


def worker_slots(client, refs: list) -> list[list[int]] | None:
    """Indices of ``refs`` per worker thread, when every ref is a future on the cluster; else None.

    A pass then runs one task per thread over its chunks instead of one per
    chunk: every task costs scheduler and worker round trips each pass, more
    than a settled pass's kernels take on a small cluster (see BENCHMARKS.md).
    """
    per_worker = by_worker(client, refs)
    if per_worker is None:
        return None
    nthreads = client.nthreads()
    slots = []
    for w in sorted(per_worker):
        mine = per_worker[w]
        n = min(len(mine), max(1, nthreads.get(w, 1)))
        slots.extend(mine[i::n] for i in range(n))
    return slots


def by_worker(client, refs: list) -> dict[str, list[int]] | None:
    """Indices of ``refs`` per worker holding them ("": by none); None if some ref is no future."""
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
    """Every chunk of ``x`` is persisted, and each worker holds its threads' share of them (± 1).

    Then placing again would only copy every chunk.
    """
    refs = chunk_refs(x)[1]
    held = by_worker(client, refs)
    nthreads = client.nthreads()
    if held is None or set(held) - set(nthreads):
        return False
    total = sum(nthreads.values())
    return all(abs(len(held.get(w, ())) - len(refs) * n / total) < 1 for w, n in nthreads.items())


def _same(block: np.ndarray) -> np.ndarray:
    """The block itself (a new key: a copy placed on another worker)."""
    return block


def default_client():
    """The default distributed Client, if one is active (None before distributed is imported)."""
    if distributed_loaded() is None:
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def n_threads(client) -> int:
    """Threads running chunk tasks: the cluster's, else dask's local ``num_workers``."""
    if client is None:
        return dask.config.get("num_workers", None) or _cpus()
    return max(1, sum(client.nthreads().values()))


@functools.cache
def _cpus() -> int:
    """This machine's processors, asked once (tens of µs a call here; a small fit asked four
    times)."""
    return os.cpu_count() or 1
