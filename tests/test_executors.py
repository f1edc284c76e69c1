"""Pass plans and the executors that run them: one reduction order, the same partials anywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dask
import dask.array as da
import numpy as np
import pytest
from dask.base import tokenize

from kmclust.lloyd import driver
from kmclust.lloyd.executors import SHARE_BYTES, GraphExecutor, PoolExecutor, _share
from kmclust.lloyd.kernel import ChunkArgs
from kmclust.lloyd.partial import Partial
from kmclust.lloyd.placement import chunk_refs
from kmclust.lloyd.plan import FAN_IN, fold, layout, plan_pass, reduction_tree
from kmclust.lloyd.runs import Run


def _nested(n: int) -> object:
    """The reduction order of ``n`` items as nested tuples, written out independently: runs of
    ``FAN_IN`` neighbours, level by level (a lone leftover is still combined on its own)."""
    items: list = list(range(n))
    while len(items) > 1:
        items = [tuple(items[i : i + FAN_IN]) for i in range(0, len(items), FAN_IN)]
    return items[0]


@pytest.mark.parametrize("n", [1, 2, 8, 9, 20, 64, 65])
def test_reduction_tree_combines_runs_of_neighbours_level_by_level(n: int) -> None:
    assert fold(list(range(n)), reduction_tree(n), tuple) == _nested(n)


def test_chunk_args_are_known_to_dask_by_their_token() -> None:
    """Tokenizing never reads the centroids (nothing is hashed): equal tokens, equal names."""
    stack = np.zeros((3, 4), dtype=np.float32)
    offsets = np.array([0, 3])

    def args(centroids: np.ndarray, token: str) -> ChunkArgs:
        return ChunkArgs(centroids, offsets, np.arange(1), {}, 3, True, False, token=token)

    assert tokenize(args(stack, "a")) == tokenize(args(stack + 1, "a"))
    assert tokenize(args(stack, "a")) != tokenize(args(stack, "b"))
    assert ChunkArgs(stack, offsets, np.arange(1), {}, 3, True, False).token  # fresh by default


def test_plan_pass_groups_runs_and_flags_evaluations() -> None:
    rng = np.random.default_rng(0)
    runs = [Run(i, rng.random((k, 4))) for i, k in enumerate((5, 3, 8, 2))]
    runs[1].state = "eval"
    for run in runs:
        run.drift = np.zeros(run.k)
    lay = layout((10, 10, 5), 2, np.float32, integer=True, stateful=True, prune=True)
    plan = plan_pass(runs, lay, "tok", labels=True)
    assert plan.starts == (0, 10, 20) and plan.stateful and len(plan.tree) == 1
    # greedy by k: 8 | 5, 3 | 2 joins the first of the two equal loads; each group ordered by k
    assert [[r.index for r in g] for g in plan.groups] == [[3, 2], [1, 0]]
    assert [plan.evals(g) for g in range(2)] == [[], [0]]
    assert [t.token for t in plan.tasks] == ["tok-0", "tok-1"]
    assert plan.tasks[0].offsets.tolist() == [0, 2, 10]
    assert plan.tasks[1].centroids.dtype == np.float32 and plan.tasks[0].prune
    assert set(plan.tasks[0].drift) == {0, 1, 2, 3}
    plain = layout((10, 10, 5), 2, np.float32, integer=False, stateful=False, prune=True)
    assert not plain.stateful and not plain.prune  # pruning needs state
    assert plan_pass(runs, plain, "t", labels=False).tasks[0].drift is None


def _same(a: Partial, b: Partial) -> None:
    for name in ("sums", "counts", "cand_d", "cand_i", "cand_l", "eval_sse", "eval_dist"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.sqnorm == b.sqnorm or (np.isnan(a.sqnorm) and np.isnan(b.sqnorm))
    assert (a.delta, a.pruned) == (b.delta, b.pruned)
    assert [s for s, _ in a.labels] == [s for s, _ in b.labels]
    for (_, la), (_, lb) in zip(a.labels, b.labels):
        np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("dtype", [np.float64, np.uint8])
def test_executors_return_the_same_partials_pass_after_pass(dtype) -> None:
    """The pool and a graph on the threaded and the synchronous scheduler, fed the same plans:
    the same partials bit for bit over 20 chunks (float sums: the one reduction order), and for
    integer rows the same delta partials from the states each kept, pruned by bounds."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2000, 16)).astype(dtype)
    chunks = chunk_refs(da.from_array(x, chunks=(100, 16)).persist())[1]
    integer = dtype == np.uint8
    lay = layout([100] * 20, 2, np.float32 if integer else np.float64, integer, True, True)
    executors = {
        "pool": PoolExecutor(chunks, 2),
        "graph-threads": GraphExecutor({}, chunks),
        "graph-sync": GraphExecutor({}, chunks),
    }
    runs = [Run(i, rng.uniform(0, 255, (k, 16))) for i, k in enumerate((3, 7, 12))]
    runs[2].state = "eval"
    got: dict[str, list[list[Partial]]] = {}
    for name, executor in executors.items():
        with dask.config.set(scheduler="sync" if name == "graph-sync" else "threads"):
            first = executor.run(plan_pass(runs, lay, f"{name}-1", labels=True))
            for run in runs:
                run.drift = np.zeros(run.k)  # same centroids: the bounds hold for every row
            second = executor.run(plan_pass(runs, lay, f"{name}-2", labels=True))
            for run in runs:
                run.drift = None
        got[name] = [first, second]
    reference = got["pool"]
    assert reference[1][0].delta == integer and reference[1][0].pruned
    for passes in got.values():
        for parts, ref_parts in zip(passes, reference):
            for part, ref in zip(parts, ref_parts):
                _same(part, ref)


