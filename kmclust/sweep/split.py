"""The data of a sweep: the staged store, its training sample and held-out rest, read errors.

The image shape and the class names come from the data store here and only
here; the results store records them (its image dims and ``class_names``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmclust.data import select, sources
from kmclust.data import stores as datasets
from kmclust.errors import ConfigError, DataError, KmclustError
from kmclust.lloyd import placement
from kmclust.location import Location, locate, scrub
from kmclust.sweep.config import SweepConfig

log = logging.getLogger(__name__)


@dataclass
class DataSplit:
    """Training and held-out images of a sweep (dask arrays, uint8, one flat row per image)."""

    name: str
    store: Path | Location
    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    fingerprint: str
    class_names: list[str]
    image_dims: tuple[str, ...]  # the store's image dims, e.g. ("y", "x")
    image_shape: tuple[int, ...]  # their sizes
    graphs: Callable[[str], tuple[object, object]] | None = None  # name → (train, test) graphs
    labelled: bool = True  # False: no labels (y_train, y_test are -1), no label metrics

    def train_rows(self) -> np.ndarray:
        """The training rows (uint8) read in this process: the driver's copy, without waiting
        for the workers' load or a transfer back from them."""
        rows = self.graphs(f"kmclust-driver-{uuid.uuid4().hex}")[0]
        return np.asarray(rows.compute(scheduler="sync"))

    def load(self) -> None:
        """Persist the images on the workers (training rows as float32: integer-valued, exact sums).

        Called again after a lost worker: every load builds its graphs afresh
        under new key names, from the zarr reads on, since a key that erred
        (KilledWorker) would stay erred under its old name and fail every
        later batch; the old keys are simply released.
        """
        fresh = uuid.uuid4().hex
        x_train, x_test = self.graphs(f"kmclust-rows-{fresh}")
        self.x_train = placement.persist_balanced(
            x_train.map_blocks(np.asarray, name=f"kmclust-train-{fresh}")
        )
        self.x_test = placement.persist_balanced(
            x_test.map_blocks(np.asarray, name=f"kmclust-test-{fresh}")
        )


def resolve_store(dataset: str, storage_options: dict | None = None) -> Path | Location:
    """A staged store path for a name or path (a Location for a URL); stages a known source
    when missing."""
    where = locate(dataset, storage_options)
    if not where.is_local:
        return where  # opened (and checked) by the workers' reads and open_images
    path = Path(dataset)
    if path.exists() or dataset.endswith(".zarr"):
        if not path.exists():
            raise DataError(f"dataset store {path} does not exist")
        return path
    if dataset not in datasets.SOURCES:
        raise DataError(
            f"dataset {dataset!r} is neither a staged store nor a known source "
            f"({', '.join(datasets.SOURCES)})"
        )
    store = datasets.default_store_path(dataset)
    if not store.exists():
        if dataset not in sources.REGISTRY or sources.REGISTRY[dataset].needs_from:
            raise DataError(
                f"{dataset} is not staged yet: run python data/stage.py {dataset} --from DIR first"
            )
        log.info("staging %s into %s", dataset, store)
        datasets.stage(dataset, store)
    return store


def staged_image_shape(dataset: str) -> tuple[int, ...] | None:
    """The image shape of an already staged store (None if not staged yet or unreadable)."""
    path = Path(dataset)
    if not path.exists() and dataset in datasets.SOURCES:
        path = datasets.default_store_path(dataset)
    try:
        return tuple(datasets.open_images(path)["images"].shape[1:])
    except KmclustError:
        return None


def _training_rows(config: SweepConfig, labels: np.ndarray, is_train: np.ndarray, store: Path):
    """Indices of the training sample: ``train_per_class`` draws per class, or the store's."""
    if config.train_per_class is None:
        train = np.flatnonzero(is_train)
        if train.size == 0:
            raise DataError(
                f"{store} has no images marked train; "
                "use --train-per-class N instead of --train all"
            )
        return train
    rng = np.random.default_rng(config.data_seed)
    picks = []
    for c in np.unique(labels[is_train]):
        members = np.flatnonzero(is_train & (labels == c))
        if config.train_per_class > members.size:
            raise ConfigError(
                f"--train-per-class {config.train_per_class} is larger than class {c} "
                f"({members.size} training images in {store})"
            )
        picks.append(rng.choice(members, config.train_per_class, replace=False))
    return np.sort(np.concatenate(picks))


