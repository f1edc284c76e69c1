"""The array source: images from an .npy, an .npz, a zarr array or a zarr group, streamed.

--from is a path or fsspec URL: a file (.npy/.npz, told by its magic bytes) or else zarr.
An .npy or a zarr array is the images alone (unlabelled). An .npz or a zarr group holds
`ARRAY_KEYS`: `images`, optional `labels` (none: unlabelled), `split`, `class_names` (needs
labels; for a group also its attr, as a staged store has it; both ways must agree); other
keys are refused. A group is read with `xr.open_zarr` (CF decoding; coordinates ignored),
or as plain arrays without dimension names. `images`: (N, H, W) or (N, H, W, C), C = 3
(RGB) or 1 (gray); integers 0-255, or floats in [0, 1] stored as rint(v * 255) (half to
even, float64). Streaming: READ_BYTES of input read, checked and converted at a time (an
.npz member inflated as read); labels and split read whole; a bad value met late leaves
nothing (stores are written atomically). Fingerprint: a file's SHA-256; for zarr, SHA-256
over the variables' names, dtypes, shapes, the images' bytes in row order (whatever the
chunks and codecs), labels, test mask and class names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from kmclust.data.staging import Plan
from kmclust.errors import ConfigError, DataError, KmclustError
from kmclust.location import Location, describe, locate, scrub

log = logging.getLogger(__name__)

NAME = "array"
ARRAY_KEYS = ("images", "labels", "split", "class_names")  # what an .npz or a group may hold
CHANNELS = (1, 3)  # a 4th images axis: gray (squeezed) or RGB
READ_BYTES = 64 * 2**20  # input bytes read (and converted) at a time
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Column:
    """One input variable, read by rows: `read(start, stop)` returns those rows only."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]


@dataclass
class Input:
    """An opened input: its variables, the group's class names attr, how to fingerprint it."""

    where: str  # for messages (a URL never carries its storage options)
    kind: str  # npy, npz, zarr array, zarr group
    columns: dict[str, Column]
    file_sha256: Callable[[], str] | None  # a file: the digest of its bytes; zarr: None
    name: str  # the key of the store's sha256 attr
    attr_names: Any = None  # a zarr group's class_names attr


class _NpyStream:
    """Rows of one .npy stream, read in order; a Fortran-ordered array is read whole."""

    def __init__(self, f: IO[bytes], where: str):
        self.f, self.where = f, where
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version} is not supported")
            read = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
            shape, self.fortran, dtype = read(f)
            self.offset = f.tell()
        except _READ_ERRORS as exc:
            raise DataError(f"{where}: cannot read as .npy ({exc})") from None
        self.shape, self.dtype, self.pos, self.whole = tuple(shape), np.dtype(dtype), 0, None

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fortran and len(self.shape) > 1:  # rows are not contiguous in the file
            if self.whole is None:
                log.info("%s: Fortran-ordered; read whole", self.where)
                self.whole = self._array(self.shape).reshape(self.shape[::-1]).T
            return self.whole[start:stop]
        if start != self.pos:  # rows are asked in order; else seek (a zip member re-inflates)
            row = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
            self.f.seek(self.offset + start * row)
        self.pos = stop
        return self._array((stop - start, *self.shape[1:]))

    def _array(self, shape: tuple) -> np.ndarray:
        size = self.dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        try:
            data = self.f.read(size)  # buffered and zip member reads return all but at the end
        except _READ_ERRORS as exc:
            raise DataError(f"{self.where}: cannot read ({type(exc).__name__}: {exc})") from None
        if len(data) < size:
            raise DataError(f"{self.where}: truncated (fewer bytes than its header says)")
        return np.frombuffer(data, self.dtype).reshape(shape)


