"""The ``kmclust`` command: ``kmclust stage|sweep|report|bench [options]``.

Each subcommand is the same code as its script (data/stage.py, jobs/sweep.py, jobs/report.py,
jobs/bench.py); ``kmclust COMMAND --help`` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kmclust import __version__
from kmclust.cli import ArgumentParser, run_main

#: subcommand → its one-line help (each module is imported only when its command runs)
COMMANDS = {
    "stage": "stage an MNIST-like source into a chunked zarr store",
    "sweep": "run the k × init × seed grid on Dask: results store + report",
    "report": "draw the figures and REPORT.md of a sweep's results store",
    "bench": "benchmark against scikit-learn, dask-ml (in a source checkout)",
}


def build_parser() -> argparse.ArgumentParser:
    """The top level: --version and the subcommands (their own options are parsed by them)."""
    p = ArgumentParser(
        prog="kmclust",
        description="k-means of MNIST-like images on Dask: stage the data, sweep k × init × seed, "
        "report, benchmark.",
        epilog="`kmclust COMMAND --help` lists the options of COMMAND.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's ``main`` with the arguments after its name."""
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(f"kmclust.commands.{args.command}")
    prog = f"kmclust {args.command}"
    if args.command == "bench":  # may re-execute this process, only when it is the command
        return module.main(rest, prog, as_command=argv is None)
    return module.main(rest, prog)


def console() -> int:
    """The console-script entry point: errors end as one ``error:`` line."""
    return run_main(main)
