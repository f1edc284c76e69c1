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
from benchmarks.peers import FAISS, FAISS_SUB, faiss_kmeans, faiss_module
from kmclust.lloyd.driver import lloyd
from kmclust.lloyd.init import init_centroids
from kmclust.lloyd.placement import persist_balanced

log = logging.getLogger(__name__)

#: the estimator's columns: "<ESTIMATOR> lloyd" and "<ESTIMATOR> elkan"
ESTIMATOR = "kmclust.KMeans float32"

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
    float32: bool = True  # also kmclust given float32 rows in [0, 1] (the estimator's users)
    estimator: bool = True  # kmclust.KMeans(...).fit on numpy float32: what its users run
    faiss: bool = True  # faiss-cpu, when installed: without subsampling and with its default
    dask_ml: bool = True  # dask-ml, when installed (slow at large k)
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


def _faiss_iters(xf: np.ndarray, subsample: bool, c: np.ndarray, max_iter: int) -> int:
    """faiss.Kmeans from ``c`` for exactly ``max_iter`` iterations (faiss has no tolerance)."""
    faiss_kmeans(xf, c, max_iter, subsample)
    return max_iter


def _sklearn_iters(xf: np.ndarray, algorithm: str, c: np.ndarray, max_iter: int) -> int:
    return sklearn_fit(xf, c, algorithm, max_iter).n_iter_


def _kmclust_iters(x, prune: bool, c: np.ndarray, max_iter: int, scale: float = SCALE) -> int:
    return lloyd(x, [c], tol=0.0, max_iter=max_iter, scale=scale, prune=prune)[0].n_iter


def _estimator_iters(xf: np.ndarray, algorithm: str, c: np.ndarray, max_iter: int) -> int:
    """kmclust.KMeans on a numpy float32 array, as its users call it (checks, conversion, the
    engine's in-process pool, labels and inertia)."""
    from kmclust import KMeans

    km = KMeans(c.shape[0], init=c, n_init=1, max_iter=max_iter, tol=0.0, algorithm=algorithm)
    return km.fit(xf).n_iter_


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
    has_faiss = cfg.faiss and faiss_module() is not None
    if has_faiss:
        t.measure(FAISS, functools.partial(_faiss_iters, xf, False), inits, cfg, 1)
        t.measure(FAISS_SUB, functools.partial(_faiss_iters, xf, True), inits, cfg, 1)
    if cfg.estimator:
        for alg in ("lloyd", "elkan"):
            est = functools.partial(_estimator_iters, xf, alg)
            t.measure(f"{ESTIMATOR} {alg}", est, inits, cfg, cfg.iterations)
    has_dask_ml = cfg.dask_ml and dask_ml_kmeans() is not None
    for name in cfg.cluster.schedulers:
        with scheduler(name, cfg.cluster) as client:
            worker_blas(client, machine)
            xp = persist_balanced(x)  # loaded before the clock starts, as the sweep does
            km = functools.partial(_kmclust_iters, xp, cfg.prune)
            t.measure(kmclust_name(name, cfg.prune), km, inits, cfg, cfg.iterations)
            if has_dask_ml or cfg.float32:
                xfd = persist_balanced(xp.astype(np.float32) / np.float32(255))  # same chunks
            if cfg.float32:
                kmf = functools.partial(_kmclust_iters, xfd, cfg.prune, scale=1.0)
                label = f"{kmclust_name(name, cfg.prune)} float32"
                t.measure(label, kmf, inits, cfg, cfg.iterations)
            if has_dask_ml:
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
        "kmclust[...] is given the uint8 pixels (scale 1/255, as the sweep); kmclust[...] "
        "float32 the same rows as float32 in [0, 1], persisted dask chunks; "
        f"'{ESTIMATOR} lloyd/elkan': kmclust.KMeans(init=the centroids, n_init=1, tol=0, "
        "algorithm=lloyd/elkan).fit(the numpy float32 rows), the whole call its users make "
        "(elkan: with distance bounds); the peers float32 in [0, 1]",
        "faiss: faiss.Kmeans(niter=iterations, seed=0) from the same centroids; 'faiss' with "
        "max_points_per_centroid = N // k + 1 (no subsampling: every row in every iteration, the "
        "same work as the others); 'faiss (default ...)' with faiss's default "
        "max_points_per_centroid=256, i.e. it trains on a random sample of 256·k rows when "
        "N > 256·k (less work, another result: not comparable as a fit of all rows)",
        "ratios: wall time of sklearn lloyd, faiss (no subsampling), the best dask-ml scheduler, "
        "the best kmclust float32 scheduler and the faster kmclust.KMeans float32 algorithm over "
        "the best kmclust scheduler on uint8",
        "1-min load average before → after each tool: "
        + ", ".join(f"{tool} {v}" for tool, v in t.loads.items()),
        f"iterations run: {t.n_iter}",
        *cluster_note(cfg.cluster, machine),
    ]
    if cfg.faiss and not has_faiss:
        notes.append("faiss-cpu is not installed (pip install -e '.[bench]'): its columns skipped")
    if cfg.dask_ml and not has_dask_ml:
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
            "faiss": has_faiss,
            "loads": t.loads,
        },
        table,
        notes,
        machine,
    )


