"""Batched Lloyd iterations as Dask map-reduce: the driver over one batch of runs.

Every iteration plans one pass (:mod:`kmclust.lloyd.plan`: the runs split
into a few groups, so that small data still keeps every worker busy; what
each chunk task computes; the fixed-order reduction tree) and hands it to an
executor (:mod:`kmclust.lloyd.executors`), which maps
:func:`kmclust.lloyd.kernel.lloyd_chunk` over the data's row chunks and
reduces each group's partials along that tree. The driver picks the
executor once per call: on a cluster with every chunk persisted, one task
per worker thread over the chunks its worker holds (``"slots"``); on a
cluster otherwise, one dask graph a pass (``"graph"``); without a cluster,
a thread pool for in-memory chunks on dask's threaded scheduler
(``"pool"``), else a graph on dask's local scheduler. The bits are the same
whichever runs the pass.

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

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np

from kmclust.data.select import take_rows
from kmclust.lloyd import stopping, weights
from kmclust.lloyd.chunk import compute_dtype
from kmclust.lloyd.executors import EXECUTORS, Executor, one_blas_thread, pick
from kmclust.lloyd.partial import Partial
from kmclust.lloyd.placement import (
    as_dask,
    default_client,
    n_threads,
    persist_balanced,
    persist_here,
    persist_like,
)
from kmclust.lloyd.plan import Layout, layout, plan_pass
from kmclust.lloyd.runs import Run, RunResult, start_runs

__all__ = ["EXECUTORS", "lloyd", "predict"]


@one_blas_thread
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
    executor: str | None = None,
    rule: str = "study",
    sample_weight: np.ndarray | da.Array | None = None,
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
    (Hamerly-style bounds, the runner-up tracked apart; a bound per centroid,
    as Elkan's, for a batch of one run or of runs of many centroids; a bound per
    group of centroids, as Yinyang's, above 512 centroids: kmclust.lloyd.groups); results
    are bit-identical to the unpruned computation because labels are the
    exact nearest centroid (:mod:`kmclust.lloyd.nearest`). Runs needing many
    rows share one GEMM over their rows' union, the others a compiled
    per-pair step; ``prune=False`` keeps one GEMM over all rows (the
    reference the bench compares with).
    ``stream=True`` reads the chunks from their source every pass and keeps
    no per-row state between passes (implies ``persist=False``, no delta sums,
    no pruning): worker memory stays bounded by the chunk size for data far
    larger than the cluster's memory. Results are bit-identical either way.
    ``executor`` forces one of ``EXECUTORS`` (tests; results are the same).
    ``rule`` picks the stopping rule (:mod:`kmclust.lloyd.stopping`): ``"study"``
    (the sweep's) or ``"sklearn"`` (``tol`` bounds Σ‖Δc‖², the estimator's).
    ``sample_weight`` (N,) (numpy or dask; non-negative, finite, not all 0, else
    :class:`~kmclust.lloyd.weights.WeightError`) weights sums, J and relocation
    as scikit-learn's: centroids are weighted means; ``jclust``, ``mean_distance``
    and ``history`` are divided by Σw instead of N; rows of weight 0 are
    labelled but otherwise dropped. uint8 rows keep every bit-identity above.
    """
    engine = _engine(
        x,
        persist=persist and not stream,
        balance=True,
        integer=integer,
        n_groups=n_groups,
        stateful=not stream,
        prune=prune,
        executor=executor,
        sample_weight=sample_weight,
    )
    n, d = engine.x.shape
    runs = start_runs(inits, scale, n, d)
    spec = engine.layout.weights
    total = n if spec is None else spec.total  # Σw (exact) divides J and mean distance
    for run in runs:
        run.weights = spec
    if on_done is not None:
        for run in runs:
            if run.state == "failed":
                on_done(run.index, _result(run, total, scale))
    tol_raw = stopping.raw_tol(tol, scale, rule)
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    sqnorm = math.nan  # Σ‖x‖², from the first pass
    while live := [r for r in runs if r.state in ("active", "eval")]:
        relocations: list[tuple[Run, Partial, int]] = []
        for group, evals, part in engine.run(live, labels=return_labels, patches=patches):
            if not math.isnan(part.sqnorm):
                sqnorm = part.sqnorm
            if part.wsqnorm is not None:
                sqnorm = part.wsqnorm  # Σ w‖x‖², exact
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
                run.history.append(weights.sse(sqnorm, run) / total * scale**2)
                run.n_iter += 1
                if np.any(run.counts == 0):
                    relocations.append((run, part, pos))
                else:
                    _update(run, tol_raw, max_iter, rule)
        if relocations and any(part.pruned for _, part, _ in relocations):
            relocations = _exact_candidates(engine, [run for run, _, _ in relocations])
        patches = _relocate(engine.x, relocations, max_iter, engine.w) if relocations else {}
        if on_done is not None:
            for run in live:
                if run.state in ("done", "failed"):
                    on_done(run.index, _result(run, total, scale))
        if progress is not None:
            progress(sum(r.state in ("done", "failed") for r in runs), len(runs))
    return [_result(r, total, scale) for r in runs]


