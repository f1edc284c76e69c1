"""cluster.yaml profiles and scheduler addresses → a connected ``distributed.Client``.

Why: the job code must run unchanged on a laptop (``--scheduler local``), on a
running scheduler (``--scheduler tcp://host:8786`` or ``tls://…``) and on a
cluster manager (SLURM, Kubernetes) described by a named profile. Profiles use
the dask-ctl spec style — ``module``, ``class``, ``kwargs`` of a Dask cluster
class — so switching cluster kind changes only the YAML. A profile may instead
give an ``address`` of a running scheduler with the TLS settings to reach it.

Local clusters and their dashboards bind to 127.0.0.1 unless a profile says
otherwise explicitly (which is logged as a warning).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.config
import yaml
from dask.utils import format_bytes

from kmclust.errors import ConfigError, SchedulerError

if TYPE_CHECKING:  # distributed is imported lazily: it is heavy and not needed to validate
    from distributed import Client

log = logging.getLogger(__name__)

CONFIG_NAME = "cluster.yaml"

# Used for `--scheduler local` when no cluster.yaml (or no `local` profile) is found.
# 2 workers x 1 thread: measured best on a 2-core machine (see cluster.yaml).
DEFAULT_LOCAL: dict[str, Any] = {
    "module": "distributed",
    "class": "LocalCluster",
    "kwargs": {
        "n_workers": 2,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "memory_limit": "auto",
    },
}

_ADDRESS = re.compile(
    r"^(?P<scheme>tcp|tls|ws|wss)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(?::\d{1,5})?/?$"
)
_ENCRYPTED = {"tls", "wss"}
_REQUIRED = {"module", "class", "kwargs"}
_OPTIONAL = {"security", "require_encryption", "connect_timeout", "adapt"}
_ADDRESS_KEYS = {"address", "security", "require_encryption", "connect_timeout"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_BAD_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


def load_profiles(path: str | Path) -> dict[str, dict]:
    """Read and validate the ``profiles`` of a cluster.yaml; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cluster config {path} is not valid YAML: {_one_line(exc)}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("profiles"), Mapping):
        raise ConfigError(f"cluster config {path} must be a mapping with a 'profiles' mapping")
    profiles: dict[str, dict] = {}
    for name, spec in doc["profiles"].items():
        profiles[str(name)] = _validate_profile(path, str(name), spec)
    return profiles


def _validate_profile(path: Path, name: str, spec: Any) -> dict:
    """Check one profile's keys and value types; return it as a plain dict."""
    where = f"cluster config {path}, profile {name!r}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    spec = dict(spec)
    if "address" in spec:
        allowed, missing = _ADDRESS_KEYS, set()
        if not isinstance(spec["address"], str) or not _ADDRESS.match(spec["address"]):
            raise ConfigError(f"{where}: address must look like tcp://HOST:PORT or tls://HOST:PORT")
    else:
        allowed, missing = _REQUIRED | _OPTIONAL, _REQUIRED - set(spec)
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(sorted(missing))} (needs module, class, "
                          "kwargs — or an address)")
    unknown = set(spec) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("module", "class"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            raise ConfigError(f"{where}: {key} must be a non-empty string")
    for key in ("kwargs", "security", "adapt"):
        if key in spec and not isinstance(spec[key] or {}, Mapping):
            raise ConfigError(f"{where}: {key} must be a mapping")
        if key in spec:
            spec[key] = dict(spec[key] or {})
    if not isinstance(spec.get("require_encryption", False), bool):
        raise ConfigError(f"{where}: require_encryption must be true or false")
    timeout = spec.get("connect_timeout", 1)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}: connect_timeout must be a positive number of seconds")
    return spec


