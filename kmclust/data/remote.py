"""Stores on object storage: check a destination, publish a locally staged store, open one.

Object stores have no rename, so a store is never *moved* into place there:
it is staged on local disk (atomically, as every store), then uploaded file
by file with the root ``zarr.json`` — the consolidated metadata that makes it
a store — written last. A store whose upload was cut short has no root
``zarr.json``: :func:`check_readable` calls it incomplete and says how to
repair it (stage again with ``--force``), and ``--force`` replaces it. Every
failure to reach the storage becomes one line (:func:`kmclust.location.describe`),
scrubbed of the storage options.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kmclust.errors import DataError, KmclustError
from kmclust.location import Location, describe

log = logging.getLogger(__name__)

ROOT_META = "zarr.json"


def _fs(loc: Location):
    """The filesystem and path of ``loc``, its cached listings dropped (another process may
    have written there since)."""
    try:
        fs, path = loc.filesystem()
        fs.invalidate_cache(path)
        return fs, path
    except KmclustError:
        raise
    except Exception as exc:  # bad options, a backend that refuses them
        raise describe(exc, loc) from None


def _exists(fs, path: str, loc: Location) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception as exc:
        raise describe(exc, loc) from None


def check_target(loc: Location, force: bool) -> None:
    """Refuse to replace a store at ``loc`` without ``force``, and anything but a store with it.

    The bucket (the URL's first part) must exist: a missing one is named now,
    before any staging work.
    """
    fs, path = _fs(loc)
    bucket = path.split("/", 1)[0]
    try:  # not fs.exists: s3fs answers False when the endpoint cannot be reached
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        raise DataError(f"{loc}: no such bucket ({bucket})") from None
    except Exception as exc:
        raise describe(exc, loc) from None
    present = _listing(fs, path, loc)
    if not present:
        return
    if not force:
        raise DataError(f"{loc} already exists; use --force to replace it")
    if f"{path}/{ROOT_META}" not in present and not any(p.endswith("/zarr.json") for p in present):
        raise DataError(f"{loc} exists and is not a zarr store; refusing to replace it")


def _listing(fs, path: str, loc: Location) -> set[str]:
    """Every file under ``path`` (empty when nothing is there)."""
    try:
        return {p.rstrip("/") for p in fs.find(path)}
    except FileNotFoundError:
        return set()
    except Exception as exc:
        raise describe(exc, loc) from None


def publish(local: Path, loc: Location) -> None:
    """Upload the complete local store ``local`` to ``loc``, root ``zarr.json`` last.

    Whatever was at ``loc`` (checked by :func:`check_target`) is removed first.
    """
    fs, path = _fs(loc)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        root_meta = local / ROOT_META
        for f in [p for p in files if p != root_meta] + [root_meta]:
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")
        fs.invalidate_cache(path)
    except Exception as exc:
        raise describe(exc, loc) from None
    log.info("%s: %d files uploaded", loc, len(files))


def check_readable(loc: Location) -> None:
    """DataError unless ``loc`` holds a complete zarr v3 store (root ``zarr.json`` present)."""
    fs, path = _fs(loc)
    if _exists(fs, f"{path}/{ROOT_META}", loc):
        return
    if _listing(fs, path, loc):
        raise DataError(
            f"{loc}: an incomplete store (no root zarr.json: an interrupted upload?); "
            "stage it again with --force"
        )
    raise DataError(f"{loc}: no such store (stage one with data/stage.py --out URL)")


def consolidated(loc: Location) -> bool:
    """Whether the store's root metadata holds consolidated metadata."""
    import json

    fs, path = _fs(loc)
    try:
        with fs.open(f"{path}/{ROOT_META}", "rb") as f:
            return json.loads(f.read()).get("consolidated_metadata") is not None
    except Exception as exc:
        raise describe(exc, loc) from None
