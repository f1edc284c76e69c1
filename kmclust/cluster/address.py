"""Reaching a running scheduler: its address, TLS settings, a TCP probe, a bounded handshake.

Why: distributed's Client retries a refused port until its timeout, chokes on a
reply that is no Dask message and does not bound the handshake, so a wrong
address would hang the job or end it with a cryptic error. Here every attempt
ends within the timeout with one line saying what answered.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import dask.config

from kmclust.cluster.messages import causes, one_line, reason
from kmclust.errors import ConfigError, SchedulerError

ADDRESS = re.compile(
    r"^(?P<scheme>tcp|tls|ws|wss)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(?::\d{1,5})?/?$"
)
ENCRYPTED = {"tls", "wss"}
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


def is_address(scheduler: str) -> bool:
    """True for a scheduler address such as ``tcp://127.0.0.1:8786`` or ``tls://host:8786``."""
    return bool(ADDRESS.match(scheduler))


def security_for(name: str, spec: Mapping) -> Any:
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
        raise ConfigError(f"profile {name!r}: bad security settings: {one_line(exc)}") from exc


def _requires_encryption(security: Any) -> bool:
    """Whether the profile's security, or dask config, demands TLS."""
    if security is not None:
        return bool(security.require_encryption)
    return bool(dask.config.get("distributed.comm.require-encryption", False))


def client_for_address(address: str, spec: Mapping, timeout: float, name: str | None = None) -> Any:
    """Connect to a running scheduler; refuse plain comms when encryption is required.

    The whole attempt — probe, handshake, client start — ends within the timeout.
    """
    from distributed import Client

    label = f"profile {name!r}" if name else f"scheduler {address}"
    security = security_for(name or address, spec)
    scheme = address.split("://", 1)[0]
    if _requires_encryption(security) and scheme not in ENCRYPTED:
        raise ConfigError(
            f"{label} requires encryption; refusing the unencrypted address {address} (use tls://)"
        )
    if scheme in ENCRYPTED and security is None and not _tls_configured():
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
                f"{one_line(exc)[:120]})"
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
            isinstance(e, (ConnectionResetError, ssl.SSLError)) for e in causes(exc)
        ):
            hint = "; if the scheduler uses TLS, connect with tls:// and certificates"
        raise SchedulerError(
            f"could not reach {where} within {timeout:g}s{reason(exc)}{hint}"
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

    distributed retries a refused connection until (past) its timeout and
    reads any reply's first 8 bytes as a frame length, so a web server's
    ``HTTP/1.1`` asks it for 3 EiB. A TCP connect shows a
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
            f" ({type(exc).__name__}: {one_line(exc)}{hint})"
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
                    f" ({type(exc).__name__}: {one_line(exc)})"
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
