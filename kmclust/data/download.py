"""Fetch the original MNIST IDX files from public mirrors, verified by SHA-256.

Each file is streamed to a temporary file beside its destination, hashed while
it arrives, and renamed into place only when the digest matches the pinned
value; a mirror that fails or serves other bytes is logged and the next one is
tried. Mirrors and checksums are parameters so tests can use a local server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

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
_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    """Where --download puts MNIST when no --from DIR is given."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kmclust" / "mnist"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fetch_one(url: str, dest: Path, sha256: str, timeout: float, max_bytes: int) -> None:
    """Download url to dest via a temp file; raise ValueError/OSError on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(_BLOCK):
                size += len(block)
                if size > max_bytes:
                    raise ValueError(f"more than {max_bytes:,} bytes")
                digest.update(block)
                out.write(block)
        got = digest.hexdigest()
        if got != sha256:
            raise ValueError(f"checksum mismatch (sha256 {got[:12]}..., expected {sha256[:12]}...)")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    paths: dict[str, Path] = {}
    for name, sha in checksums.items():
        dest = dest_dir / name
        if dest.is_file():
            if file_sha256(dest) == sha:
                log.info("%s already present and verified", dest)
                paths[name] = dest
                continue
            log.warning("%s exists but its checksum does not match; fetching it again", dest)
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log.info("downloading %s", url)
            try:
                _fetch_one(url, dest, sha, timeout, max_bytes)
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code}")
            except urllib.error.URLError as exc:
                failures.append(f"{url}: {exc.reason}")
            except (OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
            else:
                paths[name] = dest
                break
            log.warning("%s", failures[-1])
        else:
            raise DataError(f"could not download {name} from any mirror: " + "; ".join(failures))
    return paths


def fetch_mnist(dest_dir: str | Path | None = None) -> Path:
    """Download and verify the four MNIST files into dest_dir (default: the cache dir)."""
    dest = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    download_files(dest, MNIST_SHA256, MNIST_MIRRORS)
    return dest
