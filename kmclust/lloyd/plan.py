"""The shape of a pass: groups of runs, the chunks read, and the fixed-order reduction tree."""

from __future__ import annotations

import dask.array as da
import numpy as np

from kmclust.lloyd import chunk as kernels
from kmclust.lloyd.runs import Run

#: Partials combined per reduction task.
FAN_IN = 8


class PassArgs:
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
        return PassArgs, (self.value, self.token)


def reduce_parts(parts: list) -> kernels.Partial:
    """The fixed-order tree reduction of :func:`tree_graph`, in one process (the same sums, bit for bit)."""
    while len(parts) > 1:
        parts = [kernels.combine(parts[i : i + FAN_IN]) for i in range(0, len(parts), FAN_IN)]
    return parts[0]


def tree_graph(dsk: dict, parts: list, name: str) -> object:
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


def group_runs(runs: list[Run], n_groups: int) -> list[list[Run]]:
    """Split runs into groups of balanced ΣK (greedy, deterministic), each ordered by k."""
    bins: list[list[Run]] = [[] for _ in range(max(1, min(n_groups, len(runs))))]
    load = [0] * len(bins)
    for run in sorted(runs, key=lambda r: (-r.k, r.index)):
        g = load.index(min(load))
        bins[g].append(run)
        load[g] += run.k
    return [sorted(b, key=lambda r: (r.k, r.index)) for b in bins if b]


def chunk_refs(x: da.Array) -> tuple[dict, list]:
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
