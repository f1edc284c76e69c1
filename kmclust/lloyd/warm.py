"""Worker warm-up: each worker process imports the engine and loads its compiled kernels while
the driver is still preparing the job, instead of during the first passes.

A fresh worker process pays once for importing the engine and for loading numba's cached
machine code of every kernel at its first call (the assignment, the pruned passes, the exact
evaluation, the held-out pass): seconds on a small machine, spent inside the first
passes, which every run of the batch waits for. A tiny fit on made-up pixels calls them all.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import numpy as np

#: seconds to let unfinished warm-ups end when the job ends early (an error): a worker busy in one
#: while its cluster closes logs a heartbeat traceback
SETTLE_SECONDS = 10


@contextlib.contextmanager
def warming(client) -> Iterator[None]:
    """Warm ``client``'s workers (if a client) while the block runs; on leaving, let any warm-up
    still running end first."""
    futures = warm_up(client) if client is not None else []
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C: the cluster is killed at once, nothing to wait for
        interrupted = True
        raise
    finally:
        if futures and not interrupted:
            from distributed import wait

            with contextlib.suppress(Exception):  # a lost worker, a closed client: nothing to wait
                wait(futures, timeout=SETTLE_SECONDS)


def warm_up(client) -> list:
    """Submit one warm-up task per worker of ``client``; returns their futures (hold them until the
    work they precede has started; their results do not matter)."""
    token = uuid.uuid4().hex
    return [
        client.submit(_warm, key=f"kmclust-warm-{token}-{i}", workers=[w], pure=False)
        for i, w in enumerate(sorted(client.nthreads()))
    ]


def _warm() -> None:
    """A tiny batch of uint8 fits in this process (pruned passes, labels, exact J, a prediction):
    the kernels the sweep's passes call, loaded or compiled once."""
    import dask

    from kmclust.lloyd import driver

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, 64), dtype=np.uint8)
    inits = [x[:3] / 255.0, x[10:30] / 255.0]
    # in this process only: inside a task, dask would otherwise reach the cluster from here
    with dask.config.set(scheduler="threads"):
        fits = driver.lloyd(
            x,
            inits,
            scale=1 / 255,
            tol=0,
            max_iter=4,
            return_labels=True,
            persist=False,
            executor="pool",
        )
        driver.predict(x, [f.centroids for f in fits], scale=1 / 255, errors=False, executor="pool")