@one_blas_thread
def predict(
    x: np.ndarray | da.Array,
    centroids: Sequence[np.ndarray],
    *,
    scale: float = 1.0,
    persist: bool = False,
    errors: bool = True,
    executor: str | None = None,
) -> list[tuple[np.ndarray, float, float]]:
    """Labels, Σ‖x − z‖² / N and Σ‖x − z‖ / N of ``x`` for each centroid set, in one pass.

    ``errors=False`` skips the exact float64 distances (both are then NaN).
    """
    engine = _engine(x, persist=persist, balance=False, executor=executor)
    n = engine.x.shape[0]
    runs = [
        Run(i, np.asarray(c, dtype=np.float64) / scale, state="eval")
        for i, c in enumerate(centroids)
    ]
    out: dict[int, tuple[np.ndarray, float, float]] = {}
    for group, evals, part in engine.run(runs, labels=True, errors=errors):
        for pos, run in enumerate(group):
            labels = np.concatenate(
                [lab for _, lab in sorted(_labels_of(part, evals, pos), key=lambda t: t[0])]
            )
            j, md = math.nan, math.nan
            if errors:
                j = float(part.eval_sse[pos] / n * scale**2)
                md = float(part.eval_dist[pos] / n * scale)
            out[run.index] = (labels, j, md)
    return [out[i] for i in range(len(runs))]


@dataclass(frozen=True)
class _Engine:
    """What ``lloyd`` and ``predict`` share: the data, its passes' layout, who runs them."""

    x: da.Array  # (N, D) row chunks, persisted as asked
    layout: Layout
    executor: Executor
    w: da.Array | None = None  # (N, 1) float64 sample weights, chunked (and placed) as x

    def run(
        self,
        runs: list[Run],
        *,
        labels: bool,
        errors: bool = True,
        patches: dict | None = None,
        stateless: bool = False,
    ) -> list[tuple[tuple[Run, ...], list[int], Partial]]:
        """One pass; per group: its runs, the stack positions being evaluated, the partial.

        ``stateless``: neither use nor replace the chunks' states (nor prune).
        """
        lay = replace(self.layout, stateful=False, prune=False) if stateless else self.layout
        # fresh keys every pass: nothing to hash, nothing shared with a failed pass
        plan = plan_pass(runs, lay, uuid.uuid4().hex, labels=labels, errors=errors, patches=patches)
        parts = self.executor.run(plan)
        return [(group, plan.evals(g), parts[g]) for g, group in enumerate(plan.groups)]


