"""Measure which `local` cluster shape runs the Lloyd GEMM fastest on this machine.

Why: on a small machine a worker's BLAS threads × worker threads must not
exceed the cores, or GEMMs slow down sharply. This script times the engine's
hot spot — float32 (rows × 784) @ (784 × k) per chunk plus an argmin, over
chunks cached on the workers — for a few cluster shapes, so the choice written
in cluster.yaml is a measurement, not a guess. It also prints the BLAS thread
count workers start with (distributed's `nanny.pre-spawn-environ` sets
OMP/OPENBLAS/MKL_NUM_THREADS=1 in spawned workers).

Usage: python jobs/calibrate_local.py [--chunks 7] [--rows 10000] [--k 256] [--repeats 5]
For a benchmark, unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in the command if set.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from kmclust.cli import run_main, setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """One cluster shape to time: LocalCluster sizing and BLAS threads per task."""

    name: str
    n_workers: int
    threads_per_worker: int
    processes: bool
    blas_threads: int | None  # threadpoolctl limit inside each task; None = leave as is


SHAPES = [
    Shape("2 workers x 1 thread, BLAS 1 (processes)", 2, 1, True, None),
    Shape("1 worker x 2 threads, BLAS 1 (process)", 1, 2, True, None),
    Shape("1 worker x 1 thread, BLAS 2 (process)", 1, 1, True, 2),
    Shape("1 worker x 2 threads, BLAS 2 (oversubscribed)", 1, 2, True, 2),
    Shape("2 workers x 1 thread, BLAS 2 (oversubscribed)", 2, 1, True, 2),
    Shape("no processes: 1 x 2 threads, BLAS 1", 1, 2, False, 1),
]


def make_chunk(seed: int, rows: int, dim: int) -> np.ndarray:
    """A float32 chunk in [0, 1], made on the worker so no data crosses the wire."""
    return np.random.default_rng(seed).random((rows, dim), dtype=np.float32)


def chunk_step(x: np.ndarray, c: np.ndarray, blas_threads: int | None) -> float:
    """Lloyd's hot spot for one chunk: distances by one GEMM, then argmin."""
    from threadpoolctl import threadpool_limits

    if blas_threads is None:
        prod = x @ c.T
    else:
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            prod = x @ c.T
    d = (c * c).sum(axis=1)[None, :] - 2.0 * prod
    return float(np.argmin(d, axis=1).sum())


def blas_info() -> list[tuple[str, int, str]]:
    """BLAS libraries, thread counts and kernels as seen by the calling process."""
    from threadpoolctl import threadpool_info

    return [
        (i["internal_api"], i["num_threads"], i.get("architecture", "?"))
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]


def time_shape(shape: Shape, chunks: int, rows: int, k: int, repeats: int) -> float:
    """Median seconds for one pass over all chunks with the given cluster shape."""
    from distributed import Client, LocalCluster, wait

    # In-process clusters use inproc:// comms (no socket); only processes bind 127.0.0.1.
    where = {"host": "127.0.0.1"} if shape.processes else {}
    with (
        LocalCluster(
            n_workers=shape.n_workers,
            threads_per_worker=shape.threads_per_worker,
            processes=shape.processes,
            dashboard_address="127.0.0.1:0",
            **where,
        ) as cluster,
        Client(cluster) as client,
    ):
        info = client.run(blas_info) if shape.processes else {"in-process": blas_info()}
        log.info("%s: worker BLAS at start %s", shape.name, info)
        data = [client.submit(make_chunk, i, rows, 784, pure=False) for i in range(chunks)]
        wait(data)
        cent = client.scatter(
            np.random.default_rng(0).random((k, 784), dtype=np.float32), broadcast=True
        )
        times = []
        for _ in range(repeats + 1):  # first pass warms up
            t0 = time.perf_counter()
            client.gather(
                [client.submit(chunk_step, x, cent, shape.blas_threads, pure=False) for x in data]
            )
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    """Time every shape and print a table (GFLOP/s of the GEMM part)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=7)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    setup_logging()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    log.info("driver BLAS: %s", blas_info())
    flops = 2.0 * a.chunks * a.rows * 784 * a.k
    x, c = make_chunk(0, a.rows, 784), make_chunk(1, a.k, 784)
    for threads in (1, 2):
        chunk_step(x, c, threads)
        t0 = time.perf_counter()
        for _ in range(a.chunks * a.repeats):
            chunk_step(x, c, threads)
        sec = (time.perf_counter() - t0) / a.repeats
        print(
            f"{'driver only, no dask, BLAS ' + str(threads):55s} {sec * 1e3:8.1f} ms/pass "
            f"{flops / sec / 1e9:7.1f} GFLOP/s",
            flush=True,
        )
    for shape in SHAPES:
        sec = time_shape(shape, a.chunks, a.rows, a.k, a.repeats)
        print(
            f"{shape.name:55s} {sec * 1e3:8.1f} ms/pass {flops / sec / 1e9:7.1f} GFLOP/s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
