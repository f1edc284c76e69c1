"""Shared plumbing for the thin entry points in jobs/ and data/."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

from kmclust.errors import ConfigError, KmclustError

log = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors end, after the usage, as run_main's one ``error:`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise ConfigError(message)


#: loggers kept at WARNING whatever the verbosity
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "gcsfs", "adlfs")


def setup_logging(verbose: bool = False) -> None:
    """Configure root logging for a job (libraries only create loggers)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # object-storage clients: their INFO lines are noise, their DEBUG lines carry request
    # headers (access key ids, signatures): never shown, even with -v
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
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


@contextlib.contextmanager
def progress(label: str, unit: str = "cell") -> Iterator[Callable[[int, int, str], None]]:
    """A progress callback ``(done, total, note)`` for the block it opens.

    On a terminal it redraws one tqdm bar on stderr (done/total, elapsed, rate and the note);
    otherwise, when stderr is a log file or a pipe, it logs one line a call, which reads better
    there than a redrawn bar. The bar is closed when the block ends, so nothing of it can come
    after an error line printed later.
    """
    if not sys.stderr.isatty():
        start = time.perf_counter()

        def report(done: int, total: int, note: str = "") -> None:
            elapsed = time.perf_counter() - start
            log.info("%s: %d/%d %ss in %.1f s %s", label, done, total, unit, elapsed, note)

        yield report
        return
    from tqdm import tqdm  # here: every command imports this module, few draw a bar
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:

        def report(done: int, total: int, note: str = "") -> None:
            bar.total = total
            bar.update(done - bar.n)
            bar.set_postfix_str(note)  # and redraw

        with logging_redirect_tqdm():  # log lines above the bar, not through it
            yield report
