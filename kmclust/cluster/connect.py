"""``connect()``: a profile name or a scheduler address → a connected ``distributed.Client``.

The one entry point of kmclust.cluster: it picks the profile or address,
builds or reaches the scheduler, logs a one-line description, and closes what
it built on exit — at once and quietly on Ctrl-C.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import format_bytes

from kmclust.cluster.address import client_for_address, is_address
from kmclust.cluster.build import (
    build_cluster,
    client_for_cluster,
    local_config,
    wait_for_first_worker,
)
from kmclust.cluster.interrupt import close_quietly, interrupt_handling, stop_fast
from kmclust.cluster.profiles import (
    find_config,
    is_timeout,
    load_profiles,
    pick_profile,
    profile_for_address,
)
from kmclust.errors import ConfigError

if TYPE_CHECKING:  # distributed is imported lazily: it is heavy and not needed to validate
    from distributed import Client

log = logging.getLogger(__name__)


@contextmanager
def connect(
    scheduler: str = "local", config_path: str | Path | None = None, *, timeout: float = 10
) -> Iterator[Client]:
    """Yield a ``distributed.Client`` for a profile name or a scheduler address.

    A profile builds its cluster, and both client and cluster are closed on
    exit (also on error). An address connects to a running scheduler, which is
    left running. ``timeout`` bounds the wait for the scheduler and, for a
    cluster built here, for its first worker (a profile's ``connect_timeout``
    overrides it). Unreachable → SchedulerError; bad config → ConfigError. On
    Ctrl-C a built cluster is stopped at once and quietly (``stop_fast``).
    """
    if not is_timeout(timeout):
        raise ConfigError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    path = find_config(config_path)
    profiles = load_profiles(path) if path is not None else {}
    client = cluster = None
    with ExitStack() as stack:
        stack.enter_context(interrupt_handling(lambda: cluster))
        try:
            if is_address(scheduler):
                spec = profile_for_address(profiles, scheduler)
                client = client_for_address(scheduler, spec, timeout)
            else:
                name, spec = pick_profile(profiles, scheduler, path)
                if "address" in spec:
                    client = client_for_address(spec["address"], spec, timeout, name)
                else:
                    if spec["class"] == "LocalCluster":
                        stack.enter_context(dask.config.set(local_config()))
                    cluster = build_cluster(name, spec)
                    stack.callback(close_quietly, cluster, "cluster")
                    client = client_for_cluster(name, spec, cluster, timeout)
            stack.callback(close_quietly, client, "client")
            if cluster is not None:
                wait_for_first_worker(name, spec, client, timeout)
            log.info("Dask dashboard: %s", _dashboard(client))
            log.info("%s", describe(client))
            yield client
        except (KeyboardInterrupt, SystemExit):
            stop_fast(client, cluster)  # the stack's graceful closes then find nothing to do
            raise


def describe(client: Client) -> str:
    """One line: scheduler address, workers, threads, memory and dashboard link."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # distributed before 2025 lists all workers without the argument
        info = client.scheduler_info()
    workers = info.get("workers", {}).values()
    threads = sum(w.get("nthreads", 0) for w in workers)
    memory = sum(w.get("memory_limit") or 0 for w in workers)
    n = len(workers)
    return (
        f"scheduler {info.get('address', client.scheduler.address)}: "
        f"{n} worker{'' if n == 1 else 's'}, {threads} threads, {format_bytes(memory)} memory, "
        f"dashboard {_dashboard(client)}"
    )


def _dashboard(client: Any) -> str:
    """The dashboard link, or a note when the scheduler runs without one."""
    try:
        return client.dashboard_link or "(none)"
    except (KeyError, AttributeError):
        return "(none)"
