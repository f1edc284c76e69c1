"""Batches of work on a local dask scheduler, one pool for many passes, results in order.

The images source decodes files in batches with it: the results come back in
the order of the batches whatever the scheduler, so what is made of them does
not depend on the parallelism. Threads suit work that releases the GIL;
processes (spawned, clean interpreters) suit Python-heavy work such as
Pillow's per-file overhead on small images.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from kmclust.errors import ConfigError

PARALLEL = ("threads", "processes")  # the first is the default (measured faster: see README)
BATCH = 256  # items per task at most


class Runner:
    """Runs batch functions on a dask scheduler over one pool kept for the whole staging."""

    def __init__(self, workers: int | None, parallel: str):
        if parallel not in PARALLEL:
            raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
        self.workers = workers or os.cpu_count() or 1
        self.scheduler = "sync" if self.workers == 1 else parallel
        self.pool = None

    def __enter__(self) -> Runner:
        if self.scheduler == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a clean interpreter per worker (no fork of a process running threads)
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        elif self.scheduler == "threads":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def batches(self, n: int) -> list[slice]:
        """Slices of 0…n−1, at least two per worker when n allows, at most BATCH long."""
        size = max(1, min(BATCH, math.ceil(n / (2 * self.workers))))
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def map(self, fn: Callable, args: list[tuple], done: Callable[[int], None]) -> list:
        """fn(*a) for each a, results in order; done(i) after each task (in this thread)."""
        import dask
        from dask.callbacks import Callback

        tasks = [dask.delayed(fn, pure=False)(*a) for a in args]
        keys = {t.key: i for i, t in enumerate(tasks)}
        run = {"scheduler": self.scheduler, "pool": self.pool, "num_workers": self.workers}
        with Callback(posttask=lambda key, *_: done(keys[key]) if key in keys else None):
            return list(dask.compute(*tasks, **run))


def reporter(report: Callable[[int, int, str], None], total: int) -> Callable[[int], None]:
    """Add n done; report each tenth of the total, after 10 s without one, and at the end (a
    log line a report when stderr is not a terminal: about ten a pass)."""
    state = {"done": 0, "shown": 0, "at": time.monotonic()}

    def add(n: int) -> None:
        state["done"] += n
        now, done = time.monotonic(), state["done"]
        if done == total or done - state["shown"] >= total / 10 or now - state["at"] >= 10:
            state["shown"], state["at"] = done, now
            report(done, total, "")

    return add
