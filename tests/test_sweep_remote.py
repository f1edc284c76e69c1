"""The sweep from and to object storage: a real S3 server (moto on 127.0.0.1), real workers.

The end-to-end cases start ``dask scheduler`` and two ``dask worker`` processes
whose working directory holds no data and whose environment holds no AWS
settings: the workers reach the store only through the URL and the storage
options in the task graph. Results are checked against a float64 brute force
(numpy) and against the same sweep from local disk to local disk; the
credentials given on the command line never reach the output, the results'
attributes or the report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from procs import BLAS1, DASK, clean_env, error_lines, wait_for_workers, wait_until
from s3server import ACCESS_KEY, SECRET_KEY, S3Server

from kmclust.data.stores import stage
from kmclust.location import Location
from kmclust.sweep.config import SweepConfig
from kmclust.sweep.lock import hold, lock_place

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep.py"
#: the variables whose values must not depend on where the stores live
NUMERIC = ("jclust", "mean_distance", "n_iter", "n_relocated", "centroids", "cluster_size")


def no_aws_env(**extra: str) -> dict[str, str]:
    """The test's environment without any AWS setting (and one BLAS thread), plus ``extra``."""
    env = {k: v for k, v in clean_env(**BLAS1).items() if not k.startswith("AWS_")}
    return env | extra


def options(server: S3Server) -> str:
    """Every S3 setting as --storage-options (credentials and endpoint)."""
    return json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": server.endpoint})


def statuses(ds: xr.Dataset) -> np.ndarray:
    return np.asarray(ds.status.values).astype(object)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def start_cluster(procs, tmp: Path, env: dict) -> int:
    """A scheduler and two single-thread workers, run from an empty folder."""
    empty = tmp / "empty-workdir"
    empty.mkdir()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    sched = [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(number)]
    procs.popen([*sched, "--dashboard-address", "127.0.0.1:0"], env, cwd=empty)
    for _ in range(2):
        worker = [str(DASK), "worker", f"tcp://127.0.0.1:{number}", "--nthreads", "1"]
        worker += ["--host", "127.0.0.1", "--no-dashboard", "--local-directory", str(empty)]
        procs.popen(worker, env, cwd=empty)
    wait_for_workers(number, 2)
    return number


def sweep_args(dataset: str, out: str, port: int, *extra: str) -> list[str]:
    grid = ["--k", "3,6,10", "--init", "random,k-means++", "--seeds", "2", "--train", "all"]
    return ["--dataset", dataset, "--out", out, *grid, "--scheduler", f"tcp://127.0.0.1:{port}",
            *extra]  # fmt: skip


def run_job(procs, args: list[str], env: dict, cwd: Path) -> tuple[int | None, str, str, float]:
    t0 = time.perf_counter()
    job = procs.popen([sys.executable, str(SWEEP), *args], env, capture=True, cwd=cwd)
    rc, out, err = procs.finish(job, timeout=600)
    return rc, out, err, time.perf_counter() - t0


def brute_force_check(results: xr.Dataset, rows: np.ndarray) -> None:
    """J and cluster sizes of every done cell against a float64 nearest-centroid pass."""
    x = rows.reshape(len(rows), -1).astype(np.float64) / 255.0
    for k in results.k.values:
        for init in results.init.values:
            for seed in results.seed.values:
                cell = results.sel(k=k, init=init, seed=seed)
                assert cell.status.values.item() == "done"
                c = cell.centroids.values.reshape(results.sizes["cluster"], -1)[:k]
                d = ((x[:, None, :] - c[None, :, :].astype(np.float64)) ** 2).sum(-1)
                np.testing.assert_allclose(float(cell.jclust), d.min(1).mean(), rtol=1e-5)
                sizes = np.bincount(d.argmin(1), minlength=k)
                np.testing.assert_array_equal(cell.cluster_size.values[:k], sizes)


@pytest.mark.slow
def test_sweep_s3_to_s3_on_workers_equals_local(s3, procs, tmp_path):
    """Stage digits to S3, sweep s3:// → s3:// on workers that see no data and no AWS settings."""
    data_url, out_url = f"s3://{s3.bucket}/sets/digits.zarr", f"s3://{s3.bucket}/runs/r.zarr"
    stage("digits", data_url, chunk_rows=400)
    local = stage("digits", tmp_path / "digits.zarr", chunk_rows=400)
    port = start_cluster(procs, tmp_path, no_aws_env())
    cwd = tmp_path / "job"
    cwd.mkdir()
    args = sweep_args(data_url, out_url, port, "--storage-options", options(s3))
    rc, out, err, _ = run_job(procs, args, no_aws_env(), cwd)
    assert rc == 0, err
    assert_no_secret(out, err)
    remote = xr.open_zarr(out_url)  # this process: credentials from the environment (fixture)
    assert set(remote.attrs) >= {"config", "dataset", "fingerprint"}
    assert json.loads(remote.attrs["config"])["dataset"] == data_url
    assert_no_secret(json.dumps(dict(remote.attrs), default=str))
    report = cwd / "results" / "r-report"
    assert (report / "REPORT.md").is_file()
    for f in report.iterdir():
        assert_no_secret(f.read_bytes().decode("latin-1"))
    assert not s3.filesystem().exists(str(lock_place(Location(out_url))).removeprefix("s3://"))
    brute_force_check(remote.load(), xr.open_zarr(local).images.values)

    largs = sweep_args(str(local), str(tmp_path / "r.zarr"), port, "--no-report")
    rc, _, err, _ = run_job(procs, largs, no_aws_env(), cwd)
    assert rc == 0, err
    here = xr.open_zarr(tmp_path / "r.zarr")
    for name in NUMERIC:
        np.testing.assert_array_equal(remote[name].values, here[name].values, err_msg=name)


