"""The grid benchmark's notes: what its table measured and how to read it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.common import cluster_note
from benchmarks.peers import FAISS

if TYPE_CHECKING:
    from benchmarks.grid import GridConfig

#: the table's name of the real job
JOB = "kmclust job (jobs/sweep.py, local)"


def _faiss_notes(cfg: GridConfig, tools: dict, f64: bool, has_faiss: bool) -> list[str]:
    """How the faiss loop ran, or why it is absent."""
    if not cfg.faiss:
        return []
    if not has_faiss:
        return ["faiss-cpu is not installed (pip install -e '.[bench]'): its row is skipped"]
    ref = "sklearn float64" if f64 else "sklearn (float32)"
    return [
        "faiss: a loop of faiss.Kmeans(niter=n, max_points_per_centroid=N // k + 1: no "
        "subsampling, every row in every iteration) from the same initial centroids on the "
        f"float32 rows in [0, 1], then labels of the rows and of the held-out set; faiss has no "
        f"tolerance, so each run gets n = the Lloyd iterations {ref} needed for it (its "
        "'Lloyd iterations' are those, not its own); J = Σ of faiss's own float32 squared "
        "distances to its final centroids; empty clusters refilled by splitting a large one: "
        f"{tools[FAISS]['n_split']} splits in all; speed-up / CPU-time ratio vs faiss: faiss "
        "/ that tool",
    ]


def _run_notes(cfg: GridConfig, tools: dict) -> list[str]:
    """Runs that stopped at max_iter, and the kmclust batches' peak memory."""
    hits = {t: v["hit_max_iter"] for t, v in tools.items() if v.get("hit_max_iter")}
    out = []
    if hits:
        out.append(
            f"runs that stopped at max_iter={cfg.max_iter} (not converged): "
            + ", ".join(f"{t} {h}" for t, h in hits.items())
        )
    out += [
        f"{t} peak RSS (sampled every 0.25 s): {v['peak_rss']}"
        for t, v in tools.items()
        if "peak_rss" in v
    ]
    return out


def notes(
    cfg: GridConfig,
    n: int,
    d: int,
    runs: int,
    gemm: float,
    f64: bool,
    has_faiss: bool,
    tools: dict,
    machine: dict,
) -> list[str]:
    """What the grid's table measured and how to read it."""
    return [
        *_job_notes(tools),
        f"data: first {n:,} Fashion-MNIST training images ({d} pixels, uint8 → [0, 1]); "
        f"{runs} runs = k {cfg.ks[0]}…{cfg.ks[-1]} × {', '.join(cfg.inits)} × "
        f"{len(cfg.seeds)} seeds; tol=0 (strict convergence), max_iter={cfg.max_iter}; "
        "same initial centroids for every tool",
        "kmclust[...]: one engine batch (all runs at once, a pass over row chunks on every worker "
        "per iteration), labels returned; kmclust[..., spread]: the runs dealt out in batches of "
        "about equal cost, one task per batch fitting it to the end on a worker holding every "
        "row (kmclust.lloyd.spread: how the sweep job runs them when the rows fit every worker); "
        "sklearn: a loop of "
        "KMeans(init=array, n_init=1, algorithm='lloyd', tol=0) on float32 data in [0, 1]"
        + (
            "; sklearn float64: the same loop on float64 data (distances free of float32 "
            "rounding: the reference for fixed points; its ratio column compares its time "
            "with float32 sklearn's)"
            if f64
            else ""
        ),
        f"float32 GEMM roofline (8192×784 @ 784×2048, best of 5, driver BLAS threads): "
        f"{gemm:.1f} GFLOP/s; useful flops = Σ n_iter · 2·N·D·k (distance GEMM only) / wall",
        *cluster_note(cfg.cluster, machine),
        "J diff: |kmclust jclust·N − sklearn inertia_| / inertia_, max over runs (sklearn's "
        "inertia_ is accumulated in float32: ~2e-6 off on 60,000 rows); 'vs float64 J': "
        "against Σ‖x − z‖² of sklearn's labels and centroids recomputed here in float64, over "
        "the runs whose final labels equal sklearn's; CPU s: driver + worker processes; load: "
        "1-min load average before → after that tool; ratios: sklearn / kmclust",
        *[
            f"{t}: of the runs that ended at another fixed point than sklearn (float32 near-ties "
            f"decided differently on the way), its J is lower in "
            f"{v['other_fixed_points']['kmclust_lower_j']} and higher in "
            f"{v['other_fixed_points']['kmclust_higher_j']}, median relative difference "
            f"{v['other_fixed_points']['median_rel_j_diff']:+.2e}"
            for t, v in tools.items()
            if v.get("runs_labels_differ")
        ],
        *_faiss_notes(cfg, tools, f64, has_faiss),
        *_run_notes(cfg, tools),
    ]


def _job_notes(tools: dict) -> list[str]:
    """The job against the engine batch and the scikit-learn loop: the ratios, and what ran."""
    if JOB not in tools:
        return []
    job, sk = tools[JOB], tools["sklearn"]
    engines = {name: t for name, t in tools.items() if name.startswith("kmclust[")}
    ratios = "; ".join(
        f"job wall / {name} wall = {job['wall'] / t['wall']:.2f}, job's sweep time "
        f"('cells computed in') / {name} wall = {job['sweep_seconds'] / t['wall']:.2f}"
        for name, t in engines.items()
    )
    return [
        f"the real job: `{job['command']}` in a subprocess, start to exit ("
        + ("cluster start, sweep, results and report" if job["report"] else "no report")
        + f"): {job['wall']:.1f} s wall, of which the sweep itself {job['sweep_seconds']:.1f} s; "
        f"{job['iterations']:,} Lloyd iterations (its initial centroids are drawn from the float "
        "rows, as the sweep does: a few iterations may differ from the batch's); CPU s: the job "
        "and its workers",
        f"ratios: {ratios}; sklearn loop (fit + held-out predict) wall / job wall = "
        f"{sk['wall'] / job['wall']:.2f}",
    ]
