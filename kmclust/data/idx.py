"""Read and write IDX files (the MNIST / Fashion-MNIST format), validating hard.

The IDX header is two zero bytes, a type byte (0x08 = unsigned byte, the only
type MNIST-like data uses), a byte giving the number of dimensions, then one
big-endian uint32 per dimension; the payload is the C-ordered data. Labels
files have magic 2049 (0x00000801), image files 2051 (0x00000803).

Every problem raises IDXError with one message naming the file. Sizes are
checked before anything large is allocated: a raw file's declared payload is
compared with its size on disk, a gzip file's with the most its compressed
size could expand to. A gzip stream is then decompressed in small chunks into
an array that grows (by realloc) only as data arrives, never past the declared
size: a lying header costs at most about twice what the stream really holds,
and an honest file exactly its payload, never an extra whole-payload copy.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from kmclust.errors import IDXError

log = logging.getLogger(__name__)

MAGIC = {"labels": 2049, "images": 2051}
NDIM = {"labels": 1, "images": 3}
UBYTE = 0x08
MAX_PAYLOAD = 2**33  # bytes; far above any MNIST-like set, far below "absurd"
# Deflate expands at most ~1032:1; anything claiming more cannot be honest.
_MAX_DEFLATE_RATIO = 1032
_GZIP_MAGIC = b"\x1f\x8b"
# Decompression chunk and the first size of the growing output: big enough to be fast, small
# enough that gzip's own buffers plus one chunk stay far below a MiB.
_CHUNK = 1 << 16
_TYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}

Kind = Literal["images", "labels"]


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return (
        text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))
        or b"<html" in text[:1024]
    )


def _describe_magic(magic: int) -> str:
    for kind, value in MAGIC.items():
        if magic == value:
            return f"an IDX {kind} file (magic {value})"
    return f"magic number 0x{magic:08X}"


def _parse_header(name: str, head: bytes, kind: Kind) -> tuple[int, tuple[int, ...]]:
    """Validate the header at the start of `head`; return (header length, dims)."""
    if len(head) < 4:
        raise IDXError(f"{name}: truncated header ({len(head)} bytes, need at least 4)")
    zero, dtype_byte, ndim = struct.unpack(">HBB", head[:4])
    magic = struct.unpack(">I", head[:4])[0]
    want = MAGIC[kind]
    if zero != 0:
        raise IDXError(
            f"{name}: not an IDX file "
            f"(bad magic number 0x{magic:08X}, expected 0x{want:08X} for {kind})"
        )
    if dtype_byte != UBYTE:
        tname = _TYPE_NAMES.get(dtype_byte, "unknown type")
        raise IDXError(
            f"{name}: element type 0x{dtype_byte:02X} ({tname}) is not supported, "
            "expected 0x08 (uint8)"
        )
    if magic != want:
        if magic in MAGIC.values():
            raise IDXError(f"{name}: is {_describe_magic(magic)}, expected {kind} (magic {want})")
        raise IDXError(
            f"{name}: has {ndim} dimension(s), expected {NDIM[kind]} for {kind} (magic {want})"
        )
    hlen = 4 + 4 * ndim
    if len(head) < hlen:
        raise IDXError(f"{name}: truncated header ({len(head)} bytes, the header declares {hlen})")
    dims = struct.unpack(f">{ndim}I", head[4:hlen])
    return hlen, tuple(int(d) for d in dims)


def _check_dims(
    name: str, dims: tuple[int, ...], kind: Kind, expect_shape: tuple[int, ...] | None
) -> int:
    """Check the declared shape; return the declared payload size in bytes."""
    if len(dims) != NDIM[kind]:
        raise IDXError(f"{name}: has {len(dims)} dimension(s), expected {NDIM[kind]} for {kind}")
    payload = math.prod(dims)
    shape = "x".join(map(str, dims))
    # a zero dimension makes the payload 0, not the shape sane
    if math.prod(d for d in dims if d) > MAX_PAYLOAD:
        raise IDXError(f"{name}: declares a {shape} array, over the {MAX_PAYLOAD:,}-byte limit")
    if payload > MAX_PAYLOAD:
        raise IDXError(
            f"{name}: declares {payload:,} bytes of data ({shape}), "
            f"over the {MAX_PAYLOAD:,}-byte limit"
        )
    if kind == "images" and expect_shape is not None and tuple(dims[1:]) != tuple(expect_shape):
        got = "x".join(map(str, dims[1:]))
        want = "x".join(map(str, expect_shape))
        raise IDXError(f"{name}: images are {got} pixels, expected {want}")
    return payload


def _read_gzip(
    path: Path, name: str, kind: Kind, expect_shape: tuple[int, ...] | None
) -> np.ndarray:
    """Decompress and validate `path`, holding at most ~2x the bytes the stream really has.

    Reads go through GzipFile.read in _CHUNK pieces: one big read or readinto would make
    gzip/io/zlib allocate payload-sized temporaries (about 3 copies besides the array).
    The array doubles by ndarray.resize (realloc), so no old and new buffer are both kept.
    """
    csize = path.stat().st_size
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * 255)  # the longest possible header
            if not head:
                raise IDXError(f"{name}: empty gzip stream (no data)")
            if _looks_like_html(head):
                raise IDXError(f"{name}: is an HTML page, not IDX data (a failed download?)")
            hlen, dims = _parse_header(name, head, kind)
            payload = _check_dims(name, dims, kind, expect_shape)
            if payload > _MAX_DEFLATE_RATIO * csize + 1024:
                raise IDXError(
                    f"{name}: declares {payload:,} bytes of data, "
                    f"more than a {csize:,}-byte gzip file can hold"
                )
            have = min(len(head) - hlen, payload)
            out = np.empty(min(payload, _CHUNK), dtype=np.uint8)  # room for the header's leftover
            out[:have] = np.frombuffer(head, dtype=np.uint8, count=have, offset=hlen)
            extra = len(head) - hlen - have
            while have < payload:
                block = f.read(min(_CHUNK, payload - have))
                if not block:
                    break
                need = have + len(block)
                if need > out.size:  # grow only for data that has arrived; no view of out exists
                    out.resize(min(payload, max(2 * out.size, need)), refcheck=False)
                out[have:need] = np.frombuffer(block, dtype=np.uint8)
                have = need
            if have < payload:
                raise IDXError(
                    f"{name}: truncated: declares {payload:,} bytes of data "
                    f"but the stream holds {have:,}"
                )
            extra += len(f.read(1))  # b"" only at the end of the stream, after gzip checked the CRC
            if extra:
                raise IDXError(
                    f"{name}: longer than declared: "
                    f"data continues after the declared {payload:,} bytes"
                )
    except EOFError:
        raise IDXError(f"{name}: truncated gzip stream (the compressed data ends early)") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise IDXError(f"{name}: corrupt gzip data ({exc or type(exc).__name__})") from None
    return out.reshape(dims)


def _read_raw(
    path: Path, name: str, kind: Kind, expect_shape: tuple[int, ...] | None
) -> np.ndarray:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4 + 4 * 255)
    if head.startswith(_GZIP_MAGIC):
        raise IDXError(
            f"{name}: is gzip-compressed but its name does not end in .gz "
            f"(rename it to {path.name}.gz)"
        )
    if _looks_like_html(head):
        raise IDXError(f"{name}: is an HTML page, not IDX data (a failed download?)")
    hlen, dims = _parse_header(name, head, kind)
    payload = _check_dims(name, dims, kind, expect_shape)
    have = size - hlen
    if have < payload:
        raise IDXError(
            f"{name}: truncated: declares {payload:,} bytes of data but the file holds {have:,}"
        )
    if have > payload:
        raise IDXError(
            f"{name}: longer than declared: {have - payload:,} bytes follow "
            f"the declared {payload:,} bytes of data"
        )
    data = np.fromfile(path, dtype=np.uint8, count=payload, offset=hlen)
    if data.size != payload:  # the file changed under us
        raise IDXError(f"{name}: truncated while reading ({data.size:,} of {payload:,} bytes)")
    return data.reshape(dims)


def _first_above(data: np.ndarray, limit: int) -> int:
    """Index of the first element over `limit` (there must be one), a chunk at a time.

    `np.argmax(data > limit)` would allocate a mask as large as the data itself.
    """
    flat = data.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        block = flat[start : start + _CHUNK]
        if int(block.max()) > limit:
            return start + int(np.argmax(block > limit))
    raise ValueError(f"no element exceeds {limit}")


def read_idx(
    path: str | Path, kind: Kind, expect_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read one uint8 IDX file (`.gz` if so named): "images" (N, h, w) or "labels" (N,).

    Images must be `expect_shape` pixels when one is given (the caller's source
    knows its image size; the format does not). Labels must lie in 0–9. Raises
    IDXError naming the file and the problem.
    """
    if kind not in MAGIC:
        raise IDXError(f"{path}: unknown IDX kind {kind!r}, expected 'images' or 'labels'")
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise IDXError(f"{name}: no such file")
    if not path.is_file():
        raise IDXError(f"{name}: not a regular file")
    if path.stat().st_size == 0:
        raise IDXError(f"{name}: empty file")
    if path.suffix == ".gz":
        with path.open("rb") as f:
            start = f.read(2)
        if start != _GZIP_MAGIC:
            with path.open("rb") as f:
                head = f.read(1024)
            if _looks_like_html(head):
                raise IDXError(f"{name}: is an HTML page, not IDX data (a failed download?)")
            raise IDXError(f"{name}: named .gz but not gzip-compressed")
        data = _read_gzip(path, name, kind, expect_shape)
    else:
        data = _read_raw(path, name, kind, expect_shape)
    if kind == "labels" and data.size and int(data.max()) > 9:
        bad = _first_above(data, 9)
        raise IDXError(f"{name}: label {int(data[bad])} at index {bad} is outside 0-9")
    log.debug("read %s: %s %s", name, kind, data.shape)
    return data


def read_idx_pair(
    images_path: str | Path, labels_path: str | Path, expect_shape: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file (of `expect_shape` pixels, if given) and its labels: counts agree."""
    images = read_idx(images_path, "images", expect_shape)
    labels = read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} holds {len(images):,} images "
            f"but {labels_path} holds {len(labels):,} labels"
        )
    return images, labels


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding (header + payload) of a uint8 array."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise IDXError(f"cannot write IDX from dtype {array.dtype}: only uint8 is supported")
    if not 1 <= array.ndim <= 255:
        raise IDXError(f"cannot write IDX with {array.ndim} dimensions")
    if any(d >= 2**32 for d in array.shape):
        raise IDXError(f"cannot write IDX: a dimension of {array.shape} exceeds 2**32-1")
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array as IDX (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path