def split_data(config: SweepConfig, storage_options: dict | None = None) -> DataSplit:
    """Open the store and draw the training sample (stratified, ``data_seed``).

    An unlabelled store (kmclust.data.stores.labelled) needs ``--train all``: its labels
    read as -1 and no label metric is computed.
    """
    store = resolve_store(config.dataset, storage_options)
    ds = datasets.open_images(store)
    labelled = datasets.labelled(ds)
    if not labelled and config.train_per_class is not None:
        raise ConfigError(
            f"{store} is unlabelled: --train-per-class needs class labels; "
            "use --train all (the store's own train/test split)"
        )
    try:
        # read here (synchronous scheduler): small, and no round trip through a cluster
        split = np.asarray(ds["split"].compute(scheduler="sync").values).astype(object)
        labels = (
            np.asarray(ds["labels"].compute(scheduler="sync").values).astype(np.int64)
            if labelled
            else np.full(split.size, -1, np.int64)
        )
    except Exception as exc:  # zarr raises plain ValueErrors for damaged chunks
        raise load_error(exc, store) from None
    train = _training_rows(config, labels, split == "train", store)
    if config.train_per_class is None:
        test = np.flatnonzero(split == "test")
    else:
        test = np.setdiff1d(np.arange(labels.size), train)
    if max(config.ks) > train.size:
        raise ConfigError(f"--k: k={max(config.ks)} exceeds the {train.size} training images")
    rows = config.chunk_rows or int(datasets.flat_images(ds).chunks[0][0])

    def graphs(name: str) -> tuple[object, object]:
        flat = datasets.image_rows(store, name)

        def take(idx: np.ndarray, part: str):
            return select.take_rows(flat, idx, f"{name}-{part}").rechunk(
                (max(1, min(rows, max(1, idx.size))), -1)
            )

        return take(train, "train"), take(test, "test")

    x_train, x_test = graphs(f"kmclust-rows-{uuid.uuid4().hex}")
    names = ds.attrs.get("class_names", [str(c) for c in range(labels.max(initial=-1) + 1)])
    images = ds["images"]
    return DataSplit(
        name=str(ds.attrs.get("source", Path(str(store).rstrip("/").rsplit("/", 1)[-1]).stem)),
        store=store,
        x_train=x_train,
        y_train=labels[train],
        x_test=x_test,
        y_test=labels[test],
        graphs=graphs,
        fingerprint=datasets.fingerprint(ds),
        class_names=[str(c) for c in names],
        image_dims=tuple(str(d) for d in images.dims[1:]),
        image_shape=tuple(int(n) for n in images.shape[1:]),
        labelled=labelled,
    )


# ---------------------------------------------------------------- read errors


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def corrupt(text: str, store: Path | Location) -> DataError | None:
    """A checksum failure means a damaged store: no retry helps, restaging does."""
    if "checksum" not in text.lower():
        return None
    return DataError(
        f"data store {store} is corrupted ({text}); restage it with data/stage.py --force"
    )


def load_error(exc: Exception, store: Path | Location) -> KmclustError:
    """One readable line for a failure while reading the data (storage options scrubbed)."""
    text = one_line(exc)
    if isinstance(store, Location):
        text = scrub(text, store.options)
    if (damaged := corrupt(text, store)) is not None:
        return damaged
    if "KilledWorker" in text:
        return DataError(
            f"could not load the images of {store}: a worker died while loading them ({text}); "
            "is the workers' memory_limit too small for --chunk-rows?"
        )
    return DataError(f"could not load the images of {store}: {text}")
