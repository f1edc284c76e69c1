"""The images source: a folder of PNG, JPEG, BMP, TIFF or GIF files, decoded in parallel.

Layout (torchvision's ImageFolder convention): DIR holds one folder per class
(class names = folder names, sorted; sub-folders allowed) or only image files
(unlabelled), or exactly `train/` and `test/` laid out so with the same
classes (the store's split). Files count by extension (`EXTENSIONS`, any
case); other and hidden files are skipped and counted in the log. Order:
train then test, classes by name, files by name (a folder's before its
sub-folders').

Pixels: Pillow's decode of the first frame. The store is gray (N, H, W) when
its images are (the first file decides; a colour file met later restarts the
pass in RGB) and RGB (N, H, W, 3), with a `channel` dim, otherwise; `mode`
("L"/"RGB") forces one. Each image is `Image.convert(mode)` (alpha dropped)
and, with `size`, `Image.resize((W, H), BILINEAR)`. 16-bit/float images are
refused.

Unlabelled stores have no `labels` variable and no `class_names` attr, and
carry the attr `labelled: false`: open_images and verify_store accept that.

Deterministic: batches run on a dask scheduler (threads or processes) but land
in the order above, so a folder and options give the same array bytes
whatever the parallelism. The fingerprint covers every file's path (hence
label and split) and SHA-256, and the options.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmclust.cli import progress
from kmclust.data.parallel import BATCH, PARALLEL, Runner, reporter
from kmclust.data.staging import Plan
from kmclust.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "images"
EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff")
MODES = ("L", "RGB")
SPLITS = ("train", "test")
RESAMPLE = "bilinear"  # Image.Resampling.BILINEAR (with Pillow's antialiasing when shrinking)
GRAY_MODES = ("1", "L", "LA", "La")
MAX_CLASSES = 256  # labels are uint8


@dataclass(frozen=True)
class Listing:
    """The image files of a folder in store order, with their labels and split."""

    root: Path
    files: tuple[str, ...]  # paths relative to root
    labels: np.ndarray | None  # (N,) uint8 class index; None: unlabelled
    is_test: np.ndarray  # (N,) bool
    class_names: tuple[str, ...] | None
    skipped: int  # files that are not images by extension (or hidden)


def parse_size(text: str) -> tuple[int, int]:
    """HxW (e.g. 28x28) as (height, width); ConfigError otherwise."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) == 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise ConfigError(f"--size must be HxW with positive integers (e.g. 28x28), got {text!r}")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _walk(root: str, sub: str) -> tuple[list[str], int]:
    """Image files under root/sub as paths relative to root (sorted by name, a folder's files
    before its sub-folders; hidden folders skipped), and the count of other files."""
    found, skipped, cut = [], 0, len(root) + 1
    for here, dirs, files in os.walk(os.path.join(root, sub)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = here[cut:].replace(os.sep, "/")
        images = [f"{rel}/{name}" for name in sorted(files) if _is_image(name)]
        found += images
        skipped += len(files) - len(images)
    return found, skipped


def _one_part(root: str, sub: str) -> tuple[tuple[str, ...] | None, list[list[str]], int]:
    """root/sub of class folders → (class names, files per class, skipped); of images only →
    (None, [files], skipped). Files are relative to root."""
    folder = Path(root, sub)
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    top = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    skipped = sum(1 for e in entries if e.is_file() and not _is_image(e.name))
    if not dirs:
        if not top:
            raise DataError(f"{folder}: no images (none of {', '.join(EXTENSIONS)}) in the folder")
        return None, [[f"{sub}/{name}".lstrip("/") for name in top]], skipped
    if top:
        raise DataError(
            f"{folder}: holds both images ({top[0]}) and folders ({dirs[0]}); put every image "
            "in a class folder, or use no folders for unlabelled images"
        )
    if len(dirs) > MAX_CLASSES:
        raise DataError(f"{folder}: {len(dirs)} class folders; at most {MAX_CLASSES}")
    per_class = []
    for name in dirs:
        files, other = _walk(root, os.path.join(sub, name))
        if not files:
            raise DataError(f"{folder / name}: class folder with no images")
        per_class.append(files)
        skipped += other
    return tuple(dirs), per_class, skipped


def list_folder(root: str | Path) -> Listing:
    """The images of `root` in store order; DataError on a missing, empty or ambiguous folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (the images source reads a folder of images)")
    names = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    splits = SPLITS if names & set(SPLITS) else ("",)
    if splits == SPLITS and names != set(SPLITS):
        raise DataError(
            f"{root}: a split layout holds exactly the folders train/ and test/, "
            f"found {', '.join(sorted(names))}"
        )
    parts = [_one_part(str(root), s) for s in splits]
    if len(parts) == 2 and parts[0][0] != parts[1][0]:
        a, b = (set(p[0] or ()) for p in parts)
        raise DataError(
            f"{root}: train/ and test/ must hold the same class folders (or both none); "
            f"only in train: {', '.join(sorted(a - b)) or '-'}; "
            f"only in test: {', '.join(sorted(b - a)) or '-'}"
        )
    files, labels, is_test = [], [], []
    for split, (_, per_class, _) in zip(splits, parts):
        for label, members in enumerate(per_class):
            files += members
            labels += [label] * len(members)
            is_test += [split == "test"] * len(members)
    names_ = parts[0][0]
    labels_ = None if names_ is None else np.asarray(labels, np.uint8)
    skipped = sum(p[2] for p in parts)
    return Listing(root, tuple(files), labels_, np.asarray(is_test, bool), names_, skipped)


# ------------------------------------------------------------------ per-batch work (in workers)


def _cannot(path: Path, exc: BaseException) -> DataError:  # one line naming the file
    return DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})")


def _kind(image, path: Path) -> str:
    """The store mode an image asks for: "L" (grays) or "RGB"; DataError for 16-bit/float."""
    mode = image.mode
    if mode.startswith(("I", "F")):
        raise DataError(f"{path}: {mode} (16-bit or float) images are not supported; save 8-bit")
    if mode in GRAY_MODES:
        return "L"
    if mode in ("P", "PA"):
        rgb = np.asarray(image.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
        return "L" if (rgb == rgb[:, :1]).all() else "RGB"
    return "RGB"


class Restart(Exception):
    """A batch met what the guessed store cannot hold: "colour" in a gray store, or "size"."""

    def __init__(self, reason: str, file: str):
        super().__init__(reason, file)
        self.reason, self.file = reason, file


def probe_batch(root: str, files: Sequence[str]) -> list[tuple[int, int, str]]:
    """(height, width, "L"/"RGB") of each file, from its header."""
    from PIL import Image

    out = []
    for rel in files:
        path = Path(root, rel)
        try:
            with Image.open(path) as image:
                width, height = image.size
                out.append((height, width, _kind(image, path)))
        except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, SyntaxError…)
            raise exc if isinstance(exc, DataError) else _cannot(path, exc) from None
    return out


def decode_batch(
    root: str, files: Sequence[str], mode: str, shape: tuple[int, int], resize: bool, guess: bool
) -> tuple[np.ndarray, list[str]]:
    """The files' pixels, (n, H, W) for "L" or (n, H, W, 3) for "RGB", and their SHA-256s.

    Without `resize` every image must be `shape` (else Restart "size"); with `guess` (the
    mode "L" guessed, not asked for) every image must be gray (else Restart "colour").
    """
    from PIL import Image

    out, digests = [], []
    for rel in files:
        path = Path(root, rel)
        try:
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as image:
                if guess and _kind(image, path) != "L":
                    raise Restart("colour", rel)
                if not resize and image.size != (shape[1], shape[0]):
                    raise Restart("size", rel)
                if image.mode != mode:
                    image = image.convert(mode)  # the first frame; alpha dropped
                if resize:
                    image = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
                out.append(np.asarray(image))  # decodes the first frame in full
        except Exception as exc:  # a truncated or corrupt file fails here
            raise exc if isinstance(exc, (Restart, DataError)) else _cannot(path, exc) from None
        digests.append(hashlib.sha256(raw).hexdigest())
    return np.stack(out), digests


# ------------------------------------------------------------------ the plan


def _sizes_error(listing: Listing, runner: Runner) -> DataError:
    """Every size seen (with a file of each) in one error, from a pass over the headers."""
    args = [(str(listing.root), listing.files[c]) for c in runner.batches(len(listing.files))]
    with progress("image headers read", unit="file") as report:
        add = reporter(report, len(listing.files))
        done = runner.map(probe_batch, args, lambda i: add(len(args[i][1])))
    first: dict[tuple[int, int], str] = {}
    for rel, (h, w, _) in zip(listing.files, (p for batch in done for p in batch)):
        first.setdefault((h, w), rel)
    seen = "; ".join(f"{h}x{w} (e.g. {rel})" for (h, w), rel in sorted(first.items()))
    return DataError(
        f"{listing.root}: images of {len(first)} sizes (HxW): {seen}; "
        f"give --size HxW to resize them all ({RESAMPLE})"
    )


def _manifest(files: Sequence[str], digests: Sequence[str]) -> str:
    """SHA-256 over "path<TAB>sha256" lines in store order."""
    text = "".join(f"{rel}\t{d}\n" for rel, d in zip(files, digests))
    return hashlib.sha256(text.encode()).hexdigest()


def _attrs(listing: Listing, digests: list[str], mode: str, size: tuple | None) -> dict:
    """The store's attrs: the manifest digest, the options and a fingerprint over both."""
    sha = {listing.root.resolve().name: _manifest(listing.files, digests)}
    options = {"image_mode": mode, "size": list(size) if size else None}
    options["resample"] = RESAMPLE if size else None
    doc = json.dumps({"sha256": sorted(sha.items()), **options}, sort_keys=True)
    attrs = {"sha256": sha, "fingerprint": hashlib.sha256(doc.encode()).hexdigest(), **options}
    attrs.update({"labelled": listing.labels is not None, "skipped_files": listing.skipped})
    if listing.class_names is not None:
        attrs["class_names"] = list(listing.class_names)
    return attrs


def _plan(
    listing: Listing,
    runner: Runner,
    add: Callable[[int], None],
    mode: str,
    shape: tuple[int, int],
    resize: bool,
    guess: bool,
) -> Plan:
    """A Plan whose rows(start, stop) decode those files on the runner's pool, in batches.

    The fingerprint covers every file's SHA-256, which the rows compute: it joins the attrs
    once the last rows are made (the writer reads the attrs after every row).
    """
    n, digests, attrs = len(listing.files), [], {}

    def rows(start: int, stop: int) -> dict[str, np.ndarray]:
        cuts = runner.batches(stop - start)
        files = [listing.files[start + c.start : start + c.stop] for c in cuts]
        args = [(str(listing.root), f, mode, shape, resize, guess) for f in files]
        done = runner.map(decode_batch, args, lambda i: add(len(files[i])))
        for _, d in done:
            digests.extend(d)
        if stop == n:
            attrs.update(_attrs(listing, digests, mode, shape if resize else None))
        out = {
            "images": np.concatenate([b for b, _ in done]),
            "is_test": listing.is_test[start:stop],
        }
        if listing.labels is not None:
            out["labels"] = listing.labels[start:stop]
        return out

    full = (*shape, 3) if mode == "RGB" else tuple(shape)
    return Plan(n, full, rows, attrs, labelled=listing.labels is not None)


def stage_folder(
    root: str | Path | None,
    write: Callable[[Plan], None],
    *,
    size: tuple[int, int] | None = None,
    mode: str | None = None,
    workers: int | None = None,
    parallel: str = PARALLEL[0],
) -> None:
    """Stage the images under `root`: `write(plan)` writes the store whose rows the plan decodes.

    workers: parallel decoders (default: the CPU count, or 1 for at most BATCH files).

    One pass decodes every file, in the mode and size of the first file unless `mode` and
    `size` say otherwise. A colour image met in a guessed gray store restarts the pass in RGB
    (write must leave nothing behind on an exception: write_store does); an image of another
    size without `size` ends in one error naming every size seen.
    """
    if root is None:
        raise ConfigError("images needs --from DIR, a folder of images (class folders optional)")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    runner = Runner(workers, parallel)  # options checked before the folder is read
    listing = list_folder(root)
    if listing.skipped:
        log.info("%s: skipped %d files that are not images by extension", root, listing.skipped)
    if workers is None and len(listing.files) <= BATCH:  # a pool would cost more than it saves
        runner = Runner(1, parallel)
    with runner:
        height, width, kind = probe_batch(str(listing.root), listing.files[:1])[0]
        shape, store_mode = size or (height, width), mode or kind
        while True:
            log.info("%s: %d images, %s, %dx%d", root, len(listing.files), store_mode, *shape)
            guess = mode is None and store_mode == "L"
            with progress("images decoded", unit="image") as report:
                add = reporter(report, len(listing.files))
                plan = _plan(listing, runner, add, store_mode, shape, size is not None, guess)
                try:
                    return write(plan)
                except Restart as exc:
                    restart = exc
            if restart.reason == "size":
                raise _sizes_error(listing, runner)
            log.info("%s is in colour: staging every image as RGB", restart.file)
            store_mode = "RGB"
