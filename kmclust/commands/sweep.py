"""Run the k × init × seed k-means grid on Dask and write results + report.

Default (no options but --scheduler local): the original MNIST study done
properly — 100 training images per digit from the embedded MNIST subset,
k = 5…20 × {random, data} × 10 seeds, the rest of the images held out.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kmclust.cli import ArgumentParser, progress, setup_logging
from kmclust.errors import ConfigError
from kmclust.location import Location, merge_options, storage_options
from kmclust.sweep import config as options

log = logging.getLogger(__name__)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``sweep``; ``prog`` names the command in usage lines."""
    p = ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        default="mnist-subset",
        help="a staged store (a path or an fsspec URL such as s3://bucket/x.zarr) or a source "
        "name (mnist-subset, fashion-mnist, mnist); default %(default)s",
    )
    p.add_argument(
        "--k",
        default="5:20",
        help="k values: inclusive range 5:20 or list 5,10,20 (default %(default)s)",
    )
    p.add_argument(
        "--init",
        default="random,data",
        help="initialisations: random, data, k-means++, k-means|| "
        "(comma list; default %(default)s)",
    )
    p.add_argument(
        "--seeds",
        default="10",
        help="number of seeds N (0…N-1) or a list 0,3,7 (default %(default)s)",
    )
    train = p.add_mutually_exclusive_group()
    train.add_argument(
        "--train-per-class",
        type=int,
        default=100,
        help="stratified training sample size per class; the rest is held out "
        "(default %(default)s)",
    )
    train.add_argument(
        "--train",
        choices=["all"],
        help="'all': use the store's own train/test split (needed for unlabelled stores)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the training sample draw (default %(default)s)",
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="stop when every centroid moved ≤ tol (L2; default %(default)g)",
    )
    p.add_argument(
        "--max-iter",
        type=int,
        default=100,
        help="at most this many Lloyd iterations (default %(default)s)",
    )
    p.add_argument(
        "--chunk-rows", type=int, default=None, help="rows per data chunk (default: the store's)"
    )
    p.add_argument(
        "--silhouette-sample",
        type=int,
        default=options.SILHOUETTE_SAMPLE,
        help="training rows (a seeded sample) the silhouette is computed on; 0: none "
        "(default %(default)s)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="results store: a path or an fsspec URL (default results/<dataset>.zarr)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        type=storage_options,
        help="for URLs: fsspec storage options as a JSON object (credentials, endpoint); "
        "over the --scheduler profile's storage_options key by key; never recorded or shown",
    )
    p.add_argument(
        "--break-lock",
        action="store_true",
        help="take over the results store's lock from a job that is no longer running",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="complete an existing results store of the same config",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing kmclust results store (only those: see README, Reliability)",
    )
    p.add_argument(
        "--scheduler",
        default="local",
        help="'local' (LocalCluster), 'threads' (no cluster), tcp://HOST:PORT / tls://…, "
        "or a profile name in --cluster-config (default %(default)s)",
    )
    p.add_argument(
        "--cluster-config",
        type=Path,
        default=None,
        help="cluster profiles (default ./cluster.yaml)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10,
        help="seconds to wait for a scheduler and, for a cluster it builds, its first worker "
        "(default %(default)s)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def check_args(args: argparse.Namespace) -> tuple[dict, Path | Location]:
    """Every option checked as a value, and --out as a place, before any heavy import or write."""
    train_per_class = None
    if args.train != "all":
        train_per_class = options.integer("--train-per-class", args.train_per_class, 1)
    config = dict(
        dataset=args.dataset,
        ks=options.parse_ks(args.k),
        inits=options.parse_inits(args.init),
        seeds=options.parse_seeds(args.seeds),
        train_per_class=train_per_class,
        data_seed=options.integer("--data-seed", args.data_seed, 0, options.MAX_SEED),
        tol=options.number("--tol", args.tol),
        max_iter=options.integer("--max-iter", args.max_iter, 1),
        chunk_rows=None
        if args.chunk_rows is None
        else options.integer("--chunk-rows", args.chunk_rows, 1),
        silhouette_sample=options.integer("--silhouette-sample", args.silhouette_sample),
    )
    options.number("--timeout", args.timeout, above=True)
    if not args.dataset.strip():
        raise ConfigError("--dataset is empty: give a staged store or a source name")
    inputs = [args.dataset]
    if "/" not in args.dataset and not args.dataset.endswith(".zarr"):  # a source staged into data/
        inputs.append(str(Path("data") / f"{args.dataset}.zarr"))
    out = (
        args.out
        if args.out is not None
        else str(Path("results") / f"{Path(args.dataset).stem}.zarr")
    )
    return config, options.check_out(
        out,
        inputs=tuple(inputs),
        replace=args.overwrite,
        resume=args.resume,
        storage_options=args.storage_options,
    )


def profile_options(args: argparse.Namespace) -> dict | None:
    """The storage options of the --scheduler profile in cluster.yaml, with --storage-options
    over them key by key (the command line wins)."""
    if args.scheduler == "threads":
        return args.storage_options
    from kmclust.cluster.profiles import profile_storage_options

    profile = profile_storage_options(args.scheduler, args.cluster_config)
    return merge_options(profile, args.storage_options) or args.storage_options


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Check every option, run (or complete) the sweep, print its table and write the report."""
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    args.storage_options = profile_options(args)
    values, out = check_args(args)
    from kmclust.lloyd.placement import n_threads
    from kmclust.sweep import run as sweep

    config = options.SweepConfig(**values)
    print(sweep.estimate_runs(config))
    if args.dry_run:
        print(f"would write {out} (resume={args.resume}) using scheduler {args.scheduler!r}")
        return 0
    with sweep.scheduler(args.scheduler, args.cluster_config, args.timeout) as client:
        if client is not None:
            print(f"Dask dashboard: {client.dashboard_link}")
        with progress("sweep") as bar:
            outcome = sweep.run_sweep(
                config,
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                parallel=n_threads(client),
                on_batch=lambda done, total, k: bar(done, total, f"(k={k} written)"),
                storage_options=args.storage_options,
                break_lock=args.break_lock,
            )
    from kmclust.report import document as report
    from kmclust.report.results import with_cells_loaded
    from kmclust.sweep.store import open_store

    results = with_cells_loaded(open_store(out))
    print(report.format_table(report.summary_table(results)))
    print(
        f"{outcome.n_computed} of {outcome.n_cells} cells computed in {outcome.seconds:.1f} s; "
        f"results: {out}"
    )
    log.info("sweep phases: %s", outcome.breakdown())
    if not args.no_report:
        folder = (
            report.default_out_dir(out.url)
            if isinstance(out, Location)
            else out.with_name(out.stem + "-report")
        )
        path = report.write_report(results, folder)
        print(f"report: {path}")
    if outcome.failed:
        print(f"{len(outcome.failed)} cell(s) failed:", file=sys.stderr)
        for line in outcome.failed[:20]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