def find_config(config_path: str | Path | None = None) -> Path | None:
    """The cluster.yaml to use: the given one, ./cluster.yaml, or the one shipped with the repo."""
    if config_path is not None:
        return Path(config_path)
    import kmclust

    for candidate in (Path.cwd() / CONFIG_NAME, Path(kmclust.__file__).parents[1] / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def is_address(scheduler: str) -> bool:
    """True for a scheduler address such as ``tcp://127.0.0.1:8786`` or ``tls://host:8786``."""
    return bool(_ADDRESS.match(scheduler))


@contextmanager
def connect(
    scheduler: str = "local", config_path: str | Path | None = None, *, timeout: float = 10
) -> Iterator[Client]:
    """Yield a ``distributed.Client`` for a profile name or a scheduler address.

    A profile builds its cluster, and both client and cluster are closed on
    exit (also on error). An address connects to a running scheduler, which is
    left running. ``timeout`` bounds the wait for the scheduler (a profile's
    ``connect_timeout`` overrides it). Unreachable → SchedulerError; bad
    config → ConfigError.
    """
    path = find_config(config_path)
    profiles = load_profiles(path) if path is not None else {}
    with ExitStack() as stack:
        if is_address(scheduler):
            spec = _profile_for_address(profiles, scheduler)
            client = _client_for_address(scheduler, spec, timeout)
        else:
            name, spec = _pick_profile(profiles, scheduler, path)
            if "address" in spec:
                client = _client_for_address(spec["address"], spec, timeout, name)
            else:
                if spec["class"] == "LocalCluster":
                    stack.enter_context(dask.config.set(local_config()))
                cluster = _build_cluster(name, spec)
                stack.callback(_close_quietly, cluster, "cluster")
                client = _client_for_cluster(name, spec, cluster, timeout)
        stack.callback(_close_quietly, client, "client")
        log.info("Dask dashboard: %s", _dashboard(client))
        log.info("%s", describe(client))
        yield client


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
      per-pass array of a chunk task is a fresh mmap paying page faults. The
      96-run bench grid took 65 s on a LocalCluster with it and 53 s without.

    (distributed is imported first: set() on a missing section would delete it all on exit.)
    """
    import distributed  # noqa: F401

    cfg: dict[str, Any] = {"distributed.worker.memory.pause": False}
    if dask.config.get(_TRIM_KEY, None) == DISTRIBUTED_TRIM and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        cfg[_TRIM_KEY] = None
    return cfg


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
    return (f"scheduler {info.get('address', client.scheduler.address)}: "
            f"{n} worker{'' if n == 1 else 's'}, {threads} threads, {format_bytes(memory)} memory, "
            f"dashboard {_dashboard(client)}")


def _dashboard(client: Any) -> str:
    """The dashboard link, or a note when the scheduler runs without one."""
    try:
        return client.dashboard_link or "(none)"
    except (KeyError, AttributeError):
        return "(none)"


def _pick_profile(profiles: dict[str, dict], name: str, path: Path | None) -> tuple[str, dict]:
    """The named profile; `local` falls back to the built-in default spec."""
    if name in profiles:
        return name, profiles[name]
    if name == "local":
        log.info("no 'local' profile in %s; using the built-in LocalCluster on 127.0.0.1",
                 path or "(no cluster.yaml found)")
        return name, DEFAULT_LOCAL
    known = sorted(set(profiles) | {"local"})
    raise ConfigError(
        f"unknown scheduler {name!r}: not a tcp:// or tls:// address and not a profile in "
        f"{path or '(no cluster.yaml found)'}; known profiles: {', '.join(known)}")


def _profile_for_address(profiles: dict[str, dict], address: str) -> dict:
    """An address profile for exactly this address (for its TLS settings), else {}."""
    for spec in profiles.values():
        if spec.get("address", "").rstrip("/") == address.rstrip("/"):
            return spec
    return {}


def _security(name: str, spec: Mapping) -> Any:
    """The profile's ``distributed.Security``, or None to let distributed use dask config."""
    from distributed import Security

    options = dict(spec.get("security") or {})
    if "require_encryption" in spec:
        options.setdefault("require_encryption", spec["require_encryption"])
    if not options:
        return None
    for key, value in options.items():  # PEM paths may start with ~; PEM text is left alone
        if key.startswith("tls_") and isinstance(value, str) and "-----BEGIN" not in value:
            options[key] = os.path.expanduser(value)
    try:
        if options.pop("temporary", False):  # self-signed, in memory; always requires TLS
            required = options.pop("require_encryption", True)
            security = Security.temporary(**options)
            security.require_encryption = required
            return security
        return Security(**options)
    except (TypeError, ValueError, OSError, ImportError) as exc:
        raise ConfigError(f"profile {name!r}: bad security settings: {_one_line(exc)}") from exc


def _requires_encryption(security: Any) -> bool:
    """Whether the profile's security, or dask config, demands TLS."""
    if security is not None:
        return bool(security.require_encryption)
    return bool(dask.config.get("distributed.comm.require-encryption", False))


def _client_for_address(address: str, spec: Mapping, timeout: float, name: str | None = None) -> Any:
    """Connect to a running scheduler; refuse plain comms when encryption is required."""
    from distributed import Client

    label = f"profile {name!r}" if name else f"scheduler {address}"
    security = _security(name or address, spec)
    scheme = address.split("://", 1)[0]
    if _requires_encryption(security) and scheme not in _ENCRYPTED:
        raise ConfigError(f"{label} requires encryption; refusing the unencrypted address "
                          f"{address} (use tls://)")
    if scheme in _ENCRYPTED and security is None and not _tls_configured():
        raise ConfigError(
            f"{label}: {scheme}:// needs TLS certificates; set distributed.comm.tls.ca-file, "
            ".client.cert and .client.key in dask config, or give a cluster.yaml profile "
            f"with address: {address} and security: {{tls_ca_file: ..., ...}}")
    timeout = float(spec.get("connect_timeout", timeout))
    try:
        return _bounded(lambda: Client(address, timeout=timeout, security=security), timeout + 5, address)
    except (OSError, TimeoutError) as exc:
        hint = ""
        if scheme == "tcp" and any(isinstance(e, (ConnectionResetError, ssl.SSLError))
                                   for e in _causes(exc)):
            hint = "; if the scheduler uses TLS, connect with tls:// and certificates"
        raise SchedulerError(
            f"could not reach Dask scheduler at {address} within {timeout:g}s"
            f"{_reason(exc)}{hint}") from exc


def _bounded(make: Any, seconds: float, address: str) -> Any:
    """Run ``make()`` in a daemon thread and give up after ``seconds``.

    distributed bounds the TCP connect but not the handshake after it
    (dask/distributed#7698), so a port that accepts and never answers would
    hang the job; the abandoned thread dies with the process.
    """
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"connect {address}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise SchedulerError(f"could not reach Dask scheduler at {address} within {seconds:g}s "
                             "(it accepted the connection but did not answer: not a Dask scheduler, or hung)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tls_configured() -> bool:
    """Whether dask config names TLS certificates or a security loader for a client."""
    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                or dask.config.get("distributed.client.security-loader", None))


def _build_cluster(name: str, spec: Mapping) -> Any:
    """Import the profile's class and build it from kwargs; errors name the profile."""
    try:
        module = importlib.import_module(spec["module"])
    except ImportError as exc:
        raise ConfigError(f"profile {name!r}: cannot import module {spec['module']!r} "
                          f"({_one_line(exc)}); is the package installed?") from exc
    cls = getattr(module, spec["class"], None)
    if not callable(cls):
        raise ConfigError(f"profile {name!r}: module {spec['module']!r} has no class "
                          f"{spec['class']!r}")
    kwargs = dict(spec["kwargs"])
    security = _security(name, spec)
    if security is not None:
        if security.require_encryption and not security.tls_ca_file:
            raise ConfigError(
                f"profile {name!r} requires encryption but names no TLS certificates "
                "(give security: {temporary: true} or tls_* files, or set "
                "distributed.comm.tls.* in dask config)")
        kwargs.setdefault("security", security)
    protocol = str(kwargs.get("protocol") or "").split("://")[0]
    if spec.get("require_encryption") and protocol and protocol not in _ENCRYPTED:
        raise ConfigError(f"profile {name!r} requires encryption but sets protocol "
                          f"{kwargs['protocol']!r}; use tls://")
    if spec["class"] == "LocalCluster":
        _local_defaults(name, kwargs)
    _check_signature(name, cls, kwargs)
    log.info("starting %s.%s for profile %r", spec["module"], spec["class"], name)
    try:
        cluster = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised as one readable error
        bad = _bad_kwarg(exc)
        if bad is not None:
            raise ConfigError(f"profile {name!r}: {spec['class']} does not accept the "
                              f"keyword argument {bad!r} (check kwargs in cluster.yaml)") from exc
        if isinstance(exc, (TypeError, ValueError)):
            raise ConfigError(f"profile {name!r}: bad kwargs for {spec['class']}: "
                              f"{_one_line(exc)}") from exc
        raise SchedulerError(f"profile {name!r}: could not start {spec['class']}: "
                             f"{_one_line(exc)}{_reason(exc)}") from exc
    try:
        _check_encrypted(name, spec, security, cluster)
        if spec.get("adapt"):
            try:
                cluster.adapt(**spec["adapt"])
            except TypeError as exc:
                raise ConfigError(f"profile {name!r}: bad adapt settings: {_one_line(exc)}") from exc
    except BaseException:
        _close_quietly(cluster, "cluster")
        raise
    return cluster


