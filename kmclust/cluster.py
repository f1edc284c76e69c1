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
import math
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
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
#: The largest first message a Dask scheduler's greeting may announce (it is ~60 bytes).
_GREETING_MAX = 1 << 20
#: What the probe sends (shorter than the 8-byte length prefix a Dask scheduler waits for).
_PROBE = b"?\r\n\r\n"
#: First bytes of a TLS record (alert, handshake): a TLS server answering plain bytes.
_TLS_RECORDS = {0x15, 0x16}
#: Errors distributed raises while parsing a reply that is not a Dask message: it reads the
#: first 8 bytes as a frame length (an HTTP server's "HTTP/1.1" asks for 3 EiB), and a reply
#: that unpacks to no dict fails on item access.
_GARBLED = (MemoryError, ValueError, struct.error, EOFError, KeyError, TypeError, AssertionError)


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
        raise ConfigError(
            f"{where} lacks {', '.join(sorted(missing))} (needs module, class, "
            "kwargs — or an address)"
        )
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
    if "connect_timeout" in spec and not _is_timeout(spec["connect_timeout"]):
        raise ConfigError(f"{where}: connect_timeout must be a positive number of seconds")
    if any(spec.get("adapt", {}).get(key) == 0 for key in ("maximum", "maximum_jobs")):
        raise ConfigError(f"{where}: adapt with a maximum of 0 never starts a worker")
    return spec


def _is_timeout(value: Any) -> bool:
    """A usable number of seconds: finite and > 0 (not a bool, nan or inf)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


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
    left running. ``timeout`` bounds the wait for the scheduler and, for a
    cluster built here, for its first worker (a profile's ``connect_timeout``
    overrides it). Unreachable → SchedulerError; bad config → ConfigError. On
    Ctrl-C a built cluster is stopped at once and quietly (``_stop_fast``).
    """
    if not _is_timeout(timeout):
        raise ConfigError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
    path = find_config(config_path)
    profiles = load_profiles(path) if path is not None else {}
    client = cluster = None
    with ExitStack() as stack:
        stack.enter_context(_interrupt_handling())
        try:
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
            if cluster is not None:
                _wait_for_first_worker(name, spec, client, timeout)
            log.info("Dask dashboard: %s", _dashboard(client))
            log.info("%s", describe(client))
            yield client
        except (KeyboardInterrupt, SystemExit):
            _stop_fast(client, cluster)  # the stack's graceful closes then find nothing to do
            raise


