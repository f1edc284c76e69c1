"""A pass as plain data: the groups of runs, what each group's chunk tasks compute, the chunks,
and the fixed-order reduction tree. Pure functions, no dask: executors turn a plan into work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from kmclust.lloyd.kernel import ChunkArgs
from kmclust.lloyd.runs import Run
from kmclust.lloyd.weighted import WeightSpec

#: Partials combined per reduction task.
FAN_IN = 8

T = TypeVar("T")

#: Levels of a reduction: per output of a level, the indices it combines from the level below.
Tree = tuple[tuple[tuple[int, ...], ...], ...]


@dataclass(frozen=True)
class Layout:
    """What every pass of one call shares: chunks, grouping, data kind, state and pruning."""

    starts: tuple[int, ...]  # first global row of each chunk
    n_groups: int  # groups of runs wanted per pass (more tasks than chunks keep threads busy)
    dtype: np.dtype  # compute dtype of the centroid stacks
    integer: bool  # integer-valued data: exact sums
    stateful: bool = False  # chunk tasks take and leave per-row state
    prune: bool = False  # ... and skip rows by bounds (with state only)
    weights: WeightSpec | None = None  # how sample weights are summed (None: no weights)


@dataclass(frozen=True, eq=False)
class PassPlan:
    """One pass: per group its runs and chunk-task arguments; the chunks; the reduction tree."""

    groups: tuple[tuple[Run, ...], ...]  # the runs of each group, ordered by k
    tasks: tuple[ChunkArgs, ...]  # what every chunk task of each group computes
    starts: tuple[int, ...]  # first global row of each chunk
    tree: Tree  # how each group's chunk partials are combined (fixed order: the same bits anywhere)
    stateful: bool  # chunk tasks take the previous pass's states and leave theirs
    token: str  # fresh every pass: the pass's key names; nothing is ever hashed

    def evals(self, g: int) -> list[int]:
        """The stack positions of group ``g`` being evaluated."""
        return sorted(self.tasks[g].evals)

    @property
    def carried(self) -> int:
        """Bytes of centroids the pass's tasks carry (once per group)."""
        return sum(args.nbytes for args in self.tasks)


def layout(
    chunks: Sequence[int],
    n_groups: int,
    dtype: np.dtype,
    integer: bool,
    stateful: bool,
    prune: bool,
    weights: WeightSpec | None = None,
) -> Layout:
    """The layout of data in row chunks of the sizes ``chunks``; pruning needs state."""
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64).tolist()
    return Layout(
        tuple(starts), n_groups, np.dtype(dtype), integer, stateful, prune and stateful, weights
    )


def plan_pass(
    runs: list[Run],
    layout: Layout,
    token: str,
    *,
    labels: bool,
    errors: bool = True,
    patches: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> PassPlan:
    """The plan of one pass of ``runs``: ``labels``/``errors`` of the evaluated runs wanted;
    ``patches`` (run → rows, new labels) correct the labels the chunks remember."""
    groups = group_runs(runs, layout.n_groups)
    drift = {r.index: r.drift for r in runs if r.drift is not None} if layout.prune else None
    tasks = tuple(
        ChunkArgs(
            centroids=np.concatenate([r.c64 for r in group]).astype(layout.dtype),
            offsets=np.concatenate([[0], np.cumsum([r.k for r in group])]).astype(np.int64),
            run_ids=np.array([r.index for r in group], dtype=np.int64),
            evals={p: r.c64 for p, r in enumerate(group) if r.state == "eval"},
            m=max(r.k for r in group),
            integer=layout.integer,
            want_labels=labels,
            want_errors=errors,
            patches=patches or {},
            drift=drift,
            prune=layout.prune,
            weights=layout.weights,
            token=f"{token}-{g}",
        )
        for g, group in enumerate(groups)
    )
    return PassPlan(
        groups=tuple(tuple(group) for group in groups),
        tasks=tasks,
        starts=layout.starts,
        tree=reduction_tree(len(layout.starts)),
        stateful=layout.stateful,
        token=token,
    )


def group_runs(runs: list[Run], n_groups: int) -> list[list[Run]]:
    """Split runs into groups of balanced ΣK (greedy, deterministic), each ordered by k."""
    bins: list[list[Run]] = [[] for _ in range(max(1, min(n_groups, len(runs))))]
    load = [0] * len(bins)
    for run in sorted(runs, key=lambda r: (-r.k, r.index)):
        g = load.index(min(load))
        bins[g].append(run)
        load[g] += run.k
    return [sorted(b, key=lambda r: (r.k, r.index)) for b in bins if b]


def reduction_tree(n: int) -> Tree:
    """The fixed-order reduction of ``n`` partials: runs of ``FAN_IN`` neighbours, level by level.

    Float sums depend on the order of addition: every executor reduces along this one tree
    (:func:`fold`), so the bits do not depend on where a pass runs.
    """
    levels = []
    while n > 1:
        level = tuple(tuple(range(i, min(i + FAN_IN, n))) for i in range(0, n, FAN_IN))
        levels.append(level)
        n = len(level)
    return tuple(levels)


def fold(items: list[T], tree: Tree, merge: Callable[[list[T]], T]) -> T:
    """Reduce ``items`` along ``tree`` with ``merge`` (partials in process, or keys into tasks)."""
    for level in tree:
        items = [merge([items[i] for i in group]) for group in level]
    return items[0]
