"""Seconds per Lloyd iteration of one run: kmclust, scikit-learn lloyd and elkan, dask-ml.

A fixed iteration count (tol=0) from the same initial centroids for every
tool, so each fit does the same work; the fastest of a few fits counts,
since other people's load on a shared machine only ever adds time. Each
fit's fixed costs (input checks, kmclust's final exact-J pass, dask-ml's
final labelling pass) are part of its time, as a user pays them.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import (
    SCALE,
    ClusterSpec,
    cluster_note,
    fashion_rows,
    kmclust_name,
    machine_info,
    metered,
    scheduler,
    sklearn_fit,
    worker_blas,
)
from benchmarks.history import Outcome, markdown_table
from kmclust.lloyd.driver import lloyd
from kmclust.lloyd.init import init_centroids
from kmclust.lloyd.placement import persist_balanced

log = logging.getLogger(__name__)

#: a fit from initial centroids for at most max_iter iterations → the iterations it ran
Fit = Callable[[np.ndarray, int], int]


@dataclass(frozen=True)
class IterationConfig:
    store_dir: Path = Path("data")
    ks: tuple[int, ...] = (10, 20, 256)
    iterations: int = 10
    rows: int | None = None  # first N rows of train + test; None: all
    repeats: int = 3  # fits per tool and k; the fastest counts
    prune: bool = True
    cluster: ClusterSpec = field(default_factory=ClusterSpec)


def dask_ml_kmeans():
    """dask_ml.cluster.KMeans, or None when dask-ml is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dask_ml.cluster import KMeans
    except ImportError:
        return None
    return KMeans


def _sklearn_iters(xf: np.ndarray, algorithm: str, c: np.ndarray, max_iter: int) -> int:
    return sklearn_fit(xf, c, algorithm, max_iter).n_iter_


def _kmclust_iters(x, prune: bool, c: np.ndarray, max_iter: int) -> int:
    return lloyd(x, [c], tol=0.0, max_iter=max_iter, scale=SCALE, prune=prune)[0].n_iter


