"""Stage an MNIST-like source into a chunked zarr store: data/stage.py SOURCE [options].

Sources: mnist-subset (built in), mnist (--from DIR or --download),
fashion-mnist (Debian's dataset-fashion-mnist, or --from DIR), digits
(scikit-learn's 8 x 8 digits, built in), array (--from PATH|URL: an .npy or
.npz file, or a zarr array or group; labels optional), images (--from DIR, a
folder of PNG/JPEG/BMP/TIFF/GIF files, one sub-folder per class or none),
synthetic (--from STORE --rows N [--seed S]).
See data/README.md and README.md ("Your own images").
"""

from __future__ import annotations

import argparse
import logging
import time

from kmclust.cli import ArgumentParser, setup_logging
from kmclust.data.images import MODES, PARALLEL, parse_size
from kmclust.data.stores import CHUNK_BYTES, CHUNK_ROWS, SOURCES, stage, store_summary
from kmclust.errors import ConfigError
from kmclust.location import locate, storage_options

log = logging.getLogger(__name__)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``stage``; ``prog`` names the command in usage lines."""
    p = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("source", choices=SOURCES)
    p.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR",
        help="input directory (mnist, fashion-mnist), .npy/.npz file or zarr array/group, "
        "a path or a URL read with --storage-options (array), folder of images (images) or "
        "parent store (synthetic)",
    )
    p.add_argument(
        "--out",
        metavar="PATH|URL",
        help="store to write: a path (default data/SOURCE.zarr) or an fsspec URL such as "
        "s3://bucket/SOURCE.zarr (staged locally, then uploaded)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        type=storage_options,
        help="for a URL (--out, and array's --from): fsspec storage options as a JSON "
        'object, e.g. \'{"profile": "lab"}\' (credentials: the backend\'s usual environment '
        "variables)",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help=f"rows per chunk (default {CHUNK_ROWS}, fewer for images so that a chunk stays "
        f"within {CHUNK_BYTES // 2**20} MiB)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing store")
    p.add_argument(
        "--download", action="store_true", help="mnist: fetch the IDX files from public mirrors"
    )
    p.add_argument("--rows", type=int, metavar="N", help="synthetic: number of rows")
    p.add_argument(
        "--seed", type=int, default=0, metavar="S", help="synthetic: random seed (default 0)"
    )
    p.add_argument(
        "--size",
        type=_size,
        metavar="HxW",
        help="images: resize every image to H x W pixels with Pillow's "
        "Image.Resampling.BILINEAR filter (antialiased when shrinking); without it all images "
        "must share one size",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="images: L (grayscale) or RGB for every image (default: RGB if any image is "
        "in colour, else L)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="images: parallel decoders (default: the CPU count; 1 for a few hundred files)",
    )
    p.add_argument(
        "--parallel",
        choices=PARALLEL,
        help=f"images: decode in worker processes or threads (default {PARALLEL[0]})",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--size ")) from None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Stage one source and print the store's summary."""
    args = vars(build_parser(prog).parse_args(argv))
    setup_logging(args.pop("verbose"))
    t0 = time.perf_counter()
    source = args.pop("source")
    if source == "array" and args["from_dir"] is not None:  # the input may be a URL too
        args["from_dir"] = locate(args["from_dir"], args["storage_options"])
    path = stage(source, **args)
    print(f"{store_summary(path)}, staged in {time.perf_counter() - t0:.1f} s")
    return 0