@contextmanager
def _interrupt_handling() -> Iterator[None]:
    """While a cluster is in use, make a Ctrl-C quiet and sure to stop the job.

    - The SIGINT handler silences distributed first (``_silence_distributed``),
      then raises KeyboardInterrupt as Python's own does: tasks abandoned on
      the way out are reported as the stack unwinds, before ``_stop_fast``.
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
    user_set = "MALLOC_TRIM_THRESHOLD_" in os.environ
    if dask.config.get(_TRIM_KEY, None) == DISTRIBUTED_TRIM and not user_set:
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


def _pick_profile(profiles: dict[str, dict], name: str, path: Path | None) -> tuple[str, dict]:
    """The named profile; `local` falls back to the built-in default spec."""
    if name in profiles:
        return name, profiles[name]
    if name == "local":
        log.info(
            "no 'local' profile in %s; using the built-in LocalCluster on 127.0.0.1",
            path or "(no cluster.yaml found)",
        )
        return name, DEFAULT_LOCAL
    known = sorted(set(profiles) | {"local"})
    raise ConfigError(
        f"unknown scheduler {name!r}: not a tcp:// or tls:// address and not a profile in "
        f"{path or '(no cluster.yaml found)'}; known profiles: {', '.join(known)}"
    )


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


def _client_for_address(
    address: str, spec: Mapping, timeout: float, name: str | None = None
) -> Any:
    """Connect to a running scheduler; refuse plain comms when encryption is required.

    The whole attempt — probe, handshake, client start — ends within the timeout.
    """
    from distributed import Client

    label = f"profile {name!r}" if name else f"scheduler {address}"
    security = _security(name or address, spec)
    scheme = address.split("://", 1)[0]
    if _requires_encryption(security) and scheme not in _ENCRYPTED:
        raise ConfigError(
            f"{label} requires encryption; refusing the unencrypted address {address} (use tls://)"
        )
    if scheme in _ENCRYPTED and security is None and not _tls_configured():
        raise ConfigError(
            f"{label}: {scheme}:// needs TLS certificates; set distributed.comm.tls.ca-file, "
            ".client.cert and .client.key in dask config, or give a cluster.yaml profile "
            f"with address: {address} and security: {{tls_ca_file: ..., ...}}"
        )
    address = address.rstrip("/")
    host, port = _host_port(label, address)
    timeout = float(spec.get("connect_timeout", timeout))
    deadline = time.monotonic() + timeout
    where = f"Dask scheduler at {address}"

    def make() -> Any:
        _probe(host, port, scheme, deadline, where, timeout)
        left = max(deadline - time.monotonic(), 0.001)
        try:
            return Client(address, timeout=left, security=security)
        except _GARBLED as exc:  # distributed choked on a reply that is no Dask message
            raise SchedulerError(
                f"could not reach {where}: the port answers but is not a Dask "
                f"scheduler ({type(exc).__name__} reading its reply: "
                f"{_one_line(exc)[:120]})"
            ) from exc

    try:
        return _bounded(
            make,
            deadline,
            f"could not reach {where} within {timeout:g}s (it "
            "accepted the connection but did not answer: not a Dask scheduler, "
            "or hung)",
        )
    except (OSError, TimeoutError) as exc:
        hint = ""
        if scheme == "tcp" and any(
            isinstance(e, (ConnectionResetError, ssl.SSLError)) for e in _causes(exc)
        ):
            hint = "; if the scheduler uses TLS, connect with tls:// and certificates"
        raise SchedulerError(
            f"could not reach {where} within {timeout:g}s{_reason(exc)}{hint}"
        ) from exc


def _host_port(label: str, address: str) -> tuple[str, int]:
    """Host and port of a scheduler address; a missing or impossible port is a ConfigError."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as exc:
        raise ConfigError(f"{label}: {address} needs a port, e.g. {address}:8786") from exc
    if not 0 < port < 65536:
        raise ConfigError(f"{label}: port {port} of {address} is not a TCP port (1-65535)")
    return host, port