def test_the_pool_runs_a_lone_task_in_the_calling_thread(task_threads) -> None:
    """One chunk and one group (a small fit): the task runs here, with no hand-off to a pool
    thread, and gives the partial a pool thread gives; more tasks go to the pool's threads."""
    import threading

    where = task_threads
    rng = np.random.default_rng(3)
    x = rng.random((300, 5))
    runs = [Run(0, rng.random((4, 5)))]
    lay = layout([300], 2, np.float64, False, False, False)
    alone = PoolExecutor([x], 2).run(plan_pass(runs, lay, "a", labels=True))
    assert where == [threading.current_thread().name]
    where.clear()
    both = PoolExecutor([x, x], 2).run(
        plan_pass(runs, layout([300] * 2, 2, np.float64, False, False, False), "b", labels=True)
    )
    assert len(where) == 2 and all(w.startswith("kmclust-chunk") for w in where)
    np.testing.assert_array_equal(both[0].counts, 2 * alone[0].counts)


def test_a_forced_executor_must_suit_the_chunks() -> None:
    x = np.random.default_rng(2).integers(0, 256, (200, 4), dtype=np.uint8)
    init = [x[:3].astype(np.float64)]
    with pytest.raises(ValueError, match="'slots' needs every chunk persisted"):
        driver.lloyd(x, init, executor="slots")
    with pytest.raises(ValueError, match="'pool' every chunk in this process's memory"):
        lazy = da.from_array(x, chunks=(50, 4)).map_blocks(np.copy)  # chunks computed by tasks
        driver.lloyd(lazy, init, persist=False, executor="pool")
    with pytest.raises(ValueError, match="unknown executor 'nope'"):
        driver.predict(x, init, executor="nope")
    (a,), (b,) = (driver.lloyd(x, init, tol=0, executor=e) for e in ("pool", "graph"))
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_a_large_centroid_stack_is_one_data_key_of_the_pass_on_a_cluster() -> None:
    """On a cluster a large stack goes in the graph once, as data (computed again if the worker
    holding it dies, unlike scattered data); a small one, or any without a cluster, inline."""
    rng = np.random.default_rng(3)
    small, large = (rng.random((k, 784)).astype(np.float32) for k in (2, 64))
    assert small.nbytes < SHARE_BYTES <= large.nbytes

    def args(stack: np.ndarray) -> ChunkArgs:
        k = len(stack)
        return ChunkArgs(stack, np.array([0, k]), np.array([0]), {}, 1, True, False)

    cluster = object()  # only its presence matters
    for stack, client, inline in (
        (small, cluster, True),
        (large, None, True),
        (large, cluster, False),
    ):
        dsk: dict = {}
        a = args(stack)
        ref = _share(dsk, "kmclust-args-t-0", a, client)
        assert (ref is a) == inline
        assert dsk == ({} if inline else {"kmclust-args-t-0": a})


def test_one_blas_thread_limits_numpys_blas_on_every_call_and_restores_it() -> None:
    """The limit the bit-identity across schedulers rests on: one BLAS thread inside, on every
    call (the thread pools are found once per process), the user's setting back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from kmclust.lloyd.executors import one_blas_thread

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    inside = one_blas_thread(blas_threads)
    with threadpool_limits(limits=2, user_api="blas"):  # a setting the limit must change
        before = blas_threads()
        assert before and set(before) == {2}, "numpy's BLAS is loaded"
        for _ in range(2):
            assert inside() == [1] * len(before)
            assert blas_threads() == before


def test_a_fit_without_a_cluster_never_imports_distributed_and_picks_as_dask_would() -> None:
    """In a fresh process a fit leaves distributed unimported (no client can exist without it),
    and the executor still follows dask's scheduler config as dask's own ``get_scheduler``."""
    code = textwrap.dedent(
        """
        import sys
        import dask, numpy as np
        from kmclust import KMeans
        from kmclust.lloyd import executors, placement
        x = np.random.default_rng(0).random((300, 3))
        KMeans(4, n_init=2, random_state=0).fit(x)
        names = (None, "threads", "threading", "sync", "processes")
        picked = []
        for name in names:
            with dask.config.set(scheduler=name):
                picked.append(type(executors.pick(placement.as_dask(x), None, None)).__name__)
        loaded = "distributed" in sys.modules
        expected = []  # dask's answer, which imports distributed to look for a client
        for name in names:
            with dask.config.set(scheduler=name):
                threaded = dask.base.get_scheduler() in (None, dask.threaded.get)
            expected.append("PoolExecutor" if threaded else "GraphExecutor")
        print(loaded, picked == expected, picked)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert out[:2] == ["False", "True"], out
    assert "'PoolExecutor'," in out and "'GraphExecutor'," in out  # both kinds were picked
