"""Draw the figures and REPORT.md of a sweep's results store.

Writes into --out (default: NAME-report/ beside the store NAME.zarr). --k/--init/--seed
choose the cell whose cluster representatives are drawn (default: the largest k,
each init, the seed with median J).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kmclust.cli import ArgumentParser, setup_logging
from kmclust.errors import ConfigError
from kmclust.location import storage_options
from kmclust.sweep.config import MAX_INT32, MAX_SEED, integer

log = logging.getLogger(__name__)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``report``; ``prog`` names the command in usage lines."""
    p = ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "store",
        help="results store written by the sweep: a .zarr folder or an fsspec URL (s3://…)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder, local (default: NAME-report/ beside the store; for a URL "
        "results/NAME-report/)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        type=storage_options,
        help="for a URL: fsspec storage options as a JSON object",
    )
    p.add_argument("--k", type=int, default=None, help="k of the cell whose centroids are drawn")
    p.add_argument("--init", default=None, help="init of that cell")
    p.add_argument("--seed", type=int, default=None, help="seed of that cell")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Check the options, write the report and print REPORT.md's path."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    # after argument parsing: --help stays fast
    from kmclust.report.document import default_out_dir, write_report

    cell = (args.k, args.init, args.seed)
    if any(v is not None for v in cell) and any(v is None for v in cell):
        raise ConfigError("--k, --init and --seed choose one cell together: give all three or none")
    representative = cell if args.k is not None else None
    if representative is not None:
        integer("--k", args.k, 1, MAX_INT32)
        integer("--seed", args.seed, 0, MAX_SEED)
    out = Path(args.out) if args.out is not None else default_out_dir(args.store)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: name the report's folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    path = write_report(
        args.store, out, representative=representative, storage_options=args.storage_options
    )
    print(path)
    return 0
