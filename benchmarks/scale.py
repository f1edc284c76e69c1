"""Data larger than memory: one batch streaming a large synthetic store from zarr vs in memory.

Streaming (``stream=True``) reads every chunk from the store each pass and
keeps nothing per row on the workers, so a worker's memory is bounded by
the chunks in flight; the price is reading and converting every pass and
no pruning. This measures that price as rows·runs per second against the
same batch on persisted rows, and the workers' peak memory under a limit.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import (
    SCALE,
    ClusterSpec,
    Meter,
    cluster_note,
    fashion_store,
    machine_info,
    metered,
    scheduler,
    worker_blas,
)
from benchmarks.history import Outcome, markdown_table
from kmclust.data import stores
from kmclust.lloyd.driver import lloyd
from kmclust.lloyd.init import init_centroids
from kmclust.lloyd.placement import persist_balanced

log = logging.getLogger(__name__)

#: rows the initial centroids are drawn from (the head of the store)
INIT_ROWS = 70_000
HEADERS = (
    "data",
    "rows",
    "runs",
    "s / iteration",
    "rows·runs / s",
    "useful GFLOP/s",
    "peak worker RSS",
    "wall s",
    "CPU s",
    "load",
)


@dataclass(frozen=True)
class ScaleConfig:
    store_dir: Path = Path("data")
    rows: int = 5_000_000
    k: int = 20
    seeds: int = 10
    iterations: int = 5
    chunk_rows: int = 50_000
    subset_rows: int = 500_000
    cluster: ClusterSpec = field(
        default_factory=lambda: ClusterSpec(schedulers=("local",), memory_limit="4GiB")
    )


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Samples every worker's RSS in a background thread; ``peak`` is the largest seen (bytes)."""

    def __init__(self, client, every: float = 0.25):
        self.client, self.every, self.peak = client, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a busy or restarting worker skips one sample
                self.peak = max(self.peak, *self.client.run(_rss).values())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def synthetic_store(cfg: ScaleConfig) -> Path:
    """``store_dir``/synthetic-<rows>.zarr made from Fashion-MNIST, reused when it matches."""
    parent = fashion_store(cfg.store_dir)
    path = Path(cfg.store_dir) / f"synthetic-{cfg.rows}.zarr"
    if (path / "zarr.json").is_file():
        attrs = stores.open_images(path).attrs
        if attrs.get("rows") == cfg.rows and attrs.get("chunk_rows") == cfg.chunk_rows:
            return path
        log.info("%s has another shape; restaging it", path)
    log.info("staging %s (%d rows, %d-row chunks)", path, cfg.rows, cfg.chunk_rows)
    return stores.stage(
        "synthetic",
        path,
        from_dir=parent,
        rows=cfg.rows,
        seed=0,
        chunk_rows=cfg.chunk_rows,
        force=path.exists(),
    )


def timed_passes(
    x, inits: list[np.ndarray], iterations: int, persist: bool
) -> tuple[Meter, list[float]]:
    """Meter and per-pass seconds of one engine batch (``progress`` marks the end of each pass).

    Not persisted means streamed: no per-row state stays on the workers.
    """
    marks = [time.perf_counter()]
    with metered() as meter:
        lloyd(
            x,
            inits,
            tol=0.0,
            max_iter=iterations,
            scale=SCALE,
            persist=persist,
            stream=not persist,
            progress=lambda done, total: marks.append(time.perf_counter()),
        )
    return meter, list(np.diff(marks))


def run_scale(cfg: ScaleConfig) -> Outcome:
    """One batch of k × seeds runs: streaming from zarr under a memory limit vs persisted."""
    machine = machine_info()
    path = synthetic_store(cfg)
    x = stores.flat_images(stores.open_images(path))
    n, d = x.shape
    head = np.asarray(x[: min(n, INIT_ROWS)].compute())
    inits = [init_centroids(head, cfg.k, "data", s) * SCALE for s in range(cfg.seeds)]
    sub = min(cfg.subset_rows, n)
    figures: dict = {"rows": n, "runs": len(inits), "subset_rows": sub}
    rows = []
    with scheduler("local", cfg.cluster) as client:
        worker_blas(client, machine)
        for label, persist, nrows in (
            ("streamed from zarr", False, n),
            ("persisted in memory", True, sub),
        ):
            data = persist_balanced(x[:sub]) if persist else x
            with PeakMemory(client) as mem:
                meter, passes = timed_passes(data, inits, cfg.iterations, persist)
            del data
            sec = statistics.median(passes[: cfg.iterations])
            rate = nrows * len(inits) / sec
            figures[label] = {
                "wall": meter.wall,
                "cpu": meter.cpu,
                "passes": passes,
                "s_per_iteration": sec,
                "rows_runs_per_s": rate,
                "peak_worker_rss": mem.peak,
            }
            gflops = 2.0 * nrows * d * cfg.k * len(inits) / sec / 1e9
            rss = f"{mem.peak / 2**30:.2f} GiB"
            rows.append(
                [label, nrows, len(inits), sec, rate, gflops, rss]
                + [meter.wall, meter.cpu, meter.load_text()]
            )
    ratio = (
        figures["streamed from zarr"]["rows_runs_per_s"]
        / figures["persisted in memory"]["rows_runs_per_s"]
    )
    figures["ratio"] = ratio
    notes = [
        f"synthetic store {path} ({n:,} rows made from Fashion-MNIST by 1–2 pixel shifts, "
        f"{cfg.chunk_rows:,}-row chunks); {len(inits)} runs = k {cfg.k} × {cfg.seeds} seeds "
        f"(data init) in one batch, tol=0, {cfg.iterations} iterations; "
        "s / iteration = median pass time",
        f"streaming / in-memory throughput: {ratio:.2f}",
        *cluster_note(cfg.cluster, machine),
        "peak worker RSS: largest sample over workers, every 0.25 s",
    ]
    title = f"scale — synthetic {n:,} rows, {len(inits)} runs"
    return Outcome("scale", title, figures, markdown_table(HEADERS, rows), notes, machine)