def _open_npz(f: IO[bytes], where: str, stack: contextlib.ExitStack) -> dict[str, Column]:
    """The members of an .npz: images streamed, the small ones read whole now."""
    try:
        zf = stack.enter_context(zipfile.ZipFile(f))
        members = {n.removesuffix(".npy"): n for n in zf.namelist()}
        unknown = sorted(set(members) - set(ARRAY_KEYS))
        if unknown:
            raise DataError(
                f"{where}: unknown keys {', '.join(unknown)}; expected {', '.join(ARRAY_KEYS)}"
            )
        columns = {}
        for key, member in members.items():
            if key == "images":
                s = _NpyStream(stack.enter_context(zf.open(member)), f"{where} ({member})")
                columns[key] = Column(s.shape, s.dtype, s.read)
            else:
                with zf.open(member) as m:
                    arr = np.lib.format.read_array(m, allow_pickle=False)
                columns[key] = Column(arr.shape, arr.dtype, lambda a, b, arr=arr: arr[a:b])
        return columns
    except _READ_ERRORS as exc:
        raise DataError(f"{where}: cannot read as .npz ({exc})") from None


def _open_file(fs: Any, path: str, where: str, stack: contextlib.ExitStack) -> Input:
    """An .npy or .npz (told by its first bytes) at `path` on `fs`."""
    with fs.open(path, "rb") as f:
        head = f.read(6)
    name = path.rstrip("/").rsplit("/", 1)[-1]

    def digest() -> str:
        with fs.open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    if head == NPY_MAGIC:
        s = _NpyStream(stack.enter_context(fs.open(path, "rb")), where)
        return Input(where, "npy", {"images": Column(s.shape, s.dtype, s.read)}, digest, name)
    if head[:4] in ZIP_MAGIC:
        columns = _open_npz(stack.enter_context(fs.open(path, "rb")), where, stack)
        return Input(where, "npz", columns, digest, name)
    raise DataError(f"{where}: cannot read as .npy or .npz (not a NumPy file) nor as zarr")


def _guard(loc: Location, what: str, fn: Callable[[], Any]) -> Any:
    """fn(), any failure but ours a DataError naming `what` at `loc`, secrets scrubbed."""
    try:
        return fn()
    except KmclustError:
        raise
    except Exception as exc:  # zarr, xarray and fsspec raise many types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            scrub(f"{loc}: cannot read {what} ({type(exc).__name__}: {text})", loc.options)
        ) from None


def _column(loc: Location, name: str, var: Any) -> Column:
    """A zarr array or an xarray variable as a Column (its rows read on demand)."""
    return Column(
        tuple(var.shape),
        np.dtype(var.dtype),
        lambda a, b: _guard(loc, f"'{name}' rows {a}-{b - 1}", lambda: np.asarray(var[a:b])),
    )


def _group_variables(loc: Location, group: Any) -> tuple[dict, set, dict]:
    """(variables, data variable names, attrs): xarray's view, or the plain zarr arrays."""
    import xarray as xr

    cons = getattr(group.metadata, "consolidated_metadata", None) is not None
    try:
        opts = loc.storage_options()
        ds = xr.open_zarr(loc.url, chunks=None, consolidated=cons, storage_options=opts)
        variables = {name: ds.variables[name] for name in ds.variables}
        return variables, set(map(str, ds.data_vars)), dict(ds.attrs)
    except KeyError as exc:  # no dimension names: a zarr group, not an xarray dataset
        if "dimension" not in str(exc).lower():
            raise
    arrays = dict(group.arrays())
    return arrays, set(arrays), group.attrs.asdict()


def _open_zarr(loc: Location) -> Input:
    """A zarr array (the images) or a zarr group of ARRAY_KEYS variables at `loc`."""
    import zarr

    def node() -> Any:
        try:
            return zarr.open(store=loc.url, mode="r", storage_options=loc.storage_options())
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise DataError(f"{loc}: neither an .npy/.npz file nor a zarr array or group") from None

    opened = _guard(loc, "as zarr", node)
    if isinstance(opened, zarr.Array):
        images = {"images": _column(loc, "images", opened)}
        return Input(str(loc), "zarr array", images, None, loc.name)
    variables, data_vars, attrs = _guard(loc, "as a dataset", lambda: _group_variables(loc, opened))
    unknown = sorted(data_vars - set(ARRAY_KEYS))
    if unknown:
        raise DataError(
            f"{loc}: unknown variables {', '.join(unknown)}; expected {', '.join(ARRAY_KEYS)}"
        )
    if "images" not in variables:
        raise DataError(f"{loc}: a zarr group without an 'images' array")
    columns = {k: _column(loc, k, variables[k]) for k in ARRAY_KEYS if k in variables}
    return Input(str(loc), "zarr group", columns, None, loc.name, attrs.get("class_names"))


