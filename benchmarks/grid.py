"""The whole k × init × seed grid as one kmclust batch against a loop of scikit-learn fits.

Both run to strict convergence (tol=0) from the same initial centroids, the
sweep's own (:func:`kmclust.lloyd.init.cell_seed`), so the comparison also
checks results: Lloyd iterations, the final J and labels per run, against
scikit-learn on float32 data and on float64 data (free of float32 rounding
in the distances: the reference for fixed points). faiss (no tolerance) runs
each run for the iterations scikit-learn needed. The share of this machine's
float32 GEMM roofline tells how much of the grid is arithmetic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import (
    SCALE,
    ClusterSpec,
    PeakRss,
    fashion_rows,
    kmclust_name,
    machine_info,
    metered,
    scheduler,
    sklearn_fit,
    worker_blas,
)
from benchmarks.grid_notes import JOB, notes
from benchmarks.history import Outcome, markdown_table
from benchmarks.job import JobGrid, run_job
from benchmarks.peers import FAISS, faiss_loop, faiss_module
from kmclust.errors import DataError
from kmclust.lloyd import spread
from kmclust.lloyd.driver import lloyd
from kmclust.lloyd.init import cell_seed, init_centroids
from kmclust.lloyd.placement import n_threads, persist_balanced

log = logging.getLogger(__name__)

#: the study's two initialisations (any of kmclust.lloyd.init.INITS may be given)
STUDY_INITS = ("random", "data")
COLUMNS = (
    ("wall s", "wall", None),
    ("CPU s", "cpu", None),
    ("load", "load", None),
    ("Lloyd iterations", "iterations", None),
    ("ms / iteration", "ms_per_iteration", None),
    ("speed-up vs sklearn", "speedup", 1.0),
    ("CPU-time ratio", "cpu_speedup", 1.0),
    ("speed-up vs faiss", "speedup_faiss", "–"),
    ("CPU-time ratio vs faiss", "cpu_speedup_faiss", "–"),
    ("max rel. J diff", "max_rel_j_diff", float("nan")),
    ("same, vs float64 J, equal labels", "max_rel_j64_diff_same_labels", float("nan")),
    ("runs with other labels", "runs_labels_differ", "–"),
    ("runs with other n_iter", "runs_n_iter_differ", "–"),
    ("max rel. J diff vs sklearn float64", "max_rel_j_diff_vs_float64", "–"),
    ("runs with other labels than sklearn float64", "runs_labels_differ_vs_float64", "–"),
    ("useful GFLOP/s", "gflops", None),
)


@dataclass(frozen=True)
class GridConfig:
    store_dir: Path = Path("data")
    ks: tuple[int, ...] = tuple(range(5, 21))
    inits: tuple[str, ...] = STUDY_INITS
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: int | None = None  # first N training rows; None: all
    max_iter: int = 100
    prune: bool = True  # lloyd(prune=...): Hamerly-style bounds (the default) or not
    float64: bool = True  # also a float64 sklearn loop: fixed points free of float32 rounding
    faiss: bool = True  # also a faiss loop (no subsampling), when faiss-cpu is installed
    job: bool = True  # also the real job (jobs/sweep.py, start to exit) on the same grid
    job_report: bool = True  # the job writes its report too (as `make sweep` does)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)


def gemm_roofline(m: int = 8192, d: int = 784, k: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of a float32 (m × d) @ (d × k) product: the GEMM ceiling."""
    rng = np.random.default_rng(0)
    a, b = rng.random((m, d), dtype=np.float32), rng.random((d, k), dtype=np.float32)
    a @ b
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best.append(time.perf_counter() - t0)
    return 2.0 * m * d * k / min(best) / 1e9


