"""The sweep job as a user meets it: ``jobs/sweep.py`` in a subprocess, timed from start to exit.

The grid benchmark times the engine alone; this times the same grid through
the job's own entry point (cluster start, data split, initialisation, engine,
held-out pass, metrics, result writes and, unless told not to, the report),
so a gap between the two cannot hide. The job sees the grid's rows: the
whole Fashion-MNIST store, or, with ``rows``, a temporary store (the
``array`` source) of the first ``rows`` training images and the whole test
split. It runs to strict convergence (``--tol 0``) like the engine batch;
its initial centroids are the sweep's own, drawn from the float rows, so its
iteration count may differ from the batch's by a few.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, fashion_store
from kmclust.data import stores
from kmclust.errors import DataError

SWEEP = ROOT / "jobs" / "sweep.py"
STAGE = ROOT / "data" / "stage.py"


@dataclass(frozen=True)
class JobGrid:
    """The grid the job runs (the grid benchmark's) and how."""

    ks: tuple[int, ...]
    inits: tuple[str, ...]
    seeds: tuple[int, ...]
    max_iter: int
    report: bool = True


def seeds_arg(seeds: tuple[int, ...]) -> str:
    """``--seeds`` for ``seeds``: a count when they are 0…n-1, else a list (two or more)."""
    if seeds == tuple(range(len(seeds))):
        return str(len(seeds))
    if len(seeds) < 2:
        raise DataError(f"the job takes a single seed only as 0 (got {seeds[0]})")
    return ",".join(map(str, seeds))


def job_command(grid: JobGrid, store: Path, out: Path) -> list[str]:
    """The command line of the job for ``grid`` on ``store``, writing ``out``."""
    cmd = [sys.executable, str(SWEEP), "--scheduler", "local", "--dataset", str(store)]
    cmd += ["--train", "all", "--k", ",".join(map(str, grid.ks))]
    cmd += ["--init", ",".join(grid.inits), "--seeds", seeds_arg(grid.seeds)]
    cmd += ["--tol", "0", "--max-iter", str(grid.max_iter), "--out", str(out)]
    return cmd + ([] if grid.report else ["--no-report"])


def first_rows_store(store_dir: Path, rows: int, tmp: Path) -> Path:
    """A store of the first ``rows`` training images and every test image (via ``array``)."""
    ds = stores.open_images(fashion_store(store_dir))
    split = np.asarray(ds["split"].values).astype(str)
    train, test = np.flatnonzero(split == "train")[:rows], np.flatnonzero(split == "test")
    idx = np.concatenate([train, test])
    npz = tmp / "rows.npz"
    np.savez(
        npz,
        images=np.asarray(ds["images"].values[idx]),
        labels=np.asarray(ds["labels"].values[idx]),
        split=np.where(np.arange(idx.size) < train.size, "train", "test"),
        class_names=np.asarray(ds.attrs.get("class_names", [str(c) for c in range(10)])),
    )
    out = tmp / "rows.zarr"
    cmd = [sys.executable, str(STAGE), "array", "--from", str(npz), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise DataError(f"staging the job's rows failed: {proc.stderr.strip()[-300:]}")
    return out


def run_job(grid: JobGrid, store_dir: Path, rows: int | None, env: dict | None = None) -> dict:
    """Run the job once: wall and CPU seconds (job + its workers), load, its own figures."""
    with tempfile.TemporaryDirectory(prefix="kmclust-bench-job-") as tmp:
        tmp = Path(tmp)
        store = fashion_store(store_dir) if rows is None else first_rows_store(store_dir, rows, tmp)
        out = tmp / "results.zarr"
        cmd = job_command(grid, store, out)
        before, load0 = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise DataError(f"the sweep job failed ({proc.returncode}): {proc.stderr[-500:]}")
        found = re.search(r"cells computed in ([0-9.]+) s", proc.stdout)
        n_iter = _iterations(out)
    return {
        "wall": wall,
        "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "load": f"{load0:.1f}→{os.getloadavg()[0]:.1f}",
        "sweep_seconds": float(found.group(1)) if found else float("nan"),
        "iterations": n_iter,
        "report": grid.report,
        "command": shlex.join(["jobs/sweep.py", *cmd[2:]]).replace(str(tmp), "$TMP"),
    }


def _iterations(out: Path) -> int:
    """Σ n_iter over the job's cells (read from its results store, all cells done)."""
    import xarray as xr

    ds = xr.open_zarr(out)
    status = np.asarray(ds["status"].values).astype(object)
    if not (status == "done").all():
        raise DataError(f"the sweep job left cells not done: {json.dumps(status.tolist())[:200]}")
    return int(ds["n_iter"].values.sum())
