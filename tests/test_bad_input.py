"""Bad input to every entry point: one ``error:`` line last, exit 2, no traceback, nothing written.

The data-loss cases create their victim (a directory of the user's files, a
data store, a foreign zarr store, the working directory) and check it is
byte-for-byte intact after the refused command. ``--overwrite`` replaces only
a kmclust results store, and only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
SWEEP, REPORT, STAGE = (
    ROOT / "jobs" / "sweep.py",
    ROOT / "jobs" / "report.py",
    ROOT / "data" / "stage.py",
)
#: a refusal checks values before any heavy import: seconds, even on a loaded 2-core machine
BOUND = 30.0


def run(script: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and ``root``) with its bytes' sha256 (``dir`` for folders)."""
    out = {".": "dir" if root.is_dir() else hashlib.sha256(root.read_bytes()).hexdigest()}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            out[str(p.relative_to(root))] = (
                "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            )
    return out


def assert_refused(
    proc: subprocess.CompletedProcess, needle: str, seconds: float | None = None
) -> None:
    """Exit 2, the last stderr line is the one ``error:`` line, no traceback, in bounded time."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    if seconds is not None:
        assert seconds < BOUND, f"took {seconds:.1f} s"


@pytest.fixture(scope="module")
def results_store(mnist_subset_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real results store written by the sweep (k=2,3 × data × 1 seed)."""
    where = tmp_path_factory.mktemp("results")
    proc = run(
        SWEEP,
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "2,3",
        "--init",
        "data",
        "--seeds",
        "1",
        "--train-per-class",
        "10",
        "--no-report",
        "--out",
        "r.zarr",
        cwd=where,
    )
    assert proc.returncode == 0, proc.stderr
    return where / "r.zarr"


SWEEP_CASES = [
    (["--tol", "nan"], "--tol"),
    (["--tol", "inf"], "--tol"),
    (["--tol", "-1"], "--tol"),
    (["--max-iter", "0"], "--max-iter"),
    (["--max-iter", str(2**31)], "--max-iter"),
    (["--data-seed", "-1"], "--data-seed"),
    (["--data-seed", str(2**63)], "--data-seed"),
    (["--seeds", f"0,{2**63}"], "--seeds"),
    (["--seeds", "-1,2"], "--seeds"),
    (["--seeds", "1000000000000"], "at most"),
    (["--k", "1:1000000000"], "at most"),
    (["--k", f"{2**31}"], "at most"),
    (["--k", "5,5"], "repeated"),
    (["--init", "random,random"], "repeated"),
    (["--init", "kmeans"], "unknown initialisation"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--timeout", "0"], "--timeout"),
    (["--chunk-rows", "0"], "--chunk-rows"),
    (["--train-per-class", "0"], "--train-per-class"),
    (["--out", ""], "--out is empty"),
    (["--out", "/sys/kmclust-test.zarr"], "cannot write"),
    (["--dataset", ""], "--dataset is empty"),
    (["--resume", "--overwrite"], "not allowed with"),
    (["--max-iter", "x"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(
    "args, needle", SWEEP_CASES, ids=[" ".join(a) or "empty" for a, _ in SWEEP_CASES]
)
def test_sweep_bad_values(
    mnist_subset_store: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    base = ["--scheduler", "threads", "--dataset", str(mnist_subset_store), "--out", "r.zarr"]
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    proc = run(SWEEP, *base, *args, cwd=tmp_path)
    assert_refused(proc, needle, time.perf_counter() - t0)
    assert snapshot(tmp_path) == before


def test_sweep_grid_too_large_for_memory(mnist_subset_store: Path, tmp_path: Path) -> None:
    """A grid whose results would not fit is refused after reading the data, before any write."""
    proc = run(
        SWEEP,
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "1:1000",
        "--seeds",
        "100000",
        "--out",
        "r.zarr",
        cwd=tmp_path,
    )
    assert_refused(proc, "GiB")
    assert list(tmp_path.iterdir()) == []


def _victims(tmp_path: Path, store: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each data-loss case: the victim it creates and the sweep options aimed at it."""
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my work")
    (user / "sub" / "data.bin").write_bytes(os.urandom(1000))
    foreign = tmp_path / "other.zarr"
    xr.Dataset({"v": ("x", np.arange(5.0))}).to_zarr(foreign)
    return {
        "plain directory": (user, ["--out", str(user)]),
        "foreign zarr": (foreign, ["--out", str(foreign)]),
        "the data store": (store, ["--out", str(store)]),
        "inside the data store": (store, ["--out", str(store / "r.zarr")]),
        "working directory": (tmp_path, ["--out", "."]),
        "a parent of it": (tmp_path, ["--out", ".."]),
        "empty --out": (tmp_path, ["--out", ""]),
    }


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
@pytest.mark.parametrize(
    "case",
    [
        "plain directory",
        "foreign zarr",
        "the data store",
        "inside the data store",
        "working directory",
        "a parent of it",
        "empty --out",
    ],
)
def test_nothing_is_destroyed(
    mnist_subset_store: Path, tmp_path: Path, case: str, flag: str | None
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = work / "digits.zarr"
    data.symlink_to(
        mnist_subset_store, target_is_directory=True
    )  # the real store, under the victim
    victim, out = _victims(work, data)[case]
    before, data_before = snapshot(victim), snapshot(mnist_subset_store)
    proc = run(
        SWEEP,
        "--scheduler",
        "threads",
        "--dataset",
        str(data),
        "--k",
        "2",
        "--seeds",
        "1",
        "--no-report",
        *out,
        *([flag] if flag else []),
        cwd=work,
    )
    assert_refused(proc, "")
    assert snapshot(victim) == before
    assert snapshot(mnist_subset_store) == data_before


def test_overwrite_replaces_a_results_store(
    mnist_subset_store: Path, results_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.zarr"
    subprocess.run(["cp", "-a", str(results_store), str(out)], check=True)
    proc = run(
        SWEEP,
        "--scheduler",
        "threads",
        "--dataset",
        str(mnist_subset_store),
        "--k",
        "4",
        "--init",
        "random",
        "--seeds",
        "1",
        "--train-per-class",
        "10",
        "--no-report",
        "--out",
        str(out),
        "--overwrite",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    ds = xr.open_zarr(out)
    assert ds.k.values.tolist() == [4] and ds.init.values.tolist() == ["random"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]  # no temporary store left


def test_interrupted_overwrite_keeps_the_old_results(
    mnist_subset_store: Path, results_store: Path, tmp_path: Path
) -> None:
    """SIGKILL while the new results are computed: the old store is still there, byte for byte."""
    out = tmp_path / "r.zarr"
    subprocess.run(["cp", "-a", str(results_store), str(out)], check=True)
    before = snapshot(out)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SWEEP),
            "--scheduler",
            "threads",
            "--dataset",
            str(mnist_subset_store),
            "--k",
            "5:40",
            "--seeds",
            "20",
            "--no-report",
            "--out",
            str(out),
            "--overwrite",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".r.overwrite-*.zarr")) and time.time() < deadline:
            assert proc.poll() is None, "the job ended before it was interrupted"
            time.sleep(0.05)
        assert list(tmp_path.glob(".r.overwrite-*.zarr")), "the new store was never started"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert snapshot(out) == before
    xr.open_zarr(out).load()  # still a readable store


REPORT_CASES = [
    (["missing.zarr"], "not found"),
    (["{store}", "--out", ""], "--out is empty"),
    (["{store}", "--out", "a-file"], "is a file"),
    (["{store}", "--out", "/sys/kmclust-report"], "cannot create"),
    (["{store}", "--k", "2"], "give all three"),
    (["{store}", "--k", "-1", "--init", "data", "--seed", "0"], "--k"),
    (["{store}", "--k", "2", "--init", "data", "--seed", "-1"], "--seed"),
    (["{store}", "--k", "x"], "invalid int value"),
]


@pytest.mark.parametrize("args, needle", REPORT_CASES, ids=[" ".join(a) for a, _ in REPORT_CASES])
def test_report_bad_values(
    results_store: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    (tmp_path / "a-file").write_text("mine")
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    proc = run(REPORT, *[a.format(store=results_store) for a in args], cwd=tmp_path)
    assert_refused(proc, needle, time.perf_counter() - t0)
    assert snapshot(tmp_path) == before


STAGE_CASES = [
    (["mnist-subset", "--chunk-rows", "0"], "--chunk-rows"),
    (["synthetic", "--rows", "-5", "--from", "x.zarr"], "--rows"),
    (["mnist", "--from", "nowhere"], "nowhere"),
    (["imagenet"], "invalid choice"),
    (["mnist-subset", "--out", "/sys/kmclust-test.zarr"], "cannot create"),
]


@pytest.mark.parametrize("args, needle", STAGE_CASES, ids=[" ".join(a) for a, _ in STAGE_CASES])
def test_stage_bad_values(tmp_path: Path, args: list[str], needle: str) -> None:
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    proc = run(STAGE, *args, cwd=tmp_path)
    assert_refused(proc, needle, time.perf_counter() - t0)
    assert snapshot(tmp_path) == before
