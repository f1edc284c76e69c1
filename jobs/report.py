"""Draw the figures and REPORT.md of a sweep's results store.

    python jobs/report.py results/NAME.zarr [--out DIR] [--k K --init I --seed S]

Writes into DIR (default: results/NAME-report/ next to the store). --k/--init/--seed
choose the cell whose cluster representatives are drawn (default: the largest k,
each init, the seed with median J).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kmclust.cli import ArgumentParser, run_main, setup_logging
from kmclust.errors import ConfigError
from kmclust.sweep.config import MAX_INT32, MAX_SEED, integer

log = logging.getLogger("kmclust.jobs.report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "store", type=Path, help="results store written by jobs/sweep.py (a .zarr folder)"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: NAME-report/ beside the store)"
    )
    p.add_argument("--k", type=int, default=None, help="k of the cell whose centroids are drawn")
    p.add_argument("--init", default=None, help="init of that cell")
    p.add_argument("--seed", type=int, default=None, help="seed of that cell")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from kmclust.report.document import (
        default_out_dir,
        write_report,
    )  # after arg parsing: --help stays fast

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
    path = write_report(args.store, out, representative=representative)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