def _probe(host: str, port: int, scheme: str, deadline: float, where: str, timeout: float) -> None:
    """Fail fast and clearly before distributed's Client tries ``host:port``.

    distributed retries a refused connection until its timeout has passed
    (13 s for 10 s) and reads any reply's first 8 bytes as a frame length, so
    a web server's ``HTTP/1.1`` asks it for 3 EiB. A TCP connect shows a
    refusal at once. On plain tcp:// a Dask scheduler also greets every
    connection at once with a small framed message. We send ``?`` and a
    blank line, which an HTTP server answers with an error (or hangs up on)
    and a scheduler reads as a handshake cut short (5 of its 8-byte length
    prefix) and drops, then check the greeting's framing.
    """
    try:
        left = max(deadline - time.monotonic(), 0.001)
        sock = socket.create_connection((host, port), timeout=left)
    except TimeoutError as exc:
        raise SchedulerError(
            f"could not reach {where} within {timeout:g}s (no answer to the TCP connection)"
        ) from exc
    except OSError as exc:
        hint = (
            ": nothing listens on that port; is the scheduler running?"
            if isinstance(exc, ConnectionRefusedError)
            else ""
        )
        raise SchedulerError(
            f"could not reach {where} within {timeout:g}s"
            f" ({type(exc).__name__}: {_one_line(exc)}{hint})"
        ) from exc
    with sock:
        if scheme != "tcp":  # tls:// and ws:// speak their own protocol first; distributed checks
            return
        try:
            sock.sendall(_PROBE)
            head = _recv_exactly(sock, 16, deadline)
            if len(head) == 16 and not _greeting_problem(head):  # read the rest: check, drain
                head += _recv_exactly(sock, struct.unpack("Q", head[:8])[0] - 8, deadline)
        except TimeoutError as exc:
            raise SchedulerError(
                f"could not reach {where} within {timeout:g}s (it accepted "
                "the connection but did not answer: not a Dask scheduler, "
                "or hung)"
            ) from exc
        except OSError as exc:
            head = b""
            if not isinstance(exc, ConnectionError):
                raise SchedulerError(
                    f"could not reach {where} within {timeout:g}s"
                    f" ({type(exc).__name__}: {_one_line(exc)})"
                ) from exc
    problem = _greeting_problem(head)
    if problem:
        raise SchedulerError(f"could not reach {where}: the port answers but {problem}")


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Up to ``n`` bytes, fewer only if the peer closes; TimeoutError at the deadline."""
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer")
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _greeting_problem(head: bytes) -> str:
    """Why the first bytes a server sent are not a Dask greeting ('' if they are).

    A Dask message starts with its total length and its number of frames,
    each a native unsigned 64-bit integer, as distributed writes them.
    """
    if not head:
        return (
            "hung up without the Dask handshake (not a Dask scheduler; if it is one that "
            "requires TLS, connect with tls:// and certificates)"
        )
    if head[0] in _TLS_RECORDS and head[1:2] == b"\x03":
        return "answers in TLS, not as a plain Dask scheduler; connect with tls:// and certificates"
    if len(head) >= 16:
        total, frames = struct.unpack_from("QQ", head)
        if 16 <= total <= _GREETING_MAX and 1 <= frames <= (total - 8) // 8:
            if len(head) == 16:
                return ""  # plausible so far: the caller reads the rest
            if len(head) == 8 + total:
                lengths = struct.unpack_from(f"{frames}Q", head, 16)
                if 8 * (1 + frames) + sum(lengths) == total:
                    return ""
    return f"is not a Dask scheduler (it sent {bytes(head[:24])!r})"


def _bounded(make: Callable[[], Any], deadline: float, message: str) -> Any:
    """Run ``make()`` in a daemon thread and give up at ``deadline`` (time.monotonic()).

    distributed bounds the TCP connect but not the handshake after it
    (dask/distributed#7698), so a port that accepts and never answers would
    hang the job; the abandoned thread dies with the process. On timeout:
    SchedulerError(message).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="connect to a Dask scheduler")
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if thread.is_alive():
        raise SchedulerError(message)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tls_configured() -> bool:
    """Whether dask config names TLS certificates or a security loader for a client."""
    return bool(
        dask.config.get("distributed.comm.tls.ca-file", None)
        or dask.config.get("distributed.client.security-loader", None)
    )


