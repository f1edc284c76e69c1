"""Building a cluster from a profile: check the class and kwargs, start it, await a worker.

Why: a profile names any importable class with any kwargs, so it is checked
before anything runs (only Dask cluster classes, only kwargs they take), local
clusters get safe defaults, and a cluster whose workers never come is an error
rather than a job waiting forever.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import dask.config

from kmclust.cluster.address import ENCRYPTED, security_for
from kmclust.cluster.interrupt import close_quietly, start_shielded, stop_fast
from kmclust.cluster.messages import bad_kwarg, one_line, reason
from kmclust.cluster.profiles import check_local_kwargs
from kmclust.errors import ConfigError, SchedulerError

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

#: distributed's own default for its worker processes' MALLOC_TRIM_THRESHOLD_ (distributed.yaml).
DISTRIBUTED_TRIM = 65536
_TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def local_config() -> dict[str, Any]:
    """Dask config for the life of a LocalCluster of this machine's worker processes.

    - Memory pause off: a worker paused at its memory limit waits forever for
      memory that never frees (the job would hang); unpaused, its nanny
      restarts it and the task fails as KilledWorker. Nannies read the config
      again at every restart, so it stays set for the cluster's whole life.
    - glibc's adaptive malloc thresholds, unless the user set
      MALLOC_TRIM_THRESHOLD_ (environment or dask config): distributed's
      default of 65536 also pins the mmap threshold at 128 KiB, so every
      per-pass array of a chunk task is a fresh mmap paying page faults; the
      bench grid on a LocalCluster runs measurably faster without it (BENCHMARKS.md).

    (distributed is imported first: set() on a missing section would delete it all on exit.)
    """
    import distributed  # noqa: F401

    cfg: dict[str, Any] = {"distributed.worker.memory.pause": False}
    user_set = "MALLOC_TRIM_THRESHOLD_" in os.environ
    if dask.config.get(_TRIM_KEY, None) == DISTRIBUTED_TRIM and not user_set:
        cfg[_TRIM_KEY] = None
    return cfg


def build_cluster(name: str, spec: Mapping) -> Any:
    """Import the profile's class and build it from kwargs; errors name the profile."""
    try:
        module = importlib.import_module(spec["module"])
    except ImportError as exc:
        raise ConfigError(
            f"profile {name!r}: cannot import module {spec['module']!r} "
            f"({one_line(exc)}); is the package installed?"
        ) from exc
    cls = getattr(module, spec["class"], None)
    if not callable(cls):
        raise ConfigError(
            f"profile {name!r}: module {spec['module']!r} has no class {spec['class']!r}"
        )
    if not _is_cluster_class(cls):
        raise ConfigError(
            f"profile {name!r}: {spec['module']}.{spec['class']} is not a Dask "
            "cluster class (a subclass of distributed.deploy.Cluster, such as "
            "LocalCluster, dask_jobqueue.SLURMCluster or "
            "dask_kubernetes.operator.KubeCluster)"
        )
    kwargs = dict(spec["kwargs"])
    security = security_for(name, spec)
    if security is not None:
        if security.require_encryption and not security.tls_ca_file:
            raise ConfigError(
                f"profile {name!r} requires encryption but names no TLS certificates "
                "(give security: {temporary: true} or tls_* files, or set "
                "distributed.comm.tls.* in dask config)"
            )
        kwargs.setdefault("security", security)
    protocol = str(kwargs.get("protocol") or "").split("://")[0]
    if spec.get("require_encryption") and protocol and protocol not in ENCRYPTED:
        raise ConfigError(
            f"profile {name!r} requires encryption but sets protocol "
            f"{kwargs['protocol']!r}; use tls://"
        )
    if spec["class"] == "LocalCluster":
        _local_defaults(name, kwargs)
        check_local_kwargs(name, kwargs, bool(spec.get("adapt")))
    _check_signature(name, cls, kwargs)
    log.info("starting %s.%s for profile %r", spec["module"], spec["class"], name)
    try:
        cluster = start_shielded(lambda: cls(**kwargs), lambda c: stop_fast(None, c))
    except Exception as exc:  # noqa: BLE001 - re-raised as one readable error
        bad = bad_kwarg(exc)
        if bad is not None:
            raise ConfigError(
                f"profile {name!r}: {spec['class']} does not accept the "
                f"keyword argument {bad!r} (check kwargs in cluster.yaml)"
            ) from exc
        if isinstance(exc, (TypeError, ValueError)):
            raise ConfigError(
                f"profile {name!r}: bad kwargs for {spec['class']}: {one_line(exc)}"
            ) from exc
        raise SchedulerError(
            f"profile {name!r}: could not start {spec['class']}: {one_line(exc)}{reason(exc)}"
        ) from exc
    if not isinstance(getattr(cluster, "scheduler_address", None), str):
        close_quietly(cluster, "cluster")
        raise ConfigError(
            f"profile {name!r}: {spec['module']}.{spec['class']} returned "
            f"{type(cluster).__name__}, not a Dask cluster with a scheduler_address"
        )
    try:
        _check_encrypted(name, spec, security, cluster)
        if spec.get("adapt"):
            try:
                cluster.adapt(**spec["adapt"])
            except TypeError as exc:
                raise ConfigError(f"profile {name!r}: bad adapt settings: {one_line(exc)}") from exc
    except BaseException:
        close_quietly(cluster, "cluster")
        raise
    return cluster


