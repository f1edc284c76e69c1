"""The installed ``kmclust`` command: help, version, one-line errors, and a small real run."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: the console script pip installed beside this interpreter
KMCLUST = Path(sys.executable).with_name("kmclust")
#: a refusal checks values before any heavy import: seconds, even on a loaded 2-core machine
BOUND = 30.0


def kmclust(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    if not KMCLUST.exists():
        pytest.fail(f"{KMCLUST} missing: pip install -e '.[test]' installs the command")
    return subprocess.run(
        [str(KMCLUST), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def assert_one_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, the last stderr line is the only ``error:`` line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_help_lists_every_subcommand_once() -> None:
    proc = kmclust("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("stage", "sweep", "report", "bench"):  # its name and help on one line
        assert sum(line.split()[:1] == [name] for line in lines) == 1, proc.stdout
        assert sum(len(line.split()) > 3 for line in lines if line.split()[:1] == [name]) == 1
    listed = lines[lines.index("  COMMAND") + 1 : lines.index("options:")]
    assert len([line for line in listed if line.strip()]) == 4, proc.stdout  # none wrapped


def test_version_is_the_installed_one() -> None:
    proc = kmclust("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kmclust {importlib.metadata.version('kmclust')}"


@pytest.mark.parametrize(
    "command, options",
    [
        ("sweep", ("--k", "--scheduler", "--tol")),
        ("report", ("--out", "--seed")),
        ("stage", ("--from", "--chunk-rows")),
        ("bench", ("grid", "iteration", "scale")),
    ],
)
def test_subcommand_help(command: str, options: tuple[str, ...]) -> None:
    proc = kmclust(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: kmclust {command} ")
    for option in options:
        assert option in proc.stdout


def test_no_or_unknown_subcommand_is_one_error() -> None:
    assert_one_error(kmclust(), "COMMAND")
    assert_one_error(kmclust("frobnicate"), "invalid choice")


def test_bad_value_fails_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = kmclust("sweep", "--tol", "nan", cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert_one_error(proc, "--tol")
    assert seconds < BOUND, f"took {seconds:.1f} s"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_results_store(tmp_path: Path) -> None:
    assert_one_error(kmclust("report", "missing.zarr", cwd=tmp_path), "missing.zarr")
    assert list(tmp_path.iterdir()) == []


def test_bench_outside_a_checkout_is_one_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from kmclust.cli import run_main
    from kmclust.commands import bench

    monkeypatch.setattr(bench, "ROOT", tmp_path)  # as if installed from a wheel: no benchmarks/
    code = run_main(bench.main, ["grid", "--record", str(tmp_path / "B.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: bench needs a source checkout"), err
    assert list(tmp_path.iterdir()) == []


def test_sweep_then_report(mnist_subset_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "r.zarr"
    proc = kmclust(
        "sweep",
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
        str(store),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 of 2 cells computed" in proc.stdout
    assert not (tmp_path / "r-report").exists()  # --no-report
    proc = kmclust("report", str(store), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rep" / "REPORT.md").is_file()
