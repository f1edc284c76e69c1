"""Ctrl-C while a cluster is in use: a quiet, sure and fast stop.

Why: a terminal's Ctrl-C reaches every worker process, distributed logs each
task and comm it abandons with a traceback, and a graceful close waits for
running tasks; the job should instead stop at once with one short message.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from kmclust.cluster.messages import one_line

log = logging.getLogger(__name__)


@contextmanager
def interrupt_handling(cluster: Callable[[], Any] = lambda: None) -> Iterator[None]:
    """While a cluster is in use, make a Ctrl-C quiet and sure to stop the job.

    - The SIGINT handler silences distributed first (``_silence_distributed``)
      and freezes the worker processes of the local cluster ``cluster()``
      returns, if any (``freeze_local_workers``), then raises
      KeyboardInterrupt as Python's own does. As the stack unwinds,
      distributed cancels what the client was waiting for and aborts its
      comms, which a running worker would log with a traceback (a gather
      from it cut short); frozen, it logs nothing before ``stop_fast`` kills it.
    - Python raises KeyboardInterrupt in whatever the main thread runs when
      it handles the signal. Inside a gc callback (distributed's GC diagnosis
      runs one at every collection in a process hosting a scheduler, as with
      a LocalCluster) or a ``__del__`` it is printed as "Exception ignored"
      and lost, and the job ran on. Such a KeyboardInterrupt is caught here
      and SIGINT sent to the main thread again 10 ms later from a timer thread.

    Only in the main thread, while SIGINT has Python's default handler, on POSIX.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        or not hasattr(signal, "pthread_kill")
    ):
        yield
        return
    main = threading.main_thread().ident
    previous_hook = sys.unraisablehook

    def handler(signum: int, frame: Any) -> None:
        _silence_distributed()
        built = cluster()
        if built is not None:
            freeze_local_workers(built)
        signal.default_int_handler(signum, frame)

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            threading.Timer(0.01, signal.pthread_kill, (main, signal.SIGINT)).start()
            return
        previous_hook(unraisable)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous_hook
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _silence_distributed() -> None:
    """Silence distributed's, tornado's and asyncio's loggers for the rest of the process.

    Only after an interrupt: the process is on its way out, and distributed
    reports what it abandons (cancelled tasks, closed comms, "Task exception
    was never retrieved") as it goes and when it is garbage-collected.
    """
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def start_shielded(make: Callable[[], Any], abandon: Callable[[Any], None]) -> Any:
    """Call ``make()`` in a thread that blocks SIGINT; the threads and processes it starts
    inherit that blocked signal.

    Why: a terminal's Ctrl-C goes to the whole process group, so every worker
    process of a LocalCluster printed its own KeyboardInterrupt traceback and
    made the nanny wait 4 s before killing it. Shielded, only this process
    sees the interrupt and stops the cluster (``stop_fast``). This thread
    stays interruptible while it waits; a cluster finished after an interrupt
    is closed by the starting thread.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process groups to shield from
        return make()
    # multiprocessing starts its resource tracker with the first spawned process and then
    # unblocks SIGINT in the spawning thread; started here first, it leaves the mask alone.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def target() -> None:
        try:
            value = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
            return
        with lock:
            abandoned = box.get("abandoned", False)
            box["value"] = value
        if abandoned:
            abandon(value)

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        thread = threading.Thread(target=target, daemon=True, name="start Dask cluster")
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        thread.join()
    except BaseException:
        with lock:
            box["abandoned"] = True
            value = box.get("value")
        if value is not None:
            abandon(value)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def stop_fast(client: Any, cluster: Any) -> None:
    """After Ctrl-C: stop a cluster we built at once, with distributed silenced.

    A graceful close asks each worker to finish its running task (a nanny
    waits 4 s before killing it) and every process logs the tasks it cancels
    and the comms it loses, with tracebacks. So the worker processes of a
    local cluster are killed first (their nannies told not to restart them),
    then client and cluster close with nothing left to wait for. A scheduler
    we only connected to is left alone: we just close our client.
    """
    _silence_distributed()
    if cluster is not None:
        _kill_local_workers(cluster)
    for obj, what in ((client, "client"), (cluster, "cluster")):
        if obj is None:
            continue
        try:  # no timeout: a close cut short leaves a cluster 'closing', and a later close hangs
            obj.close()
        except Exception as exc:  # noqa: BLE001 - the interrupt is the error to report
            log.debug("closing the Dask %s after an interrupt: %s", what, one_line(exc))


def freeze_local_workers(cluster: Any) -> None:
    """SIGSTOP the worker processes of a local cluster: a frozen worker logs nothing, and a
    later SIGKILL still ends it."""
    for _, pid in _local_workers(cluster):
        _signal(pid, "SIGSTOP")


def _kill_local_workers(cluster: Any) -> None:
    """SIGKILL the worker processes of a local cluster's nannies, which must not restart them.

    All are frozen before any is killed: a worker still running while a peer
    dies logs the peer's reset connection with a traceback.
    """
    freeze_local_workers(cluster)
    for nanny, pid in _local_workers(cluster):
        nanny.close_gracefully(reason="kmclust-interrupted")  # distributed's "do not restart"
        _signal(pid, "SIGKILL")


def _local_workers(cluster: Any) -> list[tuple[Any, int]]:
    """(nanny, worker pid) of each worker process a local cluster's nannies run."""
    found = []
    for nanny in list(getattr(cluster, "workers", {}).values()):
        pid = getattr(nanny, "pid", None)
        if isinstance(pid, int) and hasattr(nanny, "close_gracefully"):
            found.append((nanny, pid))  # not an in-process Worker, nor a class we do not know
    return found


def _signal(pid: int, name: str) -> None:
    """Send a signal by name where the platform has it (SIGTERM for a missing SIGKILL)."""
    number = getattr(signal, name, signal.SIGTERM if name == "SIGKILL" else None)
    if number is not None:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, number)


def close_quietly(obj: Any, what: str) -> None:
    """Close a client or cluster; a failure to close is logged, not raised."""
    try:
        obj.close()
    except Exception as exc:  # noqa: BLE001 - cleanup must not mask the real error
        log.warning("closing the Dask %s failed: %s", what, one_line(exc))