def sse64(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, block: int = 4096) -> float:
    """Σ‖x − z_label‖² by direct float64 differences (an independent J reference), in row blocks."""
    total = 0.0
    c64 = np.asarray(centroids, dtype=np.float64)
    for lo in range(0, x.shape[0], block):
        diff = x[lo : lo + block].astype(np.float64) - c64[labels[lo : lo + block]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


def n_iter_of(fit) -> int:
    """Lloyd iterations of a kmclust result (``n_iter``) or a scikit-learn fit (``n_iter_``)."""
    return fit.n_iter_ if hasattr(fit, "n_iter_") else fit.n_iter


def compare(
    results: Sequence,
    j: Sequence[float],
    labels: Sequence[np.ndarray],
    ref: Sequence,
    ref_j64: Sequence[float],
) -> dict:
    """Final J and labels of one tool's runs against a scikit-learn loop's (``ref``), same inits."""
    signed = np.array([(a - m.inertia_) / m.inertia_ for a, m in zip(j, ref)])
    exact = np.array([(a - b) / b for a, b in zip(j, ref_j64)])
    same = np.array([np.array_equal(lab, m.labels_) for lab, m in zip(labels, ref)])
    n_iter = np.array([n_iter_of(r) for r in results])
    ref_iter = np.array([n_iter_of(m) for m in ref])
    other = ~same
    return {
        "max_rel_j_diff": float(np.abs(signed).max()),
        "max_rel_j64_diff_same_labels": float(np.abs(exact[same]).max())
        if same.any()
        else float("nan"),
        "runs_labels_differ": int(other.sum()),
        "runs_n_iter_differ": int((n_iter != ref_iter).sum()),
        "other_fixed_points": {
            "kmclust_lower_j": int((signed[other] < 0).sum()),
            "kmclust_higher_j": int((signed[other] > 0).sum()),
            "median_rel_j_diff": float(np.median(signed[other])) if other.any() else 0.0,
        },
        "per_run": {
            "n_iter": n_iter.tolist(),
            "sklearn_n_iter": ref_iter.tolist(),
            "rel_j_diff": signed.tolist(),
            "same_labels": same.tolist(),
        },
    }


def _vs_float64(res_j: Sequence[float], labels: Sequence[np.ndarray], sk64: Sequence) -> dict:
    """The two columns against the float64 scikit-learn loop."""
    vs = compare(sk64, res_j, labels, sk64, [m.inertia_ for m in sk64])
    return {
        "max_rel_j_diff_vs_float64": vs["max_rel_j_diff"],
        "runs_labels_differ_vs_float64": vs["runs_labels_differ"],
    }


def _fit_predict(xf: np.ndarray, x_test: np.ndarray, c: np.ndarray, max_iter: int):
    """One run as the sweep makes it: fit from ``c``, then label the held-out rows."""
    km = sklearn_fit(xf, c, "lloyd", max_iter)
    km.predict(x_test)
    return km


def _sklearn_loops(x_np: np.ndarray, xf, xt, inits: list[np.ndarray], cfg: GridConfig):
    """The float32 loop (and the float64 one): fits, figures, float64 J of the float32 fits.

    The float32 loop also labels the held-out rows ``xt`` after each fit (the sweep's work);
    the float64 loop, the fixed-point reference, only fits.
    """
    log.info("scikit-learn: %d runs", len(inits))
    with metered() as m32:
        sk = [_fit_predict(xf, xt, c, cfg.max_iter) for c in inits]
    sk_j64 = [sse64(x_np, m.cluster_centers_ / SCALE, m.labels_) * SCALE**2 for m in sk]
    tools = {"sklearn": _figures(m32, sk)}
    sk64 = None
    if cfg.float64:
        log.info("scikit-learn float64: %d runs", len(inits))
        x64 = x_np.astype(np.float64) * SCALE
        with metered() as m64:
            sk64 = [sklearn_fit(x64, c, "lloyd", cfg.max_iter) for c in inits]
        del x64
        tools["sklearn float64"] = {
            **_figures(m64, sk64, m32),
            **compare(sk64, [m.inertia_ for m in sk64], [m.labels_ for m in sk64], sk, sk_j64),
            "max_rel_j_diff_vs_float64": 0.0,
            "runs_labels_differ_vs_float64": 0,
        }
        tools["sklearn"].update(
            _vs_float64([m.inertia_ for m in sk], [m.labels_ for m in sk], sk64)
        )
    return sk, sk64, sk_j64, tools


def _faiss_tool(xf, xt, inits: list[np.ndarray], sk, sk64, sk_j64, sk_meter: dict) -> dict:
    """The faiss loop, each run for the iterations scikit-learn (float64 if run) needed."""
    n_iters = [n_iter_of(m) for m in (sk64 or sk)]
    log.info("faiss: %d runs, %d iterations in all", len(inits), sum(n_iters))
    meter, fits = faiss_loop(xf, xt, [c.astype(np.float32) for c in inits], n_iters)
    j = [f.inertia for f in fits]  # faiss's own J of pixels in [0, 1], as sklearn's inertia_
    tool = {
        **_figures(meter, fits),
        "speedup": sk_meter["wall"] / meter.wall,
        "cpu_speedup": sk_meter["cpu"] / meter.cpu,
        **compare(fits, j, [f.labels for f in fits], sk, sk_j64),
        "runs_n_iter_differ": "–",  # its n_iter is given, not found
        "n_split": sum(f.n_split for f in fits),
        "fits": fits,
    }
    if sk64 is not None:
        tool |= _vs_float64(j, [f.labels for f in fits], sk64)
    return tool


def _figures(meter, fits: Sequence, base=None) -> dict:
    """Wall, CPU, load, Lloyd iterations (and the ratios to ``base``'s meter) of one tool."""
    n_iter = [n_iter_of(f) for f in fits]
    out = {
        "wall": meter.wall,
        "cpu": meter.cpu,
        "load": meter.load_text(),
        "iterations": int(sum(n_iter)),
        "n_iter": np.array(n_iter),
    }
    if base is not None:
        out |= {"speedup": base.wall / meter.wall, "cpu_speedup": base.cpu / meter.cpu}
    return out


def _lloyd_kw(cfg: GridConfig) -> dict:
    """The engine's options for every kmclust run of the grid (strict convergence, labels)."""
    return dict(tol=0.0, max_iter=cfg.max_iter, scale=SCALE, return_labels=True, prune=cfg.prune)


def _kmclust_batch(x, inits: list[np.ndarray], cfg: GridConfig, name: str, machine: dict):
    """One engine batch of every run on scheduler ``name``: its meter and its results."""
    with scheduler(name, cfg.cluster) as client:
        worker_blas(client, machine)
        xp = persist_balanced(x)  # loaded and placed before the clock starts, as the sweep does
        log.info("kmclust on %s: %d runs in one batch", name, len(inits))
        with PeakRss(client) as rss, metered() as meter:
            res = lloyd(xp, inits, **_lloyd_kw(cfg))
    return meter, res, rss.text()


def _kmclust_spread(x, inits: list[np.ndarray], cfg: GridConfig, name: str, machine: dict):
    """The runs dealt out to the workers of cluster ``name``, each holding every row (as the sweep
    job runs them when the rows fit: kmclust.lloyd.spread): its meter, results and peak memory;
    None without a cluster or when the rows do not fit."""
    with scheduler(name, cfg.cluster) as client:
        if client is None or not spread.fits_every_worker(client, x.nbytes):
            return None
        worker_blas(client, machine)
        xp = persist_balanced(x)
        ks = [len(c) for c in inits]
        batches = spread.deal(ks, ks, spread.BATCHES_PER_THREAD * n_threads(client))
        log.info("kmclust on %s: %d runs in %d batches on the workers", name, len(ks), len(batches))
        res: list = [None] * len(inits)
        with PeakRss(client) as rss, metered() as meter:
            for members, out in spread.fit_batches(
                client, xp, None, inits, batches, **_lloyd_kw(cfg)
            ):
                if isinstance(out, BaseException):
                    raise out
                for i, r in zip(members, out[0], strict=True):
                    res[i] = r
    return meter, res, rss.text()


def run_grid(cfg: GridConfig) -> Outcome:
    """The grid as one kmclust batch (each scheduler) vs a loop of scikit-learn KMeans runs."""
    machine = machine_info()
    x = fashion_rows(cfg.store_dir, cfg.rows, "train")
    x_np = np.asarray(x.compute())
    n, d = x_np.shape
    cells = [(k, init, s) for k in cfg.ks for init in cfg.inits for s in cfg.seeds]
    inits = [init_centroids(x_np, k, init, cell_seed(s, k, init)) * SCALE for k, init, s in cells]
    gemm = gemm_roofline()
    flop_per_iter = np.array([2.0 * n * d * k for k, _, _ in cells])

    xf = x_np.astype(np.float32) / np.float32(255)
    xt = np.asarray(fashion_rows(cfg.store_dir, None, "test").compute()) / np.float32(255)
    sk, sk64, sk_j64, tools = _sklearn_loops(x_np, xf, xt, inits, cfg)
    sk_meter = tools["sklearn"]
    has_faiss = cfg.faiss and faiss_module() is not None
    if has_faiss:
        tools[FAISS] = _faiss_tool(xf, xt, inits, sk, sk64, sk_j64, sk_meter)
    runs = [(name, "", _kmclust_batch) for name in cfg.cluster.schedulers]
    runs += [(name, ", spread", _kmclust_spread) for name in cfg.cluster.schedulers]
    for name, way, how in runs:
        done = how(x, inits, cfg, name, machine)
        if done is None:
            continue
        meter, res, rss = done
        bad = [r.error for r in res if r.error]
        if bad:
            raise DataError(f"kmclust run failed: {bad[0]}")
        j, labels = [r.jclust * n for r in res], [r.labels for r in res]
        tool = {
            **_figures(meter, res),
            "peak_rss": rss,
            "speedup": sk_meter["wall"] / meter.wall,
            "cpu_speedup": sk_meter["cpu"] / meter.cpu,
            **compare(res, j, labels, sk, sk_j64),
        }
        if sk64 is not None:
            tool |= _vs_float64(j, labels, sk64)
        tools[kmclust_name(name, cfg.prune).replace("]", way + "]")] = tool
    if cfg.job:
        log.info("the sweep job (jobs/sweep.py) on the same grid")
        grid = JobGrid(cfg.ks, cfg.inits, cfg.seeds, cfg.max_iter, cfg.job_report)
        job = run_job(grid, cfg.store_dir, cfg.rows)
        tools[JOB] = job | {
            "speedup": sk_meter["wall"] / job["wall"],
            "cpu_speedup": sk_meter["cpu"] / job["cpu"],
        }
    for name, t in tools.items():
        if has_faiss:
            t["speedup_faiss"] = tools[FAISS]["wall"] / t["wall"]
            t["cpu_speedup_faiss"] = tools[FAISS]["cpu"] / t["cpu"]
        n_iter = t.pop("n_iter", None)  # the job's per-run counts are in its store, not here
        if n_iter is not None and name != FAISS:  # faiss's counts are given, not found
            t["hit_max_iter"] = int((n_iter >= cfg.max_iter).sum())
        t["gflops"] = float("nan") if n_iter is None else n_iter @ flop_per_iter / t["wall"] / 1e9
        t["roofline_share"] = t["gflops"] / gemm
        t["ms_per_iteration"] = 1e3 * t["wall"] / t["iterations"]
    rows = [
        [name]
        + [t.get(key, missing) for _, key, missing in COLUMNS]
        + ["–" if np.isnan(t["roofline_share"]) else f"{100 * t['roofline_share']:.1f} %"]
        for name, t in tools.items()
    ]
    table = markdown_table(["tool", *(h for h, _, _ in COLUMNS), "of roofline"], rows)
    return Outcome(
        "grid",
        f"grid — Fashion-MNIST, {len(cells)} runs",
        {"n": n, "runs": len(cells), "roofline_gflops": gemm, "tools": tools},
        table,
        notes(cfg, n, d, len(cells), gemm, sk64 is not None, has_faiss, tools, machine),
        machine,
    )
