"""Benchmark kmclust against scikit-learn and dask-ml on Fashion-MNIST.

Modes (each prints a table and appends a dated record to the History of BENCHMARKS.md):
  grid       the k × init × seed grid as one kmclust batch, and as the real sweep job, vs
             loops of sklearn KMeans and of faiss (fit, then predict the held-out set);
             --large-k: k 256, 512, 1024 × data init × 3 seeds, without the job
  iteration  seconds per Lloyd iteration: kmclust (uint8 and float32 input, and the
             kmclust.KMeans estimator on float32), sklearn
             lloyd/elkan, faiss, dask-ml
  scale      streaming a large synthetic store from zarr vs persisted data
  staging    staging 70,000 PNG files (written from Fashion-MNIST) vs a plain Pillow loop

Needs `apt-get install dataset-fashion-mnist`; dask-ml comes with
`pip install -e '.[bench]'`. On processors that set OPENBLAS_CORETYPE or
OPENBLAS_L2_SIZE, add --unset-openblas-env (benchmarks only).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import kmclust
from kmclust.cli import ArgumentParser, setup_logging
from kmclust.errors import ConfigError
from kmclust.lloyd.init import INITS

log = logging.getLogger(__name__)
#: the grid's defaults, and its --large-k preset (k data rows: the peers' usual start)
GRID = {"k": "5:20", "init": "random,data", "seeds": "3", "job": True}
LARGE_K = {"k": "256,512,1024", "init": "data", "seeds": "3", "job": False}
#: the checkout this kmclust was imported from (an editable install); the harness lives there
ROOT = Path(kmclust.__file__).resolve().parents[1]


def _use_harness() -> None:
    """Make benchmarks/ importable from the checkout, or refuse: it is not part of the package."""
    if not (ROOT / "benchmarks" / "__init__.py").is_file():
        raise ConfigError(
            f"bench needs a source checkout: no benchmarks/ beside {ROOT / 'kmclust'} "
            "(clone the repository and `pip install -e '.[bench]'` there)"
        )
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The modes and options of ``bench``; ``prog`` names the command in usage lines."""
    p = ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store-dir",
        type=Path,
        default=Path("data"),
        help="where fashion-mnist.zarr (and synthetic stores) live or are staged "
        "(default %(default)s)",
    )
    common.add_argument(
        "--record",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="file the results are appended to (default: BENCHMARKS.md at the repo root)",
    )
    common.add_argument("--no-record", action="store_true", help="print only")
    common.add_argument(
        "--workers", type=int, default=2, help="LocalCluster worker processes (default %(default)s)"
    )
    common.add_argument("--threads-per-worker", type=int, default=1, help="(default %(default)s)")
    common.add_argument(
        "--unset-openblas-env",
        action="store_true",
        help="re-run without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (benchmarks only)",
    )
    common.add_argument(
        "--no-prune",
        dest="prune",
        action="store_false",
        help="grid/iteration: run kmclust without its distance bounds (lloyd(prune=False))",
    )
    common.add_argument("-v", "--verbose", action="store_true")
    modes = p.add_subparsers(dest="mode", required=True)
    g = modes.add_parser(
        "grid", parents=[common], help="whole grid: kmclust batch vs sklearn and faiss loops"
    )
    g.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    g.add_argument(
        "--large-k",
        action="store_true",
        help=f"preset: --k {LARGE_K['k']} --init {LARGE_K['init']} --seeds {LARGE_K['seeds']} "
        "and no job unless --job (options given explicitly still win)",
    )
    g.add_argument(
        "--k", help=f"range 5:20 or list 5,10 (default {GRID['k']}; --large-k {LARGE_K['k']})"
    )
    g.add_argument(
        "--init", help=f"any of {','.join(INITS)} (default {GRID['init']}; --large-k data)"
    )
    g.add_argument("--seeds", help=f"count or list (default {GRID['seeds']})")
    g.add_argument("--rows", type=int, default=None, help="first N training rows only (quick runs)")
    g.add_argument("--max-iter", type=int, default=100, help="(default %(default)s)")
    g.add_argument(
        "--schedulers", default="local,threads", help="kmclust schedulers (default %(default)s)"
    )
    g.add_argument(
        "--no-float64",
        dest="float64",
        action="store_false",
        help="skip the float64 scikit-learn loop (the fixed-point reference; the slowest tool)",
    )
    g.add_argument(
        "--job",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the real job (jobs/sweep.py, start to exit) on the same grid (default: yes; "
        "--large-k: no — it would repeat the engine batch and add the metrics and report of "
        "1024-cluster cells: not the engine-vs-peers comparison the preset is for)",
    )
    g.add_argument("--no-faiss", dest="faiss", action="store_false", help="skip the faiss loop")
    g.add_argument(
        "--job-no-report",
        dest="job_report",
        action="store_false",
        help="time the job without its report (--no-report)",
    )
    i = modes.add_parser("iteration", parents=[common], help="seconds per Lloyd iteration per tool")
    i.add_argument("--k", default="10,20,256", help="(default %(default)s)")
    i.add_argument(
        "--iterations", type=int, default=10, help="fixed iterations per fit (default %(default)s)"
    )
    i.add_argument(
        "--rows", type=int, default=None, help="first N rows of train + test (default all 70,000)"
    )
    i.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fits per tool and k, the fastest counts (default %(default)s)",
    )
    i.add_argument(
        "--schedulers",
        default="local,threads",
        help="for kmclust and dask-ml (default %(default)s)",
    )
    i.add_argument("--no-dask-ml", dest="dask_ml", action="store_false", help="skip dask-ml")
    i.add_argument("--no-faiss", dest="faiss", action="store_false", help="skip faiss")
    i.add_argument(
        "--no-float32",
        dest="float32",
        action="store_false",
        help="skip kmclust on float32 input (uint8 only)",
    )
    i.add_argument(
        "--no-estimator",
        dest="estimator",
        action="store_false",
        help="skip kmclust.KMeans(...).fit on numpy float32 (lloyd and elkan)",
    )
    b = modes.add_parser(
        "blobs", parents=[common], help="kmclust.KMeans on float blobs of any d vs the peers"
    )
    b.add_argument(
        "--shapes",
        default="2x8,16x32,50x10,300x10",
        help="d×k pairs, as DxK separated by commas (default %(default)s)",
    )
    b.add_argument("--rows", type=int, default=200_000, help="(default %(default)s)")
    b.add_argument("--max-iter", type=int, default=300, help="(default %(default)s)")
    b.add_argument("--repeats", type=int, default=2, help="fits per tool, the fastest counts")
    b.add_argument("--no-faiss", dest="faiss", action="store_false", help="skip faiss")
    s = modes.add_parser("scale", parents=[common], help="streaming from zarr vs in memory")
    s.add_argument(
        "--rows", type=int, default=5_000_000, help="synthetic rows (default %(default)s)"
    )
    s.add_argument("--k", type=int, default=20)
    s.add_argument("--seeds", type=int, default=10)
    s.add_argument("--iterations", type=int, default=5)
    s.add_argument("--chunk-rows", type=int, default=50_000)
    s.add_argument(
        "--subset-rows",
        type=int,
        default=500_000,
        help="in-memory comparison rows (default %(default)s)",
    )
    s.add_argument("--memory-limit", default="4GiB", help="per worker (default %(default)s)")
    t = modes.add_parser("staging", parents=[common], help="image folder: kmclust vs Pillow loop")
    t.add_argument("--root", type=Path, default=Path("/tmp/kmclust-fashion-png"), help="PNG tree")
    t.add_argument("--repeats", type=int, default=3, help="runs per reader, the fastest counts")
    return p


