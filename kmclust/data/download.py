"""Fetch the original MNIST IDX files from public mirrors with pooch, verified by SHA-256.

pooch streams each file to a temporary file beside its destination, checks its SHA-256 against
the pinned value and moves it into place only when it matches; a file already present with the
right digest is not fetched again (the cache), and a damaged one is fetched anew. What pooch
does not do is kept here: the mirrors are tried in order (a mirror that fails or serves other
bytes is logged and the next one is tried), a download is cut off past a size bound, and every
failure ends as one DataError line. Mirrors and checksums are parameters so tests can use a
local server. pooch and requests are imported only when a download starts: every
command imports this module, and most never download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from kmclust.errors import DataError

log = logging.getLogger(__name__)

# Mirrors torchvision and TensorFlow use (yann.lecun.com now refuses robots).
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# From tensorflow/datasets, tensorflow_datasets/url_checksums/mnist.txt
# (URL, size, SHA-256 of each file on storage.googleapis.com/cvdf-datasets).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
MNIST_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte.gz": 9_912_422,
    "train-labels-idx1-ubyte.gz": 28_881,
    "t10k-images-idx3-ubyte.gz": 1_648_877,
    "t10k-labels-idx1-ubyte.gz": 4_542,
}

MAX_DOWNLOAD = 1 << 30  # bytes; no MNIST-like file comes close


def default_cache_dir() -> Path:
    """Where --download puts MNIST when no --from DIR is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kmclust" / "mnist"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _TooLarge(ValueError):
    """A download past the size bound (a ValueError, so pooch deletes its temporary file)."""


class _CappedFile:
    """The file pooch's HTTP downloader writes into, refusing to grow past max_bytes."""

    def __init__(self, f: BinaryIO, max_bytes: int):
        self.f, self.max_bytes, self.size = f, max_bytes, 0

    def write(self, chunk: bytes) -> int:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _TooLarge(f"more than {self.max_bytes:,} bytes")
        return self.f.write(chunk)

    def flush(self) -> None:
        self.f.flush()


def _downloader(timeout: float, max_bytes: int) -> Callable[[str, str, object], None]:
    """A pooch downloader: HTTP(S) with a timeout, a size bound and, on a terminal, a tqdm bar."""
    import pooch

    # pooch draws its bar only once the server has answered, so a 404 leaves no empty bar
    http = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=timeout)

    def download(url: str, output_file: str, pup: object) -> None:
        with open(output_file, "w+b") as f:
            http(url, _CappedFile(f, max_bytes), pup)

    return download


def _reason(exc: Exception) -> str:
    """One short line saying why a mirror failed."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    if isinstance(exc, _TooLarge):
        return str(exc)
    if isinstance(exc, ValueError):  # pooch's hash check
        return "checksum mismatch (not the pinned SHA-256)"
    return " ".join(str(exc).split())


def download_files(
    dest_dir: str | Path,
    checksums: Mapping[str, str],
    mirrors: Sequence[str],
    timeout: float = 60.0,
    max_bytes: int = MAX_DOWNLOAD,
) -> dict[str, Path]:
    """Make dest_dir hold every file in `checksums` (name -> sha256), trying `mirrors` in turn.

    A file already present with the right digest is kept. Raises DataError
    when some file cannot be had from any mirror.
    """
    dest_dir = Path(dest_dir)
    if not mirrors:
        raise DataError("no download mirrors given")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create download directory {dest_dir}: {exc.strerror or exc}"
        ) from None
    import pooch
    import requests

    download = _downloader(timeout, max_bytes)
    pooch_log = pooch.get_logger()  # pooch's own logger prints to stderr: keep its info lines out
    level = pooch_log.level
    pooch_log.setLevel(logging.WARNING)
    paths: dict[str, Path] = {}
    try:
        for name, sha in checksums.items():
            failures = []
            for mirror in mirrors:
                url = mirror.rstrip("/") + "/" + name
                log.info("fetching %s (if not cached in %s)", url, dest_dir)
                try:
                    got = pooch.retrieve(url, sha, fname=name, path=dest_dir, downloader=download)
                except (OSError, ValueError, requests.RequestException) as exc:
                    failures.append(f"{url}: {_reason(exc)}")
                    log.warning("%s", failures[-1])
                else:
                    paths[name] = Path(got)
                    break
            else:
                raise DataError(
                    f"could not download {name} from any mirror: " + "; ".join(failures)
                )
    finally:
        pooch_log.setLevel(level)
    return paths


def fetch_mnist(dest_dir: str | Path | None = None) -> Path:
    """Download and verify the four MNIST files into dest_dir (default: the cache dir)."""
    dest = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    download_files(dest, MNIST_SHA256, MNIST_MIRRORS)
    return dest
