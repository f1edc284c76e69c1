"""Where the data live: row-chunked dask arrays, even chunks, and chunks placed evenly over the workers."""

from __future__ import annotations

import os
import uuid

import dask
import dask.array as da
import numpy as np

from kmclust.lloyd.plan import chunk_refs


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
    client = default_client()
    x = even_chunks(x, n_threads(client))
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


def by_worker(client, refs: list) -> dict[str, list[int]] | None:
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
    """The default distributed Client, if one is active."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def n_threads(client) -> int:
    """Threads running chunk tasks: the cluster's, else dask's local ``num_workers`` (as :meth:`Pass._pool`)."""
    if client is None:
        return dask.config.get("num_workers", None) or os.cpu_count() or 1
    return max(1, sum(client.nthreads().values()))
