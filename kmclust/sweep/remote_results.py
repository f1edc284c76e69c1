"""A results store on object storage: what is at a URL, create it, replace it, repair a cut swap.

Object stores have no rename, so nothing is moved into place:

- A new store is written on local disk and uploaded with its root
  ``zarr.json`` last (kmclust.data.remote.publish): without that object it is
  no store, and the next run calls it incomplete.
- ``--overwrite`` computes the new results under a hidden sibling prefix
  (``.NAME.overwrite-ID``); only when they are complete is a marker object
  ``.NAME.replacing`` written (naming the sibling), then the old store is
  deleted (root ``zarr.json`` first), the sibling copied in server-side (root
  ``zarr.json`` last) and the marker and sibling deleted. A job killed before
  the marker leaves the old store whole; one killed after it leaves a marker
  that the next run (under the store's lock) follows to finish the swap.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from pathlib import Path

from kmclust.errors import DataError, KmclustError
from kmclust.location import Location, describe

log = logging.getLogger(__name__)

ROOT_META = "zarr.json"


def _fs(loc: Location):
    try:
        fs, path = loc.filesystem()
        fs.invalidate_cache()
        return fs, path.rstrip("/")
    except KmclustError:
        raise
    except Exception as exc:
        raise describe(exc, loc) from None


def _beside(loc: Location, name: str) -> Location:
    parent = loc.url.rstrip("/").rpartition("/")[0]
    return Location(f"{parent}/{name}", loc.options)


def marker(loc: Location) -> Location:
    """The object that names a complete replacement being swapped in."""
    return _beside(loc, f".{loc.name}.replacing")


def sibling(loc: Location) -> Location:
    """A fresh hidden place beside ``loc`` for the results of ``--overwrite``."""
    return _beside(loc, f".{loc.name}.overwrite-{uuid.uuid4().hex[:8]}")


def state(loc: Location, results_attrs) -> str:
    """What is at ``loc``: ``absent``, ``results`` (a complete results store), ``replacing``
    (a cut ``--overwrite`` swap, repaired by the next run), ``incomplete`` (zarr objects but
    no root ``zarr.json``: a cut upload) or ``other``. ``results_attrs(attrs)`` tells whether
    a store's root attributes are a results store's. DataError if the bucket is missing or
    the storage cannot be reached."""
    fs, path = _fs(loc)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
        if fs.exists(_fs(marker(loc))[1]):
            return "replacing"
        files = {p.rstrip("/") for p in fs.find(path)}
        if f"{path}/{ROOT_META}" in files:
            attrs = json.loads(fs.cat_file(f"{path}/{ROOT_META}")).get("attributes", {})
            return "results" if isinstance(attrs, dict) and results_attrs(attrs) else "other"
    except FileNotFoundError:
        raise DataError(f"{loc}: no such bucket ({bucket})") from None
    except Exception as exc:
        raise describe(exc, loc) from None
    if not files:
        return "absent"
    return "incomplete" if any(p.endswith("/" + ROOT_META) for p in files) else "other"


def exists(loc: Location) -> bool:
    """Whether anything is stored under ``loc``."""
    fs, path = _fs(loc)
    try:
        return bool(fs.find(path))
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise describe(exc, loc) from None


def create(loc: Location, write) -> None:
    """Create the store at ``loc``: ``write(local_path)`` writes it on local disk, then it is
    uploaded with its root ``zarr.json`` last."""
    from kmclust.data.remote import publish

    with tempfile.TemporaryDirectory(prefix="kmclust-results-") as tmp:
        local = Path(tmp) / "store.zarr"
        write(local)
        publish(local, loc)


def remove(loc: Location) -> None:
    """Delete everything under ``loc``, the root ``zarr.json`` first (best effort on errors)."""
    fs, path = _fs(loc)
    try:
        if fs.exists(f"{path}/{ROOT_META}"):
            fs.rm_file(f"{path}/{ROOT_META}")
        if fs.find(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        return
    except Exception as exc:
        raise describe(exc, loc) from None


def replace(new: Location, target: Location) -> None:
    """Put the complete store ``new`` at ``target`` (see the module docstring)."""
    fs, _ = _fs(target)
    try:
        fs.pipe_file(_fs(marker(target))[1], new.name.encode())
    except Exception as exc:
        raise describe(exc, target) from None
    _swap(new, target)


def recover(target: Location) -> None:
    """Finish a swap that a killed ``--overwrite`` left (its marker names the new store)."""
    fs, mark = _fs(marker(target))
    try:
        name = fs.cat_file(mark).decode().strip()
    except FileNotFoundError:
        return
    except Exception as exc:
        raise describe(exc, target) from None
    new = _beside(target, name)
    if "/" in name or not name.startswith(f".{target.name}.overwrite-"):
        raise DataError(f"{target}: a malformed replacement marker {marker(target)}; delete it")
    log.warning("%s: finishing an interrupted --overwrite (from %s)", target, name)
    _swap(new, target)


def _swap(new: Location, target: Location) -> None:
    fs, src = _fs(new)
    _, dst = _fs(target)
    try:
        files = sorted(p.rstrip("/") for p in fs.find(src))
        if f"{src}/{ROOT_META}" in files:  # not yet copied in full: copy (again)
            remove(target)
            rest = [p for p in files if p != f"{src}/{ROOT_META}"]
            fs.copy(rest, [dst + p[len(src) :] for p in rest])
            fs.copy(f"{src}/{ROOT_META}", f"{dst}/{ROOT_META}")
            fs.rm_file(f"{src}/{ROOT_META}")  # from here on the copy is known to be whole
        if fs.find(src):
            fs.rm(src, recursive=True)
        fs.rm_file(_fs(marker(target))[1])
    except Exception as exc:
        raise describe(exc, target) from None
    log.info("%s: replaced by the new results", target)


def leftovers(target: Location) -> list[Location]:
    """Hidden ``--overwrite`` siblings that killed jobs left (none is in use: the caller holds
    the store's lock)."""
    fs, path = _fs(target)
    parent = path.rpartition("/")[0]
    try:
        names = [p.rstrip("/").rpartition("/")[2] for p in fs.ls(parent, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise describe(exc, target) from None
    return [_beside(target, n) for n in names if n.startswith(f".{target.name}.overwrite-")]