def _table(t: _Timings, ks: tuple[int, ...]) -> str:
    """ms per iteration (CPU ms) per tool and k, and the ratios to the best kmclust scheduler
    on uint8 input (and float32 kmclust's to it)."""
    tools = list(t.wall)
    kinds = {
        "kmclust": [x for x in tools if x.startswith("kmclust[") and not x.endswith(" float32")],
        "float32": [x for x in tools if x.startswith("kmclust[") and x.endswith(" float32")],
        "estimator": [x for x in tools if x.startswith(ESTIMATOR)],
        "dask-ml": [x for x in tools if x.startswith("dask-ml")],
        "faiss": [x for x in tools if x == FAISS],
    }
    ratios = [("sklearn lloyd", ["sklearn lloyd"]), *((k, kinds[k]) for k in ("faiss", "dask-ml"))]
    ratios.append(("kmclust float32", kinds["float32"]))
    ratios.append(("best KMeans float32", kinds["estimator"]))
    rows = []
    for k in ks:
        ms = {x: 1e3 * t.wall[x][k] for x in tools}
        km_best = min(ms[x] for x in kinds["kmclust"])
        cells = [f"{ms[x]:.3g} ({1e3 * t.cpu[x][k]:.3g})" for x in tools]
        over = [min(ms[x] for x in g) / km_best if g else float("nan") for _, g in ratios]
        rows.append([k, *cells, *over])
    headers = [
        "k",
        *[f"{x} ms/iter (CPU)" for x in tools],
        *[f"{name} / kmclust" for name, _ in ratios],
    ]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------- whole fits (issue 18, part 2)


def run_convergence(store_dir: Path, k: int, max_iter: int, prune: bool = True) -> list[str]:
    """Whole fits from the same k data rows until labels stop changing (tol=0) or ``max_iter``:
    kmclust (uint8, threaded pool), scikit-learn lloyd (float32), and faiss (no subsampling)
    for as many iterations as kmclust ran (faiss has no convergence test). Lines of text: per
    tool wall and CPU seconds, iterations, J (float64 from each tool's labels and centroids),
    labels shared with kmclust; and this process's peak RSS."""
    import resource

    import dask

    x = fashion_rows(store_dir, None, None)
    x_np = np.asarray(x.compute())
    xf = x_np.astype(np.float32) / np.float32(255)
    c = init_centroids(x_np, k, "data", 0) * SCALE
    out, fits = [], {}

    def j_of(labels: np.ndarray, centers: np.ndarray) -> float:
        """Mean squared distance of the pixels / 255 in float64, 10,000 rows at a time."""
        tot = 0.0
        for lo in range(0, len(xf), 10_000):
            d = x_np[lo : lo + 10_000] / 255.0 - centers[labels[lo : lo + 10_000]]
            tot += float(np.einsum("ij,ij->", d, d))
        return tot / len(xf)

    with dask.config.set(scheduler="threads"):
        xp = persist_balanced(x)
        lloyd(xp, [c], tol=0.0, max_iter=2, scale=SCALE, prune=prune)  # JIT, thread pools
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with metered() as m:
            (r,) = lloyd(xp, [c], tol=0.0, max_iter=max_iter, scale=SCALE, prune=prune,
                         return_labels=True)  # fmt: skip
        fits["kmclust"] = (m, r.n_iter, r.labels, r.centroids)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with metered() as m:
        sk = sklearn_fit(xf, c, "lloyd", max_iter)
    fits["sklearn lloyd"] = (m, sk.n_iter_, sk.labels_, sk.cluster_centers_)
    if faiss_module() is not None:
        with metered() as m:
            n, d = xf.shape
            km = faiss_module().Kmeans(
                d, k, niter=r.n_iter, seed=0, max_points_per_centroid=n // k + 1
            )
            km.train(xf, init_centroids=np.ascontiguousarray(c, dtype=np.float32))
        _, lab = km.index.search(xf, 1)
        fits["faiss"] = (m, r.n_iter, lab[:, 0], km.centroids)
    for tool, (m, it, lab, cen) in fits.items():
        j = j_of(lab, np.asarray(cen, dtype=np.float64))
        same = float(np.mean(lab == r.labels))
        out.append(
            f"{tool}: {m.wall:.2f} s wall, {m.cpu:.2f} s CPU, {it} iterations "
            f"({1e3 * m.wall / it:.0f} ms / {1e3 * m.cpu / it:.0f} ms CPU per iteration), "
            f"J {j:.12g}, labels equal to kmclust's {same:.4%}, "
            f"load {m.load[0]:.1f}→{m.load[1]:.1f}"
        )
    out.append(
        f"kmclust converged: {r.converged}; peak RSS of this process {rss0 / 1024:.0f} MB before "
        f"the timed kmclust fit, {rss1 / 1024:.0f} MB after (data, centroids, bounds, distances)"
    )
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="whole fits to convergence: kmclust, sklearn, faiss")
    p.add_argument("--fit-to-convergence", action="store_true", required=True)
    p.add_argument("--store-dir", type=Path, default=Path("data"))
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--no-prune", action="store_true")
    a = p.parse_args()
    print("\n".join(run_convergence(a.store_dir, a.k, a.max_iter, not a.no_prune)))
