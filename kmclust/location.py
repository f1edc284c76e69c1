"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``).

A :class:`Location` keeps the URL and the storage options (credentials,
endpoint, profile) apart: ``str()``, ``repr()``, log lines and error messages
show the URL only, and :func:`scrub` removes option values from any text that
reaches the user (a library's exception may quote them). Credentials come the
standard way of each backend (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, as botocore reads
them), from ``--storage-options JSON`` or from the ``storage_options`` of a
cluster.yaml profile (the command line wins key by key: :func:`merge_options`);
credentials written into the URL (``s3://key:secret@bucket``) are refused,
since URLs are logged. Workers open
the store from the URL themselves: the fsspec filesystem inside a dask graph
carries the options, not the data. A few option values that are never secret
(the endpoint, the region, ``anon``, ``use_ssl``) stay visible in messages, so an
unreachable endpoint is named; every other value stays hidden.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmclust.errors import ConfigError, DataError

#: a URL: scheme "://" rest (a Windows drive letter is not a scheme)
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]+)://(?P<rest>.*)$")
#: words of a storage error that mean the credentials were refused
_DENIED = ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")
#: option keys whose values are secrets even when short
_SECRET_KEYS = re.compile(r"secret|token|password|key|credential|sas|session", re.I)
#: option paths whose values are never secret: shown in messages (an endpoint that cannot be
#: reached is worth naming); every other value is hidden
VISIBLE = frozenset(
    {
        ("endpoint_url",),
        ("region_name",),
        ("anon",),
        ("use_ssl",),
        ("client_kwargs", "endpoint_url"),
        ("client_kwargs", "region_name"),
    }
)
#: the process's own cloud secrets, hidden from messages wherever they appear
_SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
)
#: error codes (S3's, as botocore gives them) that mean the storage refused the credentials
_REFUSED = {
    "invalidaccesskeyid": "the access key id is not known there",
    "signaturedoesnotmatch": "the secret does not match the access key id",
    "accessdenied": "these credentials are not allowed this access",
    "403": "forbidden, no reason given",
    "forbidden": "forbidden, no reason given",
    "expiredtoken": "the session token has expired",
    "invalidtoken": "the session token is not valid",
}
#: where credentials come from, named in the messages
_SOURCES = "the environment, --storage-options or the storage_options of the cluster.yaml profile"


@dataclass(frozen=True)
class Location:
    """A store's place: ``url`` (a plain path for local stores) and its storage options."""

    url: str
    options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.url

    @property
    def scheme(self) -> str:
        m = _URL.match(self.url)
        return m["scheme"].lower() if m else "file"

    @property
    def is_local(self) -> bool:
        """A path on this machine's filesystem (``file://`` URLs included)."""
        return self.scheme in ("file", "local")

    @property
    def path(self) -> Path:
        """The local path (only for local locations)."""
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local path")
        m = _URL.match(self.url)
        return Path(m["rest"] if m else self.url)

    @property
    def name(self) -> str:
        """The last part of the path (``results.zarr``)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def filesystem(self):
        """``(fs, path)``: the fsspec filesystem and this location's path on it."""
        from fsspec.core import url_to_fs

        return url_to_fs(self.url, **dict(self.options))

    def child(self, name: str) -> Location:
        """The location ``name`` inside this one (same options)."""
        if self.is_local and not _URL.match(self.url):
            return Location(str(Path(self.url) / name), self.options)
        return Location(f"{self.url.rstrip('/')}/{name}", self.options)

    def storage_options(self) -> dict[str, Any] | None:
        """What xarray / zarr / dask take as ``storage_options`` (None for local paths)."""
        return None if self.is_local else dict(self.options)


def locate(
    where: str | Path | Location, storage_options: Mapping[str, Any] | None = None
) -> Location:
    """A :class:`Location` for a path or URL; ConfigError for an unusable scheme or URL.

    A scheme fsspec does not know, or whose backend package is not installed, is
    refused here, naming the package to install (``s3://`` → ``s3fs``).
    """
    if isinstance(where, Location):
        if storage_options:
            return Location(where.url, {**where.options, **storage_options})
        return where
    text = str(where)
    if not text.strip():
        raise ConfigError("an empty path or URL")
    m = _URL.match(text)
    options = dict(storage_options or {})
    if m is None:
        return Location(text, options)
    scheme = m["scheme"].lower()
    if "@" in m["rest"].split("/", 1)[0]:
        raise ConfigError(
            f"{scheme}:// URL with credentials in it: give them through the environment "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or --storage-options, not the URL"
        )
    _check_backend(scheme)
    if scheme in ("file", "local"):
        return Location(m["rest"] if scheme == "local" else text, options)
    return Location(text, options)


