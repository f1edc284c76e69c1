"""The sweep job end to end: CLI, results store, schedulers, resume, bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

from kmclust.lloyd import spread
from kmclust.lloyd.placement import n_threads
from kmclust.sweep import run as sweep
from kmclust.sweep.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep.py"
NUMERIC = [
    "jclust",
    "mean_distance",
    "n_iter",
    "converged",
    "n_relocated",
    "train_accuracy",
    "test_accuracy",
    "nmi",
    "ari",
    "cluster_size",
    "cluster_label",
    "centroids",
    "jclust_history",
]
CELL_VARS = set(NUMERIC) | {"status", "error", "seconds"}


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SWEEP), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_same_numbers(a: xr.Dataset, b: xr.Dataset) -> None:
    for name in NUMERIC:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert (
        np.asarray(a.status.values).astype(object) == np.asarray(b.status.values).astype(object)
    ).all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    """Block until something listens on 127.0.0.1:port (a scheduler subprocess is up)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_default_job_small_grid_end_to_end(mnist_subset_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "r.zarr"
    proc = run_cli(
        "--scheduler",
        "local",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "5:9",
        "--seeds",
        "3",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Dask dashboard: http://127.0.0.1:" in proc.stdout
    assert "15 of 30 cells" not in proc.stdout and "30 of 30 cells computed" in proc.stdout
    ds = xr.open_zarr(out)
    assert {"k", "init", "seed", "cluster", "y", "x", "iteration"} <= set(ds.dims)
    assert set(ds.data_vars) >= CELL_VARS
    assert ds.k.values.tolist() == [5, 6, 7, 8, 9] and ds.init.values.tolist() == ["random", "data"]
    assert (np.asarray(ds.status.values).astype(object) == "done").all()
    j = ds.jclust.mean(["init", "seed"]).values
    assert np.all(np.diff(j) < 0), j  # J falls with k on average
    for name in ("train_accuracy", "test_accuracy", "nmi", "purity"):
        v = ds[name].values
        assert np.all((v >= 0) & (v <= 1)), name
    assert (ds.n_iter.values >= 1).all()
    assert ds.attrs["n_train"] == 1000 and ds.attrs["n_test"] == 4000
    assert json.loads(ds.attrs["config"])["ks"] == [5, 6, 7, 8, 9]
    # the original study's magnitude: mean distance ≈ 6.5 at k=5 on 1,000 digits
    assert 6.2 < float(ds.mean_distance.sel(k=5).mean()) < 6.8
    # cluster sizes add up to the training sample, centroids padded with NaN beyond k
    sizes = ds.cluster_size.sel(k=7).values
    assert np.all(np.nansum(sizes, axis=-1) == 1000) and np.all(np.isnan(sizes[..., 7:]))
    report = out.with_name("r-report")
    assert (report / "REPORT.md").stat().st_size > 0
    assert list(report.glob("*.png"))


def _config(store: Path, **kw) -> SweepConfig:
    base = dict(
        dataset=str(store),
        ks=(5, 8, 12),
        inits=("random", "data"),
        seeds=(0, 1),
        train_per_class=50,
    )
    base.update(kw)
    return SweepConfig(**base)


@pytest.mark.slow
def test_same_numbers_threads_local_clusters_and_remote_scheduler(
    mnist_subset_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from distributed import Client, LocalCluster

    config = _config(mnist_subset_store)
    ref = sweep.run_sweep(config, tmp_path / "threads.zarr")
    assert not ref.failed
    reference = xr.open_zarr(ref.path)
    # the runs spread over workers that each hold the rows (1 or 2 workers), and (copy-bytes 0)
    # one batch over row chunks placed on the workers
    for n, copy in ((1, None), (2, None), (2, 0)):
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
            ) as c,
            Client(c) as client,
            dask.config.set({spread.COPY_BYTES_KEY: copy} if copy is not None else {}),
            caplog.at_level(logging.INFO, logger="kmclust.sweep.cells"),
        ):
            caplog.clear()
            out = tmp_path / f"local{n}-{copy}.zarr"
            got = sweep.run_sweep(config, out, parallel=n_threads(client))
        spread_over = "over the workers, each holding every row" in caplog.text
        assert spread_over == (copy is None), caplog.text
        assert_same_numbers(reference, xr.open_zarr(got.path))
    port = free_port()
    dask_cli = str(Path(sys.executable).with_name("dask"))
    procs = [
        subprocess.Popen(
            [
                dask_cli,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        dask_cli,
                        "worker",
                        f"tcp://127.0.0.1:{port}",
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--dashboard-address",
                        "127.0.0.1:0",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_for_port(port)  # connect() reports a refused connection at once
        with sweep.scheduler(f"tcp://127.0.0.1:{port}", None, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            got = sweep.run_sweep(config, tmp_path / "remote.zarr", parallel=n_threads(client))
        assert_same_numbers(reference, xr.open_zarr(got.path))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.slow
def test_resume_after_kill_completes_only_missing_cells(
    mnist_subset_store: Path, tmp_path: Path
) -> None:
    args = [
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "5:20",
        "--seeds",
        "3",
        "--no-report",
    ]
    full = run_cli(*args, "--out", str(tmp_path / "full.zarr"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(SWEEP), *args, "--out", str(out)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    n_done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            n_done = int(
                (np.asarray(xr.open_zarr(out).status.values).astype(object) == "done").sum()
            )
        except Exception:  # store not created yet
            continue
        if n_done >= 12:
            break
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    status = np.asarray(xr.open_zarr(out).status.values).astype(object)
    missing = int((status != "done").sum())
    assert 0 < missing < status.size
    resumed = run_cli(*args, "--out", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{missing} of {status.size} cells computed" in resumed.stdout
    assert_same_numbers(xr.open_zarr(tmp_path / "full.zarr"), xr.open_zarr(out))


def test_resume_refuses_other_config(mnist_subset_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    first = run_cli(
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "5,6",
        "--seeds",
        "1",
        "--no-report",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    before = sorted(p.name for p in out.rglob("*"))
    other = run_cli(
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "5,6",
        "--seeds",
        "1",
        "--tol",
        "1e-3",
        "--resume",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert other.returncode == 2
    assert (
        other.stderr.strip().count("\n") == 0
        and "different config" in other.stderr
        and "tol" in other.stderr
    )
    assert sorted(p.name for p in out.rglob("*")) == before
    again = run_cli(
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "5,6",
        "--seeds",
        "1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--k", "0"], "at least 1"),
        (["--k", "30:5"], "empty range"),
        (["--k", "5:2000"], "exceeds the 1000 training images"),
        (["--init", "kmeans"], "unknown initialisation"),
        (["--train-per-class", "600"], "larger than class"),
        (["--dataset", "no/such/store.zarr"], "does not exist"),
        (["--dataset", "imagenet"], "neither a staged store nor a known source"),
    ],
)
def test_bad_options_one_line_nonzero(
    mnist_subset_store: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    base = [
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--out",
        str(tmp_path / "r.zarr"),
    ]
    proc = run_cli(*base, *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "r.zarr").exists()


def test_unreachable_scheduler_clear_error(mnist_subset_store: Path, tmp_path: Path) -> None:
    t0 = time.time()
    proc = run_cli(
        "--scheduler",
        f"tcp://127.0.0.1:{free_port()}",
        "--timeout",
        "3",
        "--dataset",
        str(mnist_subset_store),
        "--out",
        str(tmp_path / "r.zarr"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and time.time() - t0 < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "scheduler" in lines[0], proc.stderr
    assert not (tmp_path / "r.zarr").exists()


def test_failed_cell_is_recorded_and_rest_completes(tmp_path: Path) -> None:
    """A k above the number of distinct images fails its cells only; exit code 1 names them."""
    from kmclust.data import idx
    from kmclust.data import stores as datasets

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (3, 28, 28), dtype=np.uint8)
    images = np.concatenate([base] * 10)  # 30 images, 3 distinct
    labels = np.repeat(np.arange(3, dtype=np.uint8), 10)
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, imgs, labs in (("train", images, labels), ("t10k", images[:3], labels[:3])):
        idx.write_idx(d / f"{prefix}-images-idx3-ubyte", imgs)
        idx.write_idx(d / f"{prefix}-labels-idx1-ubyte", labs)
    store = datasets.stage("mnist", tmp_path / "tiny.zarr", from_dir=d)
    out = tmp_path / "r.zarr"
    proc = run_cli(
        "--scheduler",
        "threads",
        "--dataset",
        str(store),
        "--train",
        "all",
        "--k",
        "2,3,4",
        "--init",
        "k-means++",
        "--seeds",
        "2",
        "--no-report",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "k=4 init=k-means++ seed=0" in proc.stderr
    ds = xr.open_zarr(out)
    status = np.asarray(ds.status.values).astype(object)
    assert (status[:2] == "done").all() and (status[2] == "failed").all()
    assert all(str(e) for e in np.asarray(ds.error.sel(k=4).values).ravel())