def _is_cluster_class(obj: Any) -> bool:
    """Whether a profile's ``module``/``class`` names something that builds a Dask cluster.

    Checked before calling it, so a profile naming ``os.system`` or ``builtins.print`` runs
    nothing. Accepted: subclasses of ``distributed.deploy.Cluster`` (LocalCluster, SpecCluster,
    dask-jobqueue, dask-kubernetes, dask-cloudprovider, coiled); classes shaped like one
    (``scale``, ``close`` and ``get_client`` methods: dask-gateway's GatewayCluster); and
    distributed's own factory functions in ``distributed.deploy`` (SSHCluster).
    """
    from distributed.deploy import Cluster

    if inspect.isclass(obj):
        if issubclass(obj, Cluster):
            return True
        return all(callable(getattr(obj, m, None)) for m in ("scale", "close", "get_client"))
    return inspect.isfunction(obj) and obj.__module__.startswith("distributed.deploy.")


def _local_defaults(name: str, kwargs: dict) -> None:
    """Bind a LocalCluster and its dashboard to 127.0.0.1 unless set explicitly."""
    in_process = kwargs.get("processes") is False and "protocol" not in kwargs
    if not in_process:  # in-process clusters talk over inproc://, no socket to bind
        kwargs.setdefault("host", "127.0.0.1")
    kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    host = str(kwargs.get("host") or "127.0.0.1").split("://")[-1]
    dash = str(kwargs.get("dashboard_address") or "127.0.0.1").rsplit(":", 1)[0] or host
    for what, value in (("host", host), ("dashboard_address", dash)):
        if value not in _LOOPBACK:
            log.warning(
                "profile %r binds %s to %r, not 127.0.0.1: reachable from the network",
                name,
                what,
                value,
            )


def _check_signature(name: str, cls: Any, kwargs: Mapping) -> None:
    """Reject kwargs the class cannot take before starting any process."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # builtins / C classes: let the call decide
        return
    try:
        sig.bind_partial(**kwargs)
    except TypeError as exc:
        bad = bad_kwarg(exc)
        what = f"the keyword argument {bad!r}" if bad else f"these kwargs ({one_line(exc)})"
        raise ConfigError(
            f"profile {name!r}: {cls.__name__} does not accept {what} "
            "(check kwargs in cluster.yaml)"
        ) from exc


def _check_encrypted(name: str, spec: Mapping, security: Any, cluster: Any) -> None:
    """A profile requiring encryption must have produced a tls:// scheduler."""
    if spec.get("require_encryption") or (security is not None and security.require_encryption):
        address = str(cluster.scheduler_address)
        if address.split("://", 1)[0] not in ENCRYPTED:
            raise ConfigError(
                f"profile {name!r} requires encryption but its scheduler "
                f"listens on the unencrypted {address}"
            )


def client_for_cluster(name: str, spec: Mapping, cluster: Any, timeout: float) -> Any:
    """A Client for a cluster we built (the cluster's security is reused)."""
    from distributed import Client

    timeout = float(spec.get("connect_timeout", timeout))
    try:
        return Client(cluster, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(
            f"profile {name!r}: could not reach Dask scheduler at "
            f"{getattr(cluster, 'scheduler_address', '?')} within {timeout:g}s"
            f"{reason(exc)}"
        ) from exc


def wait_for_first_worker(name: str, spec: Mapping, client: Any, timeout: float) -> None:
    """Wait up to the timeout for one worker of a cluster we built; SchedulerError if none.

    Without this, a cluster whose workers never come (n_workers: 0, a batch
    job that cannot start, a bad image) leaves the job waiting forever. Not
    for an ``adapt`` profile whose minimum is 0: it starts workers only once
    there is work, so none is expected yet.
    """
    adapt = spec.get("adapt")
    if adapt is not None and not any(adapt.get(key) for key in _ADAPT_MINIMA):
        log.info("profile %r adapts from 0 workers: not waiting for one", name)
        return
    timeout = float(spec.get("connect_timeout", timeout))
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(
            f"profile {name!r}: no worker joined the Dask scheduler at "
            f"{client.scheduler.address} within {timeout:g}s (check the workers' logs; "
            "raise the timeout, or connect_timeout in cluster.yaml, if they start slowly)"
        ) from exc


#: adapt() keywords that ask for workers from the start (dask, dask-jobqueue).
_ADAPT_MINIMA = ("minimum", "minimum_jobs", "minimum_cores", "minimum_memory")