def _positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {v}")


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"2x8,16x32"`` → ((2, 8), (16, 32)), each d and k ≥ 1."""
    try:
        shapes = tuple(
            (int(d), int(k)) for d, k in (s.lower().split("x") for s in text.split(",") if s)
        )
    except ValueError:
        shapes = ()
    if not shapes or min(min(s) for s in shapes) < 1:
        raise ConfigError(f"--shapes {text!r}: give d×k pairs like 2x8,16x32")
    return shapes


def _config(args: argparse.Namespace):
    """The frozen config of ``args.mode`` from the options, checked."""
    from benchmarks.common import SCHEDULERS, ClusterSpec
    from benchmarks.grid import GridConfig
    from benchmarks.iteration import IterationConfig
    from benchmarks.scale import ScaleConfig
    from kmclust.sweep.config import parse_inits, parse_ks, parse_seeds

    if args.mode == "staging":
        from benchmarks.staging import StagingConfig

        _positive(repeats=args.repeats)
        return StagingConfig(root=args.root, repeats=args.repeats)
    if args.mode == "blobs":
        from benchmarks.blobs import BlobsConfig

        _positive(rows=args.rows, max_iter=args.max_iter, repeats=args.repeats)
        return BlobsConfig(
            shapes=_shapes(args.shapes),
            rows=args.rows,
            max_iter=args.max_iter,
            repeats=args.repeats,
            faiss=args.faiss,
        )
    _positive(workers=args.workers, threads_per_worker=args.threads_per_worker, rows=args.rows)
    kw = {"n_workers": args.workers, "threads_per_worker": args.threads_per_worker}
    if args.mode == "scale":
        _positive(
            k=args.k,
            seeds=args.seeds,
            iterations=args.iterations,
            chunk_rows=args.chunk_rows,
            subset_rows=args.subset_rows,
        )
        return ScaleConfig(
            store_dir=args.store_dir,
            rows=args.rows,
            k=args.k,
            seeds=args.seeds,
            iterations=args.iterations,
            chunk_rows=args.chunk_rows,
            subset_rows=args.subset_rows,
            cluster=ClusterSpec(("local",), memory_limit=args.memory_limit, **kw),
        )
    scheds = tuple(t.strip() for t in args.schedulers.split(",") if t.strip())
    if not scheds or set(scheds) - set(SCHEDULERS):
        raise ConfigError(f"--schedulers {args.schedulers!r}: choose from {', '.join(SCHEDULERS)}")
    spec = ClusterSpec(scheds, **kw)
    if args.mode == "grid":
        _positive(max_iter=args.max_iter)
        preset = LARGE_K if args.large_k else GRID
        given = {key: getattr(args, key) for key in preset}
        grid = {key: preset[key] if v is None else v for key, v in given.items()}
        return GridConfig(
            store_dir=args.store_dir,
            ks=parse_ks(grid["k"]),
            inits=parse_inits(grid["init"]),
            seeds=parse_seeds(grid["seeds"]),
            rows=args.rows,
            max_iter=args.max_iter,
            prune=args.prune,
            float64=args.float64,
            faiss=args.faiss,
            job=grid["job"],
            job_report=args.job_report,
            cluster=spec,
        )
    _positive(iterations=args.iterations, repeats=args.repeats)
    return IterationConfig(
        store_dir=args.store_dir,
        ks=parse_ks(args.k),
        iterations=args.iterations,
        rows=args.rows,
        repeats=args.repeats,
        prune=args.prune,
        float32=args.float32,
        estimator=args.estimator,
        faiss=args.faiss,
        dask_ml=args.dask_ml,
        cluster=spec,
    )


def main(
    argv: list[str] | None = None, prog: str | None = None, as_command: bool | None = None
) -> int:
    """Run one mode, print its table and record it.

    ``as_command`` (default: ``argv is None``) says this process is the command itself, so
    --unset-openblas-env may re-execute it; never true for a call from Python.
    """
    args = build_parser(prog).parse_args(argv)
    _use_harness()
    from benchmarks import common
    from benchmarks.blobs import run_blobs
    from benchmarks.grid import run_grid
    from benchmarks.history import record
    from benchmarks.iteration import run_iteration
    from benchmarks.scale import run_scale
    from benchmarks.staging import run_staging

    if args.unset_openblas_env:
        common.reexec_without_openblas_env(
            as_command=argv is None if as_command is None else as_command
        )
    setup_logging(args.verbose)
    common.warn_if_other_checkout()
    common.quiet_peers(args.verbose)
    cfg = _config(args)
    print(
        f"BLAS (threadpoolctl): {'; '.join(common.blas_kernels()) or 'none loaded yet'}", flush=True
    )
    runs = {"grid": run_grid, "iteration": run_iteration, "scale": run_scale}
    outcome = {**runs, "staging": run_staging, "blobs": run_blobs}[args.mode](cfg)
    if args.mode == "iteration" and args.dask_ml and not outcome.figures["dask_ml"]:
        print(
            "dask-ml is not installed; install it with: pip install -e '.[bench]'", file=sys.stderr
        )
    print(f"\n{outcome.title}\n\n{outcome.text()}")
    if not args.no_record:
        command = f"{prog or 'python jobs/bench.py'} " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        record(args.record, outcome, command)
        print(f"\nrecorded in {args.record}")
    return 0
