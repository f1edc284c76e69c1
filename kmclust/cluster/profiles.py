"""Reading cluster.yaml: find it, validate its profiles, pick the one asked for.

Why: a mistake in the YAML must end the job before any process starts, with
one line naming the file, the profile and the key. A profile may carry
``storage_options`` for the data and results stores at URLs; ``${VAR}`` in their
string values is read from the environment when the profile is used, so
secrets need not live in the file.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kmclust.cluster.address import ADDRESS, is_address
from kmclust.cluster.messages import one_line
from kmclust.errors import ConfigError

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

_REQUIRED = {"module", "class", "kwargs"}
_OPTIONAL = {"security", "require_encryption", "connect_timeout", "adapt", "storage_options"}
_ADDRESS_KEYS = {"address", "security", "require_encryption", "connect_timeout", "storage_options"}
#: an environment variable in a storage option's value: ${NAME}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_profiles(path: str | Path) -> dict[str, dict]:
    """Read and validate the ``profiles`` of a cluster.yaml; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cluster config {path} is not valid YAML: {one_line(exc)}") from exc
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
        if not isinstance(spec["address"], str) or not ADDRESS.match(spec["address"]):
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
    for key in ("kwargs", "security", "adapt", "storage_options"):
        if key in spec and not isinstance(spec[key] or {}, Mapping):
            raise ConfigError(f"{where}: {key} must be a mapping")  # the value is not shown
        if key in spec:
            spec[key] = dict(spec[key] or {})
    if not isinstance(spec.get("require_encryption", False), bool):
        raise ConfigError(f"{where}: require_encryption must be true or false")
    if "connect_timeout" in spec and not is_timeout(spec["connect_timeout"]):
        raise ConfigError(f"{where}: connect_timeout must be a positive number of seconds")
    if any(spec.get("adapt", {}).get(key) == 0 for key in ("maximum", "maximum_jobs")):
        raise ConfigError(f"{where}: adapt with a maximum of 0 never starts a worker")
    return spec


def is_timeout(value: Any) -> bool:
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


def pick_profile(profiles: dict[str, dict], name: str, path: Path | None) -> tuple[str, dict]:
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


def profile_storage_options(scheduler: str, config_path: str | Path | None = None) -> dict:
    """The storage options of the profile ``scheduler`` names (or of the address profile with
    that address), ``${VAR}`` expanded; {} when there is none.

    An unknown profile name also gives {}: connect() refuses it later with the
    list of known profiles.
    """
    path = find_config(config_path)
    if path is None:
        return {}
    profiles = load_profiles(path)
    if is_address(scheduler):
        spec = profile_for_address(profiles, scheduler)
        name = next((n for n, p in profiles.items() if p is spec), scheduler)
    else:
        name, spec = scheduler, profiles.get(scheduler, {})
    where = f"cluster config {path}, profile {name!r}: storage_options"
    return expand_variables(spec.get("storage_options") or {}, where)


def expand_variables(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``options`` with every ``${VAR}`` in a string value (nested too) replaced from the
    environment; an unset variable is a ConfigError naming it (never a value)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        here = f"{where}.{key}"
        if isinstance(value, Mapping):
            out[key] = expand_variables(value, here)
        elif isinstance(value, str):
            for variable in _VARIABLE.findall(value):
                if variable not in os.environ:
                    raise ConfigError(f"{here} uses ${{{variable}}}, which is not set")
            out[key] = _VARIABLE.sub(lambda m: os.environ[m[1]], value)
        else:
            out[key] = value
    return out


def profile_for_address(profiles: dict[str, dict], address: str) -> dict:
    """An address profile for exactly this address (for its TLS settings), else {}."""
    for spec in profiles.values():
        if spec.get("address", "").rstrip("/") == address.rstrip("/"):
            return spec
    return {}


def check_local_kwargs(name: str, kwargs: Mapping, adapt: bool) -> None:
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
            f"fraction of RAM such as 0.5, auto or 0): {one_line(exc)}"
        ) from exc
    if parsed is not None and parsed < 0:
        raise ConfigError(f"{where}: memory_limit must not be negative, not {limit!r}")


#: A logger that drops everything: parse_memory_limit's warnings are LocalCluster's to give.
_unheard = logging.Logger("kmclust.cluster.unheard")
_unheard.addHandler(logging.NullHandler())
