"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, as s3fs tests do.

The server is a subprocess (``python -m moto.server``) that can be stopped and
started again on the same port (its buckets are lost with it). Clients reach it
the standard way: ``AWS_ENDPOINT_URL`` and test credentials in the environment
(:meth:`S3Server.env`), which child processes (the CLI, dask workers) inherit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

#: test credentials: moto accepts any; the tests check these never reach output
ACCESS_KEY = "AKIAKMCLUSTTESTKEY01"
SECRET_KEY = "kmclust-test-secret-9f8e7d6c5b4a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server subprocess on 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the server's endpoint and keys."""
        env = dict(os.environ if base is None else base)
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION="us-east-1",
        )
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(k, None)
        return env

    def start(self, timeout: float = 30) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def filesystem(self):
        """An s3fs filesystem on this server (fresh: no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )
