"""What every benchmark shares: the machine and its environment, meters, data and schedulers.

The machine is a shared, small VM, so every figure travels with what it
was measured on (CPU, BLAS kernels, package versions, the code's git state,
the load average) and with CPU seconds beside wall seconds: CPU time is the
figure other people's load changes least. Timings exclude loading the data
and starting the cluster.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kmclust.cluster.build import local_config
from kmclust.data import sources, stores
from kmclust.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
#: uint8 pixels to [0, 1], as the sweep scales them
SCALE = 1.0 / 255.0
SCHEDULERS = ("local", "threads")
#: tuning variables some processors here set; they slow a current numpy (benchmarks only)
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
#: set after re-executing without OPENBLAS_VARS: what was removed
UNSET_MARK = "KMCLUST_BENCH_UNSET_OPENBLAS"
PACKAGES = (
    "kmclust",
    "numpy",
    "scipy",
    "dask",
    "distributed",
    "zarr",
    "scikit-learn",
    "dask-ml",
    "threadpoolctl",
)
INSTALL_FASHION = "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
#: loggers that print progress chatter of their own ("": the root, where dask-ml logs)
NOISY = ("", "distributed", "bokeh", "tornado", "dask_ml")


@dataclass(frozen=True)
class ClusterSpec:
    """How to run the dask-based tools: schedulers to try and the LocalCluster shape."""

    schedulers: tuple[str, ...] = SCHEDULERS
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"


# ---------------------------------------------------------------- environment


def clean_env(environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` without OPENBLAS_VARS (and a mark of what was removed); None if none is set."""
    removed = {k: environ[k] for k in OPENBLAS_VARS if k in environ}
    if not removed:
        return None
    env = {k: v for k, v in environ.items() if k not in OPENBLAS_VARS}
    env[UNSET_MARK] = " ".join(f"{k}={v}" for k, v in removed.items())
    return env


def reexec_without_openblas_env(as_command: bool) -> None:
    """Re-run this command without OPENBLAS_VARS (they are read when BLAS loads: too late to unset).

    Returns when none is set; refuses when called as a function (``as_command`` false).
    """
    env = clean_env(dict(os.environ))
    if env is None:
        return
    if not as_command:
        raise ConfigError("--unset-openblas-env works only when run as a command")
    print(f"re-running without {env[UNSET_MARK]}", file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, env)


def quiet_peers(verbose: bool) -> None:
    """Keep dask's and dask-ml's chatter out of the tables unless ``verbose``."""
    import distributed  # noqa: F401 - sets its own logger levels on import; override them below

    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    logging.getLogger("kmclust").setLevel(logging.DEBUG if verbose else logging.INFO)


def warn_if_other_checkout() -> None:
    """Warn when kmclust comes from elsewhere: a stale editable install measures other code."""
    import kmclust

    where = Path(kmclust.__file__).resolve().parents[1]
    if where != ROOT:
        print(
            f"warning: kmclust is imported from {where / 'kmclust'}, not from {ROOT}; "
            f"run `pip install -e {ROOT}` to measure this checkout",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- machine


def blas_kernels() -> list[str]:
    """BLAS libraries loaded in this process as 'api version kernel xthreads' (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    return [
        f"{i['internal_api']} {i.get('version')} {i.get('architecture', '?')} x{i['num_threads']}"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def code_state() -> str:
    """git HEAD and whether the engine's files differ from it (read-only git plumbing)."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "not a git checkout"
    files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "kmclust" / "lloyd").glob("*.py"))]
    blobs = {f: _git("hash-object", f) for f in files}
    mods = [
        f"{f} (blob {blob[:10]})"
        for f, blob in blobs.items()
        if blob != _git("rev-parse", f"HEAD:{f}")
    ]
    engine = f"modified: {', '.join(mods)}" if mods else "the engine (kmclust/lloyd) as committed"
    return f"git {head} in {ROOT}, {engine}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def machine_info() -> dict:
    """nproc, CPU model, BLAS kernels, package versions, OPENBLAS_* environment, load average."""
    import sklearn.cluster  # noqa: F401 - loads scipy's BLAS so threadpoolctl reports it too

    env = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    unset = f"unset (was {os.environ[UNSET_MARK]})" if UNSET_MARK in os.environ else "unset"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "blas": blas_kernels(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "openblas_env": env or unset,
        "code": code_state(),
        "loadavg": os.getloadavg(),
    }


def worker_blas(client, machine: dict) -> None:
    """Note the BLAS kernels the workers load (they may differ from the driver's)."""
    if client is not None:
        machine["worker_blas"] = sorted({k for ks in client.run(blas_kernels).values() for k in ks})


def cluster_note(spec: ClusterSpec, machine: dict) -> list[str]:
    """The LocalCluster's shape and its workers' BLAS, as a note line (none without one)."""
    if "local" not in spec.schedulers:
        return []
    threads = (
        "; threads: dask's threaded scheduler in the driver (BLAS threads as the driver's)"
        if "threads" in spec.schedulers
        else ""
    )
    return [
        f"LocalCluster: {spec.n_workers} worker processes × {spec.threads_per_worker} thread, "
        f"memory_limit={spec.memory_limit}; worker BLAS: "
        f"{'; '.join(machine.get('worker_blas', ['?']))}{threads}"
    ]