def _dask_ml_iters(xf, c: np.ndarray, max_iter: int) -> int:
    km = dask_ml_kmeans()(
        n_clusters=c.shape[0], init=c.astype(np.float32), max_iter=max_iter, tol=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return km.fit(xf).n_iter_


@dataclass
class _Timings:
    """Per tool and k: wall and CPU seconds per iteration, iterations run; load per tool."""

    wall: dict[str, dict[int, float]] = field(default_factory=dict)
    cpu: dict[str, dict[int, float]] = field(default_factory=dict)
    n_iter: dict[str, dict[int, int]] = field(default_factory=dict)
    loads: dict[str, str] = field(default_factory=dict)

    def measure(self, tool: str, fit: Fit, inits: dict, cfg: IterationConfig, warm: int) -> None:
        """Best of ``cfg.repeats`` fits per k, after one warm-up fit of ``warm`` iterations.

        The warm-up takes JIT compilation, thread pools and first-touch page faults out of
        the figures; it runs every iteration a timed fit runs when ``warm`` is the full count.
        """
        fit(inits[cfg.ks[0]], warm)
        load0 = os.getloadavg()[0]
        for k in cfg.ks:
            best = None
            for _ in range(cfg.repeats):
                with metered() as m:
                    it = fit(inits[k], cfg.iterations)
                if best is None or m.wall / it < best[0].wall / best[1]:
                    best = (m, it)
            m, it = best
            self.wall.setdefault(tool, {})[k] = m.wall / it
            self.cpu.setdefault(tool, {})[k] = m.cpu / it
            self.n_iter.setdefault(tool, {})[k] = it
            log.info("%s k=%d: %.1f ms / iteration (%d iterations)", tool, k, 1e3 * m.wall / it, it)
        self.loads[tool] = f"{load0:.1f}→{os.getloadavg()[0]:.1f}"


def run_iteration(cfg: IterationConfig) -> Outcome:
    """Seconds per Lloyd iteration of one run, fixed iteration count, for every tool present."""
    machine = machine_info()
    x = fashion_rows(cfg.store_dir, cfg.rows, None)
    x_np = np.asarray(x.compute())
    n = x_np.shape[0]
    xf = x_np.astype(np.float32) / np.float32(255)
    inits = {k: init_centroids(x_np, k, "data", 0) * SCALE for k in cfg.ks}
    t = _Timings()
    for alg in ("lloyd", "elkan"):
        t.measure(f"sklearn {alg}", functools.partial(_sklearn_iters, xf, alg), inits, cfg, 1)
    has_dask_ml = dask_ml_kmeans() is not None
    for name in cfg.cluster.schedulers:
        with scheduler(name, cfg.cluster) as client:
            worker_blas(client, machine)
            xp = persist_balanced(x)  # loaded before the clock starts, as the sweep does
            km = functools.partial(_kmclust_iters, xp, cfg.prune)
            t.measure(kmclust_name(name, cfg.prune), km, inits, cfg, cfg.iterations)
            if has_dask_ml:
                xfd = persist_balanced(xp.astype(np.float32) / np.float32(255))  # same chunks
                dml = functools.partial(_dask_ml_iters, xfd)
                t.measure(f"dask-ml[{name}]", dml, inits, cfg, 1)
    table = _table(t, cfg.ks)
    notes = [
        f"data: first {n:,} Fashion-MNIST images (train + test), one run per tool and k, "
        "init = k data rows (seed 0, the same array for every tool), tol=0, "
        f"max_iter={cfg.iterations}; ms/iter = fit wall time / iterations actually run, best "
        f"of {cfg.repeats} fits after one warm-up fit (each fit's fixed costs — input checks, "
        "kmclust's final exact-J pass, dask-ml's final labelling pass — are included); (CPU) = "
        "CPU ms of driver + workers per iteration in that fit",
        "ratios: wall time of sklearn lloyd and of the best dask-ml scheduler over the best "
        "kmclust scheduler",
        "1-min load average before → after each tool: "
        + ", ".join(f"{tool} {v}" for tool, v in t.loads.items()),
        f"iterations run: {t.n_iter}",
        *cluster_note(cfg.cluster, machine),
    ]
    if not has_dask_ml:
        notes.append("dask-ml is not installed (pip install -e '.[bench]'): its column is skipped")
    return Outcome(
        "iteration",
        f"iteration — Fashion-MNIST {n:,} rows, k = {', '.join(map(str, cfg.ks))}",
        {
            "n": n,
            "per_iteration": t.wall,
            "cpu_per_iteration": t.cpu,
            "n_iter": t.n_iter,
            "dask_ml": has_dask_ml,
            "loads": t.loads,
        },
        table,
        notes,
        machine,
    )


def _table(t: _Timings, ks: tuple[int, ...]) -> str:
    """ms per iteration (CPU ms) per tool and k, and the ratios to the best kmclust scheduler."""
    tools = list(t.wall)
    kinds = {kind: [x for x in tools if x.startswith(kind)] for kind in ("kmclust", "dask-ml")}
    rows = []
    for k in ks:
        ms = {x: 1e3 * t.wall[x][k] for x in tools}
        km_best = min(ms[x] for x in kinds["kmclust"])
        dml = min(ms[x] for x in kinds["dask-ml"]) / km_best if kinds["dask-ml"] else float("nan")
        cells = [f"{ms[x]:.3g} ({1e3 * t.cpu[x][k]:.3g})" for x in tools]
        rows.append([k, *cells, ms["sklearn lloyd"] / km_best, dml])
    headers = [
        "k",
        *[f"{x} ms/iter (CPU)" for x in tools],
        "sklearn lloyd / kmclust",
        "dask-ml / kmclust",
    ]
    return markdown_table(headers, rows)
