"""Real processes for tests: the sweep CLI, `dask scheduler` / `dask worker` on 127.0.0.1.

Every subprocess is started in its own session (``start_new_session=True``) so
that it and everything it spawns (nanny → worker) can be killed as one group;
:class:`Procs` (the ``procs`` fixture in conftest.py) kills every group it
started and checks that none survives the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep.py"
DASK = Path(sys.executable).with_name("dask")
BOUND = 120  # seconds: liveness bound for "the job ends", not a timing measurement
# Threaded runs get one BLAS thread, as distributed's nanny gives its workers
# (distributed.nanny.pre-spawn-environ): the float64 GEMM in kernels.exact_errors
# rounds the last bit of jclust / mean_distance differently with 2 BLAS threads,
# and these tests compare faults against no faults, not BLAS settings.
BLAS1 = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without fault hooks or dask overrides, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMCLUST_TEST_", "DASK_"))}
    env.update(extra)
    return env


class Procs:
    """Subprocesses started as process groups, all killed (and checked gone) at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.started: list[subprocess.Popen] = []
        self.log = (tmp / "dask.log").open("w")

    def popen(
        self, cmd: list[str], env: dict | None = None, capture: bool = False, **kw
    ) -> subprocess.Popen:
        out = subprocess.PIPE if capture else self.log
        p = subprocess.Popen(
            cmd,
            env=env or clean_env(),
            stdout=out,
            stderr=out if capture else subprocess.STDOUT,
            text=capture,
            start_new_session=True,
            **kw,
        )
        self.started.append(p)
        return p

    def scheduler(self, port: int, env: dict | None = None) -> subprocess.Popen:
        return self.popen(
            [
                str(DASK),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            env,
        )

    def worker(
        self, port: int, env: dict | None = None, extra: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        return self.popen(
            [
                str(DASK),
                "worker",
                f"tcp://127.0.0.1:{port}",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(self.tmp / "dask-scratch"),
                *extra,
            ],
            env,
        )

    def job(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.popen([sys.executable, str(SWEEP), *args], env, capture=True, cwd=self.tmp)

    @staticmethod
    def kill(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)

    def finish(self, job: subprocess.Popen, timeout: float = BOUND) -> tuple[int | None, str, str]:
        """Wait for a job; on timeout kill its group and return rc None (it hung)."""
        try:
            out, err = job.communicate(timeout=timeout)
            return job.returncode, out, err
        except subprocess.TimeoutExpired:
            self.kill(job)
            out, err = job.communicate()
            return None, out, err

    def close(self) -> None:
        for p in reversed(self.started):  # jobs and workers first, the scheduler last
            self.kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.started:
            self.kill(p)
            p.wait()
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
        self.log.close()
        groups = {p.pid for p in self.started}
        _, alive = psutil.wait_procs(
            [q for q in psutil.process_iter() if _group(q) in groups], timeout=10
        )
        alive = [q for q in alive if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"processes outlived the test: {[q.pid for q in alive]}"


def _group(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def wait_for_workers(port: int, n: int) -> None:
    from distributed import Client

    with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
        client.wait_for_workers(n, timeout=60)


def wait_until(cond: Callable[[], bool], timeout: float = BOUND, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_cell(store: Path, out: Path, scheduler: str, *extra: str) -> list[str]:
    """Sweep arguments of one small cell (k=5, one seed, 50 images per class, no report)."""
    return [
        "--dataset",
        str(store),
        "--k",
        "5",
        "--seeds",
        "1",
        "--train-per-class",
        "50",
        "--no-report",
        "--scheduler",
        scheduler,
        "--out",
        str(out),
        *extra,
    ]