# ---------------------------------------------------------------- meters


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (LocalCluster workers).

    This process through ``time.process_time`` (nanoseconds): /proc counts in
    10 ms ticks, too coarse for the shortest fits.
    """
    import psutil

    total = time.process_time()
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Meter:
    """Wall and CPU seconds (driver + workers) of a block, and the 1-min load average around it.

    CPU seconds are the load-robust figure on a shared machine: wall time
    grows with other people's work, CPU time much less (spinning BLAS or
    OpenMP threads count too).
    """

    wall: float = 0.0
    cpu: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)

    def load_text(self) -> str:
        return f"{self.load[0]:.1f}→{self.load[1]:.1f}"


@contextlib.contextmanager
def metered() -> Iterator[Meter]:
    """A :class:`Meter` filled in when the block ends."""
    m = Meter()
    load0, cpu0, t0 = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    yield m
    m.wall = time.perf_counter() - t0
    m.cpu = _cpu_seconds() - cpu0
    m.load = (load0, os.getloadavg()[0])


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRss:
    """Largest RSS seen of the driver and of any one ``client`` worker, sampled every ``every`` s.

    ``before``: the same figures when sampling started, so the growth shows. The
    threaded scheduler (no client) runs in the driver: only the driver counts.
    """

    def __init__(self, client=None, every: float = 0.25):
        self.client, self.every = client, every
        self.driver = self.worker = 0
        self.before = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.driver = max(self.driver, _rss())
        if self.client is not None:
            with contextlib.suppress(Exception):  # a busy worker skips one sample
                self.worker = max(self.worker, *self.client.run(_rss).values())

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self.before = (self.driver, self.worker)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def text(self) -> str:
        gib, (d0, w0) = 2.0**30, self.before
        out = f"driver {self.driver / gib:.2f} GiB (at start {d0 / gib:.2f})"
        if self.client is not None:
            out += f", largest worker {self.worker / gib:.2f} GiB (at start {w0 / gib:.2f})"
        return out


# ---------------------------------------------------------------- data, schedulers, tools


def fashion_store(store_dir: str | Path) -> Path:
    """``store_dir``/fashion-mnist.zarr, staged from the Debian package if absent."""
    path = Path(store_dir) / "fashion-mnist.zarr"
    if (path / "zarr.json").is_file():
        return path
    if not sources.FASHION_DIR.is_dir():
        raise DataError(INSTALL_FASHION)
    try:
        return stores.stage("fashion-mnist", path)
    except DataError:  # staged meanwhile by another process
        if (path / "zarr.json").is_file():
            return path
        raise


def fashion_rows(store_dir: str | Path, rows: int | None, split: str | None):
    """(N, D) uint8 dask array of the first ``rows`` rows of ``split`` (None: train + test)."""
    ds = stores.open_images(fashion_store(store_dir))
    x = stores.flat_images(ds)
    idx = np.arange(x.shape[0]) if split is None else np.flatnonzero(ds["split"].values == split)
    if rows is not None:
        if not 1 <= rows <= idx.size:
            raise ConfigError(f"--rows must be between 1 and {idx.size}, got {rows}")
        idx = idx[:rows]
    contiguous = idx[-1] - idx[0] + 1 == idx.size
    return x[int(idx[0]) : int(idx[-1]) + 1] if contiguous else x[idx]


@contextlib.contextmanager
def scheduler(name: str, spec: ClusterSpec) -> Iterator[object]:
    """``threads``: dask's threaded scheduler (yields None); ``local``: a LocalCluster's Client."""
    import dask

    if name == "threads":
        with dask.config.set(scheduler="threads"):
            yield None
        return
    if name != "local":
        raise ConfigError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    from distributed import Client, LocalCluster

    with (
        dask.config.set(local_config()),
        LocalCluster(
            n_workers=spec.n_workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=spec.memory_limit,
        ) as local,
        Client(local) as client,
    ):
        yield client


def kmclust_name(scheduler_name: str, prune: bool) -> str:
    """The table's name of kmclust on one scheduler, e.g. ``kmclust[threads, no prune]``."""
    return f"kmclust[{scheduler_name}{'' if prune else ', no prune'}]"


def sklearn_fit(xf: np.ndarray, init: np.ndarray, algorithm: str, max_iter: int):
    """scikit-learn ``KMeans`` from ``init`` (one start, tol=0), fitted on ``xf``."""
    from sklearn.cluster import KMeans

    km = KMeans(
        n_clusters=init.shape[0],
        init=init.astype(xf.dtype),
        n_init=1,
        algorithm=algorithm,
        tol=0.0,
        max_iter=max_iter,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is expected here
        return km.fit(xf)
