"""Whole fits of kmclust.KMeans on float32 Gaussian blobs of any dimension, beside the peers.

The estimator's users pass float arrays of every shape (embeddings, features,
coordinates), not only 784 pixels: this mode times the whole call they make,
``kmclust.KMeans(init=c, n_init=1, tol=0).fit(x)`` to convergence, next to
scikit-learn's KMeans (lloyd and elkan) and faiss (no subsampling, as many
iterations as scikit-learn's lloyd ran: faiss has no convergence test) from the
same initial centroids, for each (d, k), with scikit-learn on float64 rows as the
fixed point every tool's labels are checked against. Low dimensions are where per-row work
around the distances, not the distance products, sets the pace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.common import machine_info, metered, sklearn_fit
from benchmarks.history import Outcome, markdown_table
from benchmarks.peers import FAISS, faiss_kmeans, faiss_module

log = logging.getLogger(__name__)

#: kmclust.KMeans columns: "<ESTIMATOR> lloyd" and "<ESTIMATOR> elkan"
ESTIMATOR = "kmclust.KMeans"
#: the tool the ratios are taken to
PEER = "sklearn lloyd"
#: the fixed point every tool's labels are compared with: scikit-learn's lloyd on float64 rows
#: (in float32 its centroid updates round, and near-degenerate fits end elsewhere)
REFERENCE = "sklearn lloyd float64"


@dataclass(frozen=True)
class BlobsConfig:
    shapes: tuple[tuple[int, int], ...] = ((2, 8), (16, 32), (50, 10), (300, 10))  # (d, k)
    rows: int = 200_000
    max_iter: int = 300
    repeats: int = 2  # fits per tool and shape; the fastest counts
    faiss: bool = True


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """``n`` float32 rows around ``k`` Gaussian centres in ``d`` dimensions (spread 3, noise 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    return (centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _estimator(algorithm: str) -> Callable:
    def fit(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[int, np.ndarray]:
        from kmclust import KMeans

        km = KMeans(c.shape[0], init=c, n_init=1, max_iter=max_iter, tol=0.0, algorithm=algorithm)
        km.fit(x)
        return km.n_iter_, km.labels_

    return fit


def _sklearn(algorithm: str, dtype: type = np.float32) -> Callable:
    def fit(x: np.ndarray, c: np.ndarray, max_iter: int) -> tuple[int, np.ndarray]:
        km = sklearn_fit(x.astype(dtype, copy=False), c, algorithm, max_iter)
        return km.n_iter_, km.labels_

    return fit


def _faiss(niter: int) -> Callable:
    """faiss without subsampling for ``niter`` iterations, whatever the fit is asked for."""

    def fit(x: np.ndarray, c: np.ndarray, _max_iter: int) -> tuple[int, np.ndarray]:
        km = faiss_kmeans(x, c, niter)
        return niter, km.index.search(x, 1)[1].ravel()

    return fit


def run_blobs(cfg: BlobsConfig) -> Outcome:
    """Per (d, k) and tool: seconds per whole fit, iterations, labels equal to scikit-learn's."""
    machine = machine_info()
    tools: dict[str, Callable] = {REFERENCE: _sklearn("lloyd", np.float64)}
    for alg in ("lloyd", "elkan"):
        tools[f"sklearn {alg}"] = _sklearn(alg)
    for alg in ("lloyd", "elkan"):
        tools[f"{ESTIMATOR} {alg}"] = _estimator(alg)
    has_faiss = cfg.faiss and faiss_module() is not None
    wall: dict[str, dict] = {t: {} for t in tools}
    n_iter: dict[str, dict] = {t: {} for t in tools}
    agree: dict[str, dict] = {t: {} for t in tools}
    if has_faiss:
        for d in (wall, n_iter, agree):
            d[FAISS] = {}
    load0 = os.getloadavg()[0]
    for d, k in cfg.shapes:
        x = blobs(cfg.rows, d, k)
        c = x[:k].copy()  # k data rows: the same start for every tool
        ref = None
        for tool, fit in [*tools.items(), *([(FAISS, None)] if has_faiss else [])]:
            if tool == FAISS:  # as many iterations as scikit-learn's lloyd ran
                fit = _faiss(n_iter[PEER][(d, k)])
            fit(x, c, 2)  # warm-up: JIT compilation, thread pools, first-touch pages
            best = None
            for _ in range(cfg.repeats):
                with metered() as m:
                    it, labels = fit(x, c, cfg.max_iter)
                best = m.wall if best is None else min(best, m.wall)
            if tool == REFERENCE:
                ref = labels
            wall[tool][(d, k)], n_iter[tool][(d, k)] = best, it
            agree[tool][(d, k)] = float(np.mean(labels == ref))
            log.info("%s d=%d k=%d: %.3f s, %d iterations", tool, d, k, best, it)
    rows = []
    for d, k in cfg.shapes:
        cells = [
            f"{wall[t][(d, k)]:.3g} ({n_iter[t][(d, k)]})"
            + ("" if agree[t][(d, k)] == 1 else f" [{agree[t][(d, k)]:.4f}]")
            for t in wall
        ]
        per_iter = {t: wall[t][(d, k)] / n_iter[t][(d, k)] for t in wall}
        best_km = min(per_iter[f"{ESTIMATOR} {a}"] for a in ("lloyd", "elkan"))
        rows.append([d, k, *cells, best_km / per_iter[PEER]])
    headers = [
        "d",
        "k",
        *[f"{t} s (iterations)" for t in wall],
        f"best KMeans / {PEER}, per iteration",
    ]
    notes = [
        f"data: {cfg.rows:,} float32 rows around k Gaussian centres (spread 3, noise 1, seed 0); "
        "init = the first k rows for every tool; tol=0 (to convergence: labels unchanged), "
        f"max_iter={cfg.max_iter}; seconds = whole fit (input checks, labels, inertia), best of "
        f"{cfg.repeats} after a 2-iteration warm-up fit",
        f"{ESTIMATOR} lloyd/elkan: kmclust.KMeans(init=..., n_init=1, tol=0, algorithm=...)"
        ".fit(x) on the numpy array, in this process; faiss: faiss.Kmeans without subsampling "
        f"for as many iterations as {PEER} ran; [fraction] = labels equal to those of "
        f"{REFERENCE} (on the rows in float64: the exact fixed point from that start) where not "
        "all are",
        f"1-min load average {load0:.1f} → {os.getloadavg()[0]:.1f}",
    ]
    if cfg.faiss and not has_faiss:
        notes.append("faiss-cpu is not installed (pip install -e '.[bench]'): its column skipped")
    shapes = ", ".join(f"{d}×{k}" for d, k in cfg.shapes)
    return Outcome(
        "blobs",
        f"blobs — float32 Gaussian blobs, {cfg.rows:,} rows, d×k = {shapes}",
        {
            "rows": cfg.rows,
            "seconds": {t: {f"{d}x{k}": v for (d, k), v in w.items()} for t, w in wall.items()},
            "n_iter": {t: {f"{d}x{k}": v for (d, k), v in w.items()} for t, w in n_iter.items()},
            "agree": {t: {f"{d}x{k}": v for (d, k), v in w.items()} for t, w in agree.items()},
            "faiss": has_faiss,
        },
        markdown_table(headers, rows),
        notes,
        machine,
    )