@contextlib.contextmanager
def open_input(source: str | Location) -> Iterator[Input]:
    """The input at `source` (a path, URL or Location), its files closed on exit."""
    loc = locate(source)
    fs, path = _guard(loc, "its place", loc.filesystem)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"{loc}: no such file or zarr store") from None
    except Exception as exc:
        raise describe(exc, loc) from None
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"zarr\..*|xarray\..*")
        if info.get("type") == "file":
            yield _guard(loc, "the file", lambda: _open_file(fs, path, str(loc), stack))
        else:
            yield _open_zarr(loc)


def _image_shape(col: Column, where: str) -> tuple[int, ...]:
    """The store's image shape, (H, W) or (H, W, 3), from the input's; DataError otherwise."""
    shape, kind = col.shape, col.dtype.kind
    if len(shape) not in (3, 4) or 0 in shape[1:]:
        raise DataError(
            f"{where}: 'images' must be (N, height, width) or (N, height, width, channels), "
            f"got shape {shape}"
        )
    if len(shape) == 4 and shape[3] not in CHANNELS:
        raise DataError(f"{where}: 'images' of shape {shape}: {shape[3]} channels, not 3 or 1")
    if kind not in "uif":  # bool is refused: 0/1 is not 0-255 nor [0, 1] by intent
        raise DataError(
            f"{where}: 'images' must be integers 0-255 or floats in [0, 1], got {col.dtype}"
        )
    if shape[0] == 0:
        raise DataError(f"{where}: 'images' holds no images")
    return shape[1:3] if len(shape) == 3 or shape[3] == 1 else shape[1:]


def _pixels(block: np.ndarray, where: str, start: int) -> np.ndarray:
    """A block of input rows as uint8 (range checked); a gray 4th axis dropped."""
    if block.ndim == 4 and block.shape[3] == 1:
        block = block[..., 0]
    kind, rows = block.dtype.kind, f"(rows {start}-{start + len(block) - 1})"
    if kind == "f" and not np.isfinite(block).all():
        raise DataError(f"{where}: 'images' holds NaN or infinite values {rows}")
    top = 1 if kind == "f" else 255
    if block.size and (block.min() < 0 or block.max() > top):
        raise DataError(f"{where}: 'images' {block.dtype} values must lie in [0, {top}] {rows}")
    if kind == "f":  # rint: round half to even, in float64 (exact for float16/32 input)
        return np.rint(block.astype(np.float64) * 255).astype(np.uint8)
    return block.astype(np.uint8)


def _strings(values: np.ndarray) -> bool:
    """A 1-D array of str (numpy unicode, object or StringDType)."""
    return values.ndim == 1 and all(isinstance(v, str) for v in values.tolist())


def _labels(inp: Input, n: int) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """The labels (uint8) and class names; (None, None) for an unlabelled input."""
    where, cols, names = inp.where, inp.columns, _class_names(inp)
    if "labels" not in cols:
        if names is not None:
            raise DataError(f"{where}: 'class_names' without 'labels'")
        return None, None
    col = cols["labels"]
    if len(col.shape) != 1 or col.dtype.kind not in "ui":
        raise DataError(f"{where}: 'labels' must be a 1-D integer array, got {col.dtype}")
    if col.shape[0] != n:
        raise DataError(f"{where}: {col.shape[0]} labels for {n} images")
    labels = col.read(0, n)
    if labels.min() < 0 or labels.max() > 255:
        raise DataError(f"{where}: labels must lie in 0-255")
    top = int(labels.max())
    if names is None:
        return labels.astype(np.uint8), tuple(str(c) for c in range(top + 1))
    if top >= len(names):
        raise DataError(f"{where}: label {top} but only {len(names)} class names")
    return labels.astype(np.uint8), names


def _class_names(inp: Input) -> tuple[str, ...] | None:
    """The class names given as a variable or (a zarr group) an attr; they must agree."""
    found = []
    if "class_names" in inp.columns:
        col = inp.columns["class_names"]
        found.append(col.read(0, col.shape[0]) if len(col.shape) == 1 else np.zeros((1, 1)))
    if inp.attr_names is not None:
        found.append(np.asarray(inp.attr_names, dtype=object))
    for values in found:
        if not _strings(values) or len(set(values.tolist())) != len(values):
            raise DataError(f"{inp.where}: 'class_names' must be a 1-D array of distinct strings")
    if len(found) == 2 and found[0].tolist() != found[1].tolist():
        raise DataError(f"{inp.where}: the 'class_names' variable and attr differ")
    return tuple(found[0].tolist()) if found else None