def _build_cluster(name: str, spec: Mapping) -> Any:
    """Import the profile's class and build it from kwargs; errors name the profile."""
    try:
        module = importlib.import_module(spec["module"])
    except ImportError as exc:
        raise ConfigError(
            f"profile {name!r}: cannot import module {spec['module']!r} "
            f"({_one_line(exc)}); is the package installed?"
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
    security = _security(name, spec)
    if security is not None:
        if security.require_encryption and not security.tls_ca_file:
            raise ConfigError(
                f"profile {name!r} requires encryption but names no TLS certificates "
                "(give security: {temporary: true} or tls_* files, or set "
                "distributed.comm.tls.* in dask config)"
            )
        kwargs.setdefault("security", security)
    protocol = str(kwargs.get("protocol") or "").split("://")[0]
    if spec.get("require_encryption") and protocol and protocol not in _ENCRYPTED:
        raise ConfigError(
            f"profile {name!r} requires encryption but sets protocol "
            f"{kwargs['protocol']!r}; use tls://"
        )
    if spec["class"] == "LocalCluster":
        _local_defaults(name, kwargs)
        _check_local_kwargs(name, kwargs, bool(spec.get("adapt")))
    _check_signature(name, cls, kwargs)
    log.info("starting %s.%s for profile %r", spec["module"], spec["class"], name)
    try:
        cluster = _start_shielded(lambda: cls(**kwargs), lambda c: _stop_fast(None, c))
    except Exception as exc:  # noqa: BLE001 - re-raised as one readable error
        bad = _bad_kwarg(exc)
        if bad is not None:
            raise ConfigError(
                f"profile {name!r}: {spec['class']} does not accept the "
                f"keyword argument {bad!r} (check kwargs in cluster.yaml)"
            ) from exc
        if isinstance(exc, (TypeError, ValueError)):
            raise ConfigError(
                f"profile {name!r}: bad kwargs for {spec['class']}: {_one_line(exc)}"
            ) from exc
        raise SchedulerError(
            f"profile {name!r}: could not start {spec['class']}: {_one_line(exc)}{_reason(exc)}"
        ) from exc
    if not isinstance(getattr(cluster, "scheduler_address", None), str):
        _close_quietly(cluster, "cluster")
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
                raise ConfigError(
                    f"profile {name!r}: bad adapt settings: {_one_line(exc)}"
                ) from exc
    except BaseException:
        _close_quietly(cluster, "cluster")
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


def _check_local_kwargs(name: str, kwargs: Mapping, adapt: bool) -> None:
    """Reject LocalCluster sizes that would start no worker or a nonsensical one.

    LocalCluster itself takes ``n_workers: -3`` as no workers (the job then
    waits forever), ``threads_per_worker: 0`` as "as many as cores", and a
    negative memory limit as given.
    """
    from distributed.worker_memory import parse_memory_limit

    where = f"profile {name!r}"
    n = kwargs.get("n_workers")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ConfigError(f"{where}: n_workers must be a whole number ≥ 0, not {n!r}")
    if n == 0 and not adapt:
        raise ConfigError(
            f"{where}: n_workers: 0 starts no workers; give n_workers ≥ 1, or "
            "adapt: {minimum: …, maximum: …} to add workers on demand"
        )
    t = kwargs.get("threads_per_worker")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
        raise ConfigError(f"{where}: threads_per_worker must be a whole number ≥ 1, not {t!r}")
    if not isinstance(kwargs.get("processes", True), bool):
        raise ConfigError(f"{where}: processes must be true or false")
    limit = kwargs.get("memory_limit")
    if limit is None:
        return
    try:
        if isinstance(limit, bool):
            raise ValueError("a boolean")
        parsed = parse_memory_limit(limit, 1, 1, logger=_unheard)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{where}: memory_limit {limit!r} is not a size (such as 4GiB, a "
            f"fraction of RAM such as 0.5, auto or 0): {_one_line(exc)}"
        ) from exc
    if parsed is not None and parsed < 0:
        raise ConfigError(f"{where}: memory_limit must not be negative, not {limit!r}")


#: A logger that drops everything: parse_memory_limit's warnings are LocalCluster's to give.
_unheard = logging.Logger("kmclust.cluster.unheard")
_unheard.addHandler(logging.NullHandler())


def _start_shielded(make: Callable[[], Any], abandon: Callable[[Any], None]) -> Any:
    """Call ``make()`` in a thread that blocks SIGINT; the threads and processes it starts
    inherit that blocked signal.

    Why: a terminal's Ctrl-C goes to the whole process group, so every worker
    process of a LocalCluster printed its own KeyboardInterrupt traceback and
    made the nanny wait 4 s before killing it. Shielded, only this process
    sees the interrupt and stops the cluster (``_stop_fast``). This thread
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
        bad = _bad_kwarg(exc)
        what = f"the keyword argument {bad!r}" if bad else f"these kwargs ({_one_line(exc)})"
        raise ConfigError(
            f"profile {name!r}: {cls.__name__} does not accept {what} "
            "(check kwargs in cluster.yaml)"
        ) from exc


def _check_encrypted(name: str, spec: Mapping, security: Any, cluster: Any) -> None:
    """A profile requiring encryption must have produced a tls:// scheduler."""
    if spec.get("require_encryption") or (security is not None and security.require_encryption):
        address = str(cluster.scheduler_address)
        if address.split("://", 1)[0] not in _ENCRYPTED:
            raise ConfigError(
                f"profile {name!r} requires encryption but its scheduler "
                f"listens on the unencrypted {address}"
            )


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
            f"{_reason(exc)}"
        ) from exc


def _wait_for_first_worker(name: str, spec: Mapping, client: Any, timeout: float) -> None:
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


def _stop_fast(client: Any, cluster: Any) -> None:
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
            log.debug("closing the Dask %s after an interrupt: %s", what, _one_line(exc))


def _kill_local_workers(cluster: Any) -> None:
    """SIGKILL the worker processes of a local cluster's nannies, which must not restart them."""
    for nanny in list(getattr(cluster, "workers", {}).values()):
        pid = getattr(nanny, "pid", None)
        if not isinstance(pid, int) or not hasattr(nanny, "close_gracefully"):
            continue  # an in-process Worker, or a worker class we do not know
        nanny.close_gracefully(reason="kmclust-interrupted")  # distributed's "do not restart"
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


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
