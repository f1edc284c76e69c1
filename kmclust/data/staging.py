"""Writing a store: its zarr arrays, filled one chunk of rows at a time, published atomically.

Every array is chunked along `sample` only; each chunk is compressed with zstd
and followed by a CRC32C checksum, so a damaged chunk fails loudly on read.
The store is built in a temporary directory beside the target and renamed into
place: a failure never leaves a half-written store behind, and an existing
store is swapped out only once the new one is complete. What goes into the
store (a `Plan`) is decided by kmclust.data.stores.stage.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from kmclust import __version__
from kmclust.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a store will hold: `n` rows made range by range (so one chunk is in memory at a
    time), the image shape, the store's attrs and any extra per-row arrays."""

    n: int
    image_shape: tuple[int, ...]  # (H, W) grayscale, (H, W, C) with a channel dim (RGB)
    rows: Callable[[int, int], dict[str, np.ndarray]]  # start, stop -> images, labels, is_test…
    attrs: dict  # class_names, sha256, fingerprint, the source's own; read after the last rows
    extra: dict[str, str] = field(default_factory=dict)  # more per-row arrays: name -> dtype
    labelled: bool = True  # False: no labels array (attr labelled: false; see kmclust.data.images)


def codecs() -> list:
    """Each chunk: zstd, then a CRC32C checksum that makes a flipped byte fail on read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()]  # level 1: as small as 3-6 here, and faster


class Writer:
    """Creates the store's arrays at `path` and fills them chunk by chunk."""

    def __init__(
        self,
        path: Path,
        n: int,
        image_shape: tuple[int, ...],
        chunk_rows: int,
        extra: dict[str, str] | None = None,
        labelled: bool = True,
    ):
        import zarr

        self.path, self.n, self.chunk_rows = path, n, min(chunk_rows, n)
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3)
        image_dims = ("sample", "y", "x", "channel")[: 1 + len(image_shape)]
        spec = {"images": ("uint8", (n, *image_shape), image_dims)}
        if labelled:
            spec["labels"] = ("uint8", (n,), ("sample",))
        spec["split"] = (str, (n,), ("sample",))
        spec.update({name: (dtype, (n,), ("sample",)) for name, dtype in (extra or {}).items()})
        self.arrays = {}
        for name, (dtype, shape, dims) in spec.items():
            self.arrays[name] = self.group.create_array(
                name,
                shape=shape,
                chunks=(self.chunk_rows, *shape[1:]),
                dtype=dtype,
                compressors=codecs(),
                dimension_names=dims,
                fill_value="" if dtype is str else 0,
                # a chunk of fill values (all label 0, all-black images) is still written, so
                # verify_store can tell it from a missing one
                config={"write_empty_chunks": True},
            )

    def write(self, start: int, **blocks: np.ndarray) -> None:
        """Write rows start…start+len; `is_test` (bool) becomes the `split` strings."""
        is_test = blocks.pop("is_test")
        blocks["split"] = np.where(is_test, "test", "train")
        stop = start + len(is_test)
        for name, block in blocks.items():
            self.arrays[name][start:stop] = block

    def finish(self, attrs: dict) -> None:
        import zarr

        self.group.attrs.update(attrs)
        # Consolidated metadata is not (yet) in the v3 spec and zarr says so; we want it
        # anyway: it lets a plain xr.open_zarr(store) open the store without a warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata")
            zarr.consolidate_metadata(str(self.path))


def _write(path: Path, source: str, plan: Plan, chunk_rows: int) -> None:
    """Write `plan` into a new store at `path`, one chunk of rows in memory at a time."""
    writer = Writer(path, plan.n, plan.image_shape, chunk_rows, plan.extra, plan.labelled)
    n_test = 0
    n_chunks = -(-plan.n // chunk_rows)
    for i, start in enumerate(range(0, plan.n, chunk_rows)):
        block = plan.rows(start, min(start + chunk_rows, plan.n))
        n_test += int(block["is_test"].sum())
        writer.write(start, **block)
        if n_chunks >= 10 and (i + 1) % max(1, n_chunks // 10) == 0:
            log.info("%s: %d of %d chunks written", source, i + 1, n_chunks)
    writer.finish(
        {
            "source": source,
            "staged_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "kmclust_version": __version__,
            "chunk_rows": writer.chunk_rows,
            "n_train": plan.n - n_test,
            "n_test": n_test,
            **plan.attrs,
        }
    )


def check_target(out: Path, force: bool) -> None:
    """Refuse to replace `out` without `force`, and anything but a zarr store even with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise DataError(f"{out} already exists; use --force to replace it")
    if not (out.is_dir() and (out / "zarr.json").is_file()):
        raise DataError(f"{out} exists and is not a zarr store; refusing to replace it")


def write_store(out: Path, source: str, plan: Plan, chunk_rows: int) -> None:
    """Write `plan` as the store at `out`, atomically (`out` checked by `check_target`)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise DataError(f"cannot create a store beside {out}: {exc.strerror or exc}") from None
    old = None
    try:
        _write(tmp, source, plan, chunk_rows)
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                old = None
                raise
        else:
            os.rename(tmp, out)
    except OSError as exc:
        raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