def _is_test(inp: Input, n: int) -> np.ndarray:
    """The test mask: from "train"/"test" strings or a bool is_test; all train when absent."""
    col = inp.columns.get("split")
    if col is None:
        return np.zeros(n, bool)
    if len(col.shape) != 1 or col.shape[0] != n:
        raise DataError(f"{inp.where}: 'split' must be 1-D with one entry per image ({n})")
    split = col.read(0, n)
    if split.dtype == bool:
        return split
    if _strings(split) and np.isin(split.astype(object), ["train", "test"]).all():
        return split.astype(object) == "test"
    raise DataError(f"{inp.where}: 'split' must be the strings train/test or a bool is_test")


def plan(inp: Input) -> Plan:
    """A Plan whose rows(start, stop) read, check and convert those input rows.

    The attrs (fingerprint included) are complete once the last rows are made: the
    writer reads them after every row (as for kmclust.data.images).
    """
    images = inp.columns.get("images")
    if images is None:
        raise DataError(f"{inp.where}: no 'images'")
    shape, n = _image_shape(images, inp.where), images.shape[0]
    labels, names = _labels(inp, n)
    is_test = _is_test(inp, n)
    digest = None
    if inp.file_sha256 is None:  # zarr: a digest of the content streamed
        head = {k: [c.dtype.str, list(c.shape)] for k, c in sorted(inp.columns.items())}
        digest = hashlib.sha256(json.dumps({"kind": inp.kind, **head}, sort_keys=True).encode())
    step = max(1, READ_BYTES // (images.dtype.itemsize * int(np.prod(images.shape[1:]))))
    attrs: dict[str, Any] = {}
    log.info("%s: %s of %d images %s, %s", inp.where, inp.kind, n, shape, images.dtype)

    def rows(start: int, stop: int) -> dict[str, np.ndarray]:
        out = np.empty((stop - start, *shape), np.uint8)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            block = images.read(a, b)
            if digest is not None:
                digest.update(np.ascontiguousarray(block).data)
            out[a - start : b - start] = _pixels(block, inp.where, a)
        if stop == n:
            attrs.update(_attrs(inp, digest, labels, names, is_test))
        block = {"images": out, "is_test": is_test[start:stop]}
        if labels is not None:
            block["labels"] = labels[start:stop]
        return block

    return Plan(n, tuple(shape), rows, attrs, labelled=labels is not None)


def _attrs(inp: Input, digest: Any, labels, names, is_test: np.ndarray) -> dict[str, Any]:
    """The store's attrs once every row is read: digests, fingerprint, input kind, names."""
    if digest is None:
        sha = {inp.name: inp.file_sha256()}
    else:
        for part in (labels, is_test):
            if part is not None:
                digest.update(np.ascontiguousarray(part).data)
        digest.update(json.dumps(names).encode())
        sha = {inp.name: digest.hexdigest()}
    doc = json.dumps(sorted(sha.items()), sort_keys=True)  # kmclust.data.stores' formula
    fingerprint = hashlib.sha256(doc.encode()).hexdigest()
    attrs = {"sha256": sha, "fingerprint": fingerprint, "input_format": inp.kind}
    attrs["labelled"] = labels is not None
    if names is not None:
        attrs["class_names"] = list(names)
    return attrs


def stage_array(
    source: str | Location | None, write: Callable[[Plan], None], **options: object
) -> None:
    """Stage the input at `source`: `write(plan)` writes the store whose rows the plan reads.

    `source`: a path or URL; a Location carries storage options for a URL (the CLI's
    --storage-options). `options` (the images source's) are refused.
    """
    if source is None:
        raise ConfigError(
            "array needs --from PATH: an .npy or .npz file, or a zarr array or group "
            "(images; optionally labels, split, class_names)"
        )
    if options:
        raise ConfigError(f"--{sorted(options)[0]} applies only to the images source")
    with open_input(source) as inp:
        write(plan(inp))
