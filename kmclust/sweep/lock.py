"""One job per results store: a lock held beside the store for the whole sweep.

Two jobs on the same results store would compute the same cells and write
the same slabs. So a sweep first takes the store's lock, ``.NAME.lock`` in the
store's parent, and the second job refuses with one line naming the holder.

- Local: an ``fcntl.flock`` on that file. The kernel releases it when its
  process ends, however it ends, so a local lock is never stale (a killed
  job's file stays, unlocked; a finished job deletes it).
- Object storage: an object written with a conditional put (``If-None-Match:
  *``, fsspec's ``mode="create"``; S3 and moto honour it), holding the job's
  id, host, pid and start time. A killed job cannot delete its lock: a lock
  whose holder ran on this host and is gone is taken over (logged); a lock from
  another host is only broken by ``--break-lock``. Backends without exclusive
  writes fall back to check-then-write (a race window; documented in the README).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from kmclust.errors import ConfigError
from kmclust.location import Location, describe

log = logging.getLogger(__name__)


def lock_place(out: Path | Location) -> Path | Location:
    """Where the lock of the results store ``out`` lives: ``.NAME.lock`` beside it."""
    if isinstance(out, Path):
        return out.parent / f".{out.name}.lock"
    parent, _, name = out.url.rstrip("/").rpartition("/")
    return Location(f"{parent}/.{name}.lock", out.options)


def _holder() -> dict:
    """This job as the lock records it."""
    return {
        "job": uuid.uuid4().hex[:12],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _describe(holder: dict) -> str:
    return (
        f"job {holder.get('job', '?')} (host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')})"
    )


def _refuse(out: Path | Location, holder: dict, hint: str) -> ConfigError:
    return ConfigError(f"results store {out} is in use by {_describe(holder)}; {hint}")


@contextlib.contextmanager
def hold(out: Path | Location, *, break_lock: bool = False) -> Iterator[None]:
    """Hold the results store's lock for the block; ConfigError if another job holds it."""
    if isinstance(out, Path):
        with _local(out):
            yield
        return
    place = lock_place(out)
    holder = _remote_take(out, place, break_lock)
    try:
        yield
    finally:
        _remote_release(place, holder)


@contextlib.contextmanager
def _local(out: Path) -> Iterator[None]:
    """flock the lock file; it is deleted (while still locked) when the block ends."""
    place = lock_place(out)
    made = not place.parent.exists()
    fd = _local_take(out, place)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            place.unlink()
            if made:  # a refused job leaves no empty folder behind
                place.parent.rmdir()
        os.close(fd)  # releases the flock


def _local_take(out: Path, place: Path) -> int:
    """An open, flocked descriptor of the lock file that is still at ``place``."""
    import fcntl

    while True:
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(place, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot lock results store {out}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise _refuse(out, holder, "wait for it to finish or choose another --out") from None
        try:  # the holder before us may have deleted the file we opened: then open it again
            if os.stat(place).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _stale(holder: dict) -> bool:
    """Whether the lock's job ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remote_take(out: Location, place: Location, break_lock: bool) -> dict:
    """Write the lock object exclusively (taking over a stale one); return what it holds."""
    fs, path = place.filesystem()
    mine = _holder()
    body = json.dumps(mine).encode()
    for attempt in range(2):
        try:
            _create(fs, path, body)
            return mine
        except FileExistsError:
            pass
        except Exception as exc:
            raise describe(exc, out) from None
        try:
            theirs = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            continue  # released meanwhile: try again
        except Exception:  # unreadable: treat as held by an unknown job
            theirs = {}
        if attempt == 0 and (break_lock or _stale(theirs)):
            why = "--break-lock" if break_lock else "its process is gone"
            log.warning("taking over the lock of %s from %s (%s)", out, _describe(theirs), why)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
            continue
        raise _refuse(
            out,
            theirs,
            "wait for it to finish, or if it is no longer running, rerun with --break-lock",
        )
    raise _refuse(out, {}, "another job took it meanwhile")


def _create(fs, path: str, body: bytes) -> None:
    """Write ``path`` only if it does not exist (FileExistsError otherwise)."""
    fs.invalidate_cache(path)
    try:
        fs.pipe_file(path, body, mode="create")
    except (TypeError, NotImplementedError):  # a backend without exclusive writes
        if fs.exists(path):
            raise FileExistsError(path) from None
        fs.pipe_file(path, body)


def _remote_release(place: Location, holder: dict) -> None:
    """Delete the lock object if it is still this job's (best effort: the job may be failing
    because the storage is unreachable; the next job on this host then takes it over)."""
    try:
        fs, path = place.filesystem()
        fs.invalidate_cache(path)
        if json.loads(fs.cat_file(path)).get("job") == holder["job"]:
            fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - reported, never raised over the job's own error
        log.warning("could not remove the lock %s (%s)", place, type(exc).__name__)