def _check_backend(scheme: str) -> None:
    """ConfigError unless fsspec knows ``scheme`` and its backend imports."""
    from fsspec.registry import get_filesystem_class, known_implementations

    if scheme not in known_implementations:
        raise ConfigError(f"unknown URL scheme {scheme}://; use a path or an fsspec URL")
    try:
        get_filesystem_class(scheme)
    except ImportError:
        spec = known_implementations[scheme]
        package = spec["class"].split(".", 1)[0]
        raise ConfigError(
            f"{scheme}:// needs the {package} package: pip install {package}"
        ) from None


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options JSON`` as a dict; the message on error never echoes the text."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--storage-options is not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def storage_options(text: str) -> dict[str, Any]:
    """``--storage-options`` as an argparse ``type``: a bad value is a usage error (one line)."""
    import argparse

    try:
        return parse_storage_options(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--storage-options ")) from None


def merge_options(base: Mapping[str, Any], over: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``over`` on top, key by key (nested mappings such as ``client_kwargs`` too).

    Why: a cluster.yaml profile's storage options are the defaults and
    ``--storage-options`` changes only the keys it names.
    """
    out = dict(base)
    for key, value in (over or {}).items():
        mine = out.get(key)
        both = isinstance(mine, Mapping) and isinstance(value, Mapping)
        out[key] = merge_options(mine, value) if both else value
    return out


def secrets(options: Mapping[str, Any], _path: tuple[str, ...] = ()) -> list[str]:
    """The string values inside ``options`` that must never be shown (nested dicts too): all
    but those at the :data:`VISIBLE` paths (a value under 4 characters only if its key sounds
    secret, so that short words are not blanked all over a message)."""
    out: list[str] = []
    for key, value in options.items():
        path = (*_path, str(key))
        if isinstance(value, Mapping):
            out += secrets(value, path)
        elif path in VISIBLE:
            continue
        elif isinstance(value, str) and (len(value) >= 4 or _SECRET_KEYS.search(str(key))):
            out.append(value)
    return out


def scrub(text: str, options: Mapping[str, Any]) -> str:
    """``text`` with option values (all but the :data:`VISIBLE` ones) and the process's cloud
    secrets replaced by ``***``."""
    import os

    hidden = secrets(options) + [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    for value in sorted(set(hidden), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def describe(exc: BaseException, where: Location) -> DataError:
    """A one-line DataError for a failure reaching ``where`` (missing bucket, credentials, …)."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    low = f"{name} {text}".lower()
    code = _error_code(exc)
    if "nosuchbucket" in low or "bucket does not exist" in low:
        why = "no such bucket"
    elif code.lower() in _REFUSED:
        why = f"access denied: the credentials were refused ({code}: {_REFUSED[code.lower()]}); "
        why += f"check the credentials ({_SOURCES})"
    elif code == "NoCredentialsError":
        why = f"no credentials were found: give them through {_SOURCES} (anon: true for a public "
        why += "bucket)"
    elif code == "PartialCredentialsError":  # e.g. a secret without its key id, in one source
        why = f"incomplete credentials ({text}): give the key and the secret together, through "
        why += _SOURCES
    elif isinstance(exc, PermissionError) or any(s in low for s in _DENIED):
        why = f"access denied: check the credentials ({text})"
    elif any(s in low for s in ("could not connect", "connect timeout", "endpointconnection")):
        why = f"cannot reach the storage endpoint ({text})"
    elif isinstance(exc, FileNotFoundError):
        why = "no such store"
    else:
        why = f"{name}: {text}"
    return DataError(scrub(f"{where}: {why}", where.options))


def _error_code(exc: BaseException) -> str:
    """The storage's error code behind ``exc`` (botocore's ``Error.Code``, found along the
    chain of causes: s3fs raises PermissionError from it), or the name of botocore's
    NoCredentialsError / PartialCredentialsError; "" when there is none."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, Mapping) and isinstance(response.get("Error"), Mapping):
            return str(response["Error"].get("Code", ""))
        if type(seen).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return type(seen).__name__  # botocore's, raised before any request
        seen = seen.__cause__ or seen.__context__
    return ""