def _local_defaults(name: str, kwargs: dict) -> None:
    """Bind a LocalCluster and its dashboard to 127.0.0.1 unless set explicitly."""
    in_process = kwargs.get("processes") is False and "protocol" not in kwargs
    if not in_process:  # in-process clusters talk over inproc://, no socket to bind
        kwargs.setdefault("host", "127.0.0.1")
    kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    # A worker paused at its memory limit waits forever for memory that never frees (the job
    # would hang); with pausing off the nanny restarts it and the task fails as KilledWorker.
    host = str(kwargs.get("host") or "127.0.0.1").split("://")[-1]
    dash = str(kwargs.get("dashboard_address") or "127.0.0.1").rsplit(":", 1)[0] or host
    for what, value in (("host", host), ("dashboard_address", dash)):
        if value not in _LOOPBACK:
            log.warning("profile %r binds %s to %r, not 127.0.0.1: reachable from the network",
                        name, what, value)


def _check_signature(name: str, cls: Any, kwargs: Mapping) -> None:
    """Reject kwargs the class cannot take before starting any process."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # builtins / C classes: let the call decide
        return
    try:
        sig.bind_partial(**kwargs)
    except TypeError as exc:
        bad = _bad_kwarg(exc)
        what = f"the keyword argument {bad!r}" if bad else f"these kwargs ({_one_line(exc)})"
        raise ConfigError(f"profile {name!r}: {cls.__name__} does not accept {what} "
                          "(check kwargs in cluster.yaml)") from exc


def _check_encrypted(name: str, spec: Mapping, security: Any, cluster: Any) -> None:
    """A profile requiring encryption must have produced a tls:// scheduler."""
    if spec.get("require_encryption") or (security is not None and security.require_encryption):
        address = str(cluster.scheduler_address)
        if address.split("://", 1)[0] not in _ENCRYPTED:
            raise ConfigError(f"profile {name!r} requires encryption but its scheduler "
                              f"listens on the unencrypted {address}")


def _client_for_cluster(name: str, spec: Mapping, cluster: Any, timeout: float) -> Any:
    """A Client for a cluster we built (the cluster's security is reused)."""
    from distributed import Client

    timeout = float(spec.get("connect_timeout", timeout))
    try:
        return Client(cluster, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise SchedulerError(
            f"profile {name!r}: could not reach Dask scheduler at "
            f"{getattr(cluster, 'scheduler_address', '?')} within {timeout:g}s"
            f"{_reason(exc)}") from exc


def _close_quietly(obj: Any, what: str) -> None:
    """Close a client or cluster; a failure to close is logged, not raised."""
    try:
        obj.close()
    except Exception as exc:  # noqa: BLE001 - cleanup must not mask the real error
        log.warning("closing the Dask %s failed: %s", what, _one_line(exc))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its chain of causes/contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _bad_kwarg(exc: BaseException) -> str | None:
    """The unexpected keyword named by a TypeError anywhere in the chain, if any."""
    for e in _causes(exc):
        if isinstance(e, TypeError):
            m = _BAD_KWARG.search(str(e))
            if m:
                return m.group(1)
    return None


def _reason(exc: BaseException) -> str:
    """A short hint from the root cause when it says more than 'timed out'."""
    root = list(_causes(exc))[-1]
    text = _one_line(root)
    if root is exc or not text or "timed out" in text.lower():
        return ""
    return f" ({type(root).__name__}: {text})"


def _one_line(exc: BaseException) -> str:
    """An exception message squeezed onto one line."""
    return " ".join(str(exc).split())[:300]