def _sweep(out, dataset: str, **kw):
    from kmclust.sweep.run import run_sweep

    config = SweepConfig(
        dataset=dataset, ks=(3, 4), inits=("random",), seeds=(0,), train_per_class=None
    )
    return run_sweep(config, out, parallel=1, **kw)


@pytest.fixture
def digits_url(s3) -> str:
    url = f"s3://{s3.bucket}/digits.zarr"
    stage("digits", url)
    return url


@pytest.mark.slow
def test_resume_and_overwrite_at_a_url(s3, digits_url):
    import dask

    out = f"s3://{s3.bucket}/r.zarr"
    with dask.config.set(scheduler="sync"):
        first = _sweep(out, digits_url)
        assert first.n_computed == 2 and not first.failed
        assert _sweep(out, digits_url, resume=True).n_computed == 0
        with pytest.raises(Exception, match="--resume .* or --overwrite"):
            _sweep(out, digits_url)
        again = _sweep(out, digits_url, overwrite=True)
    assert again.n_computed == 2
    fs = s3.filesystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(s3.bucket)) == ["digits.zarr", "r.zarr"]
    ds = xr.open_zarr(out)
    assert (statuses(ds) == "done").all()


@pytest.mark.slow
def test_a_cut_overwrite_swap_is_finished_by_the_next_run(s3, digits_url):
    """Killed after the new results were complete: the marker leads the next run to finish."""
    import dask

    out, new = f"s3://{s3.bucket}/r.zarr", f"s3://{s3.bucket}/.r.zarr.overwrite-cut"
    with dask.config.set(scheduler="sync"):
        _sweep(out, digits_url)
        _sweep(new, digits_url)
    fs = s3.filesystem()
    want = xr.open_zarr(new).jclust.values
    fs.pipe_file(f"{s3.bucket}/.r.zarr.replacing", b".r.zarr.overwrite-cut")
    fs.rm_file(f"{s3.bucket}/r.zarr/zarr.json")  # the swap had begun deleting the old store
    fs.rm(f"{s3.bucket}/r.zarr/jclust", recursive=True)
    with dask.config.set(scheduler="sync"):
        assert _sweep(out, digits_url, resume=True).n_computed == 0
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(s3.bucket)) == ["digits.zarr", "r.zarr"]
    np.testing.assert_array_equal(xr.open_zarr(out).jclust.values, want)


def _cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=300,
        env=env, cwd=cwd,
    )  # fmt: skip


def _assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_a_locked_store_refuses(s3, tmp_path, where):
    store = stage("digits", tmp_path / "digits.zarr")
    out = tmp_path / "r.zarr" if where == "local" else Location(f"s3://{s3.bucket}/r.zarr")
    args = ["--dataset", str(store), "--out", str(out), "--k", "3", "--seeds", "1"]
    args += ["--train", "all", "--scheduler", "threads", "--no-report"]
    with hold(out):
        proc = _cli(*args, env=s3.env(), cwd=tmp_path)
        _assert_refused(proc, "is in use by job", f"pid {os.getpid()}")
    assert _cli(*args, env=s3.env(), cwd=tmp_path).returncode == 0