def _engine(
    x: np.ndarray | da.Array,
    *,
    persist: bool,
    balance: bool,
    integer: bool | None = None,
    n_groups: int | None = None,
    stateful: bool = False,
    prune: bool = False,
    executor: str | None = None,
    sample_weight: np.ndarray | da.Array | None = None,
) -> _Engine:
    """The setup of a call: ``x`` as row chunks (persisted, placed evenly if ``balance``), the
    sample weights checked and chunked as x (persisted beside its chunks), the passes' layout
    and the executor."""
    client = default_client()
    x = as_dask(x, threads=n_threads(client))
    spec, w = (None, None) if sample_weight is None else weights.prepare(sample_weight, x)
    if persist:
        x = persist_balanced(x) if balance else persist_here(x, client)
    if w is not None:
        w = persist_like(w, x) if persist else w.rechunk({0: x.chunks[0]})
    if integer is None:
        integer = x.dtype == np.uint8
    if n_groups is None:
        n_groups = max(1, math.ceil(n_threads(client) / x.numblocks[0]))
    lay = layout(x.chunks[0], n_groups, compute_dtype(x.dtype), integer, stateful, prune, spec)
    return _Engine(x, lay, pick(x, client, executor, w), w)


def _exact_candidates(engine: _Engine, runs: list[Run]) -> list[tuple[Run, Partial, int]]:
    """Relocation candidates from an unpruned pass (pruned passes only know upper bounds)."""
    found = {}
    for group, _, part in engine.run(runs, labels=False, errors=False, stateless=True):
        for pos, run in enumerate(group):
            found[run.index] = (run, part, pos)
    return [found[r.index] for r in runs]


def _move(run: Run, new: np.ndarray) -> float:
    """Replace the centroids; remember each one's move (for the bounds); return the largest."""
    move = new - run.c64
    run.drift = np.sqrt(np.einsum("ij,ij->i", move, move))
    run.c64 = new
    return float(run.drift.max())


def _update(run: Run, tol_raw: float, max_iter: int, rule: str = "study") -> None:
    """New centroids = means; decide convergence."""
    _move(run, weights.means(run))
    run.shift = stopping.shift(run.drift, rule)
    done, run.converged = stopping.stop(run.drift, tol_raw, run.n_iter, max_iter, rule)
    if done:
        run.state = "eval"


def _relocate(
    x: da.Array, items: list, max_iter: int, w: da.Array | None = None
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Move the farthest points into empty clusters (scikit-learn's policy), then update.

    With sample weights ``w`` a cluster is empty when no row of positive weight is in it; the
    farthest rows of positive weight move in with their weights (scikit-learn's
    ``_relocate_empty_clusters_dense`` picks by distance alone, rows of weight 0 included).

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
    name = f"kmclust-relocate-{uuid.uuid4().hex}"
    if w is None:
        fetched = np.asarray(take_rows(x, order, name).compute(), dtype=np.float64)
    else:
        xs, ws = dask.compute(take_rows(x, order, name), take_rows(w, order, name + "w"))
        fetched = weights.packed_rows(np.asarray(xs, np.float64), ws[:, 0], plans[0][0].weights)
    rows = dict(zip(order.tolist(), fetched))
    for run, empty, picks in plans:
        for e, (idx, lab) in zip(empty, picks):
            run.sums[lab] -= rows[idx]
            run.counts[lab] -= 1
            run.sums[e] = rows[idx]
            run.counts[e] = 1
        patches[run.index] = (np.array([i for i, _ in picks]), empty.astype(np.int64))
        run.n_relocated += empty.size
        _move(run, weights.means(run))
        if stopping.stop(math.inf, 0.0, run.n_iter, max_iter)[0]:
            run.state = "eval"
    return patches


def _labels_of(part: Partial, evals: list[int], pos: int) -> list[tuple[int, np.ndarray]]:
    """The label columns of stack position ``pos`` among the evaluated positions."""
    col = evals.index(pos)
    return [(start, lab[:, col]) for start, lab in part.labels]


def _result(run: Run, n, scale: float) -> RunResult:
    """The outcome of a run; ``n`` the number of rows, or with sample weights Σw (exact)."""
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
        shift=run.shift,
        inertia=float(run.sse * scale**2) if not run.error else math.nan,
    )
