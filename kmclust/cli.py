"""Shared plumbing for the thin entry points in jobs/ and data/."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from kmclust.errors import ConfigError, KmclustError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors end, after the usage, as run_main's one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def setup_logging(verbose: bool = False) -> None:
    """Configure root logging for a job (libraries only create loggers)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # distributed's start-up chatter drowns the job's own lines
        import dask.config

        # distributed applies its `logging` config when first imported (after this), so set both
        dask.config.set({"logging.distributed": "warning"})
        logging.getLogger("distributed").setLevel(logging.WARNING)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point; a KmclustError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except KmclustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, appended otherwise)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, note: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        fill = int(self.width * done / max(total, 1))
        bar = "#" * fill + "." * (self.width - fill)
        line = f"{self.label} [{bar}] {done}/{total} {elapsed:5.1f}s {note}"
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )
        if self.tty and done >= total:
            print(file=sys.stderr)