@pytest.mark.slow
def test_stale_and_foreign_locks_on_object_storage(s3, digits_url, tmp_path):
    out = Location(f"s3://{s3.bucket}/r.zarr")
    fs, lock = s3.filesystem(), str(lock_place(out)).removeprefix("s3://")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(lock, json.dumps({"job": "gone", "host": socket.gethostname(), "pid": dead.pid}))
    with hold(out):  # its process is gone: taken over
        assert json.loads(fs.cat_file(lock))["pid"] == os.getpid()
    assert not fs.exists(lock)
    foreign = {"job": "abc123", "host": "elsewhere", "pid": 1, "started": "2030-01-01T00:00"}
    fs.pipe_file(lock, json.dumps(foreign))
    args = ["--dataset", digits_url, "--out", str(out), "--k", "3", "--seeds", "1"]
    args += ["--train", "all", "--scheduler", "threads", "--no-report"]
    _assert_refused(_cli(*args, env=s3.env(), cwd=tmp_path), "job abc123", "--break-lock")
    proc = _cli(*args, "--break-lock", env=s3.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not s3.filesystem().exists(lock)


@pytest.mark.parametrize(
    "out, needle",
    [
        ("s3://no-such-bucket-kmclust/r.zarr", "no such bucket"),
        ("s3://AKIA:secret@bucket/r.zarr", "credentials"),
    ],
)
def test_bad_results_urls_one_line(s3, digits_url, tmp_path, out, needle):
    args = ["--dataset", digits_url, "--out", out, "--k", "3", "--seeds", "1", "--train", "all"]
    proc = _cli(*args, "--scheduler", "threads", env=s3.env(), cwd=tmp_path)
    _assert_refused(proc, needle)
    assert list(tmp_path.iterdir()) == []


def test_a_non_results_object_at_the_url_is_never_touched(s3, digits_url, tmp_path):
    fs = s3.filesystem()
    fs.pipe_file(f"{s3.bucket}/notes.zarr/readme.txt", b"my notes")
    args = ["--dataset", digits_url, "--out", f"s3://{s3.bucket}/notes.zarr", "--k", "3"]
    args += ["--seeds", "1", "--train", "all", "--scheduler", "threads", "--overwrite"]
    _assert_refused(_cli(*args, env=s3.env(), cwd=tmp_path), "not a kmclust results store")
    assert fs.cat_file(f"{s3.bucket}/notes.zarr/readme.txt") == b"my notes"


@pytest.mark.slow
def test_storage_lost_mid_sweep_then_resume_completes(procs, tmp_path):
    """The S3 server dies during a sweep: one error line; back up, --resume completes the grid
    with the numbers of an undisturbed run."""
    server = S3Server().start()  # its own server: this test stops it
    try:
        _lost_and_resumed(server, procs, tmp_path)
    finally:
        server.stop()


def _snapshot(fs, bucket: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(bucket)}


def _lost_and_resumed(server: S3Server, procs, tmp_path: Path) -> None:
    fs, bucket = server.filesystem(), "kmclust-lost"
    fs.mkdir(bucket)
    data_url, out_url = f"s3://{bucket}/digits.zarr", f"s3://{bucket}/r.zarr"
    env = no_aws_env(AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    stage("digits", data_url, chunk_rows=400, storage_options=json.loads(options(server)))
    local = stage("digits", tmp_path / "digits.zarr", chunk_rows=400)
    port = start_cluster(procs, tmp_path, env)
    grid = ["--k", "2:13", "--seeds", "2", "--init", "random", "--train", "all", "--no-report"]
    common = [*grid, "--scheduler", f"tcp://127.0.0.1:{port}", "--storage-options", options(server)]
    job = procs.popen(
        [sys.executable, str(SWEEP), "--dataset", data_url, "--out", out_url, *common],
        env,
        capture=True,
        cwd=tmp_path,
    )

    def some_written() -> bool:  # the first k slabs are done, not all of them
        try:
            status = xr.open_zarr(
                out_url, storage_options=json.loads(options(server))
            ).status.values
        except Exception:  # noqa: BLE001 - not created yet
            return False
        done = np.asarray(status).astype(object) == "done"
        return bool(done.any()) or job.poll() is not None

    wait_until(some_written, timeout=300, step=0.2)
    os.killpg(job.pid, signal.SIGSTOP)  # hold the job still: its S3 state is what we save
    try:
        saved = _snapshot(fs, bucket)
        server.stop()
    finally:
        os.killpg(job.pid, signal.SIGCONT)
    rc, out, err = procs.finish(job, timeout=300)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    print(lines[0])  # shown with -s
    assert out_url in lines[0] and ("cannot write" in lines[0] or "cannot reach" in lines[0])
    assert "Traceback" not in err
    assert_no_secret(out, err)

    server.start()  # moto keeps nothing: put back what the storage held when it died
    fs = server.filesystem()
    fs.mkdir(bucket)
    for path, body in saved.items():
        fs.pipe_file(path, body)
    status = statuses(xr.open_zarr(out_url, storage_options=json.loads(options(server))))
    assert 0 < (status == "done").sum() < status.size, "the server died after the last slab"
    args = ["--dataset", data_url, "--out", out_url, *common, "--resume"]
    rc, _, err, _ = run_job(procs, args, env, tmp_path)
    assert rc == 0, err
    resumed = xr.open_zarr(out_url, storage_options=json.loads(options(server))).load()
    assert (statuses(resumed) == "done").all()

    largs = ["--dataset", str(local), "--out", str(tmp_path / "ref.zarr"), *grid]
    largs += ["--scheduler", f"tcp://127.0.0.1:{port}"]
    rc, _, err, _ = run_job(procs, largs, env, tmp_path)
    assert rc == 0, err
    ref = xr.open_zarr(tmp_path / "ref.zarr")
    for name in NUMERIC:
        np.testing.assert_array_equal(resumed[name].values, ref[name].values, err_msg=name)
