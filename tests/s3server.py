"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode, as s3fs tests do.

The server is a subprocess (``python -m moto.server``) that can be stopped and
started again on the same port (its buckets are lost with it). Clients reach it
the standard way: ``AWS_ENDPOINT_URL`` and test credentials in the environment
(:meth:`S3Server.env`), which child processes (the CLI, dask workers) inherit.

``S3Server(auth=True)`` checks credentials as AWS does (moto's IAM
authentication): while authentication is still off, one IAM user with an
access key allowed ``s3:*`` and one bucket are made through the server's own
APIs, then moto's ``/moto-api/reset-auth`` turns it on for every later request.
A wrong key id (InvalidAccessKeyId) or secret (SignatureDoesNotMatch) is then
refused with 403, as AWS refuses them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

#: test credentials: moto without auth accepts any; the tests check these never reach output
ACCESS_KEY = "AKIAKMCLUSTTESTKEY01"
SECRET_KEY = "kmclust-test-secret-9f8e7d6c5b4a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server subprocess on 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None, *, auth: bool = False):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.auth = auth
        #: the credentials clients use: moto's own IAM access key when ``auth`` is on
        self.key, self.secret = ACCESS_KEY, SECRET_KEY
        #: with ``auth``: a bucket made before authentication was turned on
        self.bucket = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the server's endpoint and keys."""
        env = dict(os.environ if base is None else base)
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID=self.key,
            AWS_SECRET_ACCESS_KEY=self.secret,
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
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.05)
        if self.auth:
            self._authenticate()
        return self

    def _authenticate(self) -> None:
        """Make a user, its access key (``s3:*``) and a bucket, then turn authentication on."""
        import json
        import uuid

        import boto3

        setup = dict(
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="AKIAKMCLUSTSETUP0000",
            aws_secret_access_key="unchecked-while-auth-is-off",
        )
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="kmclust")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [allow]})
        iam.put_user_policy(UserName="kmclust", PolicyName="s3", PolicyDocument=policy)
        access = iam.create_access_key(UserName="kmclust")["AccessKey"]
        self.key, self.secret = access["AccessKeyId"], access["SecretAccessKey"]
        self.bucket = f"kmclust-auth-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", **setup).create_bucket(Bucket=self.bucket)
        request = urllib.request.Request(  # 0 unauthenticated actions from now on
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["status"] == "ok"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def filesystem(self, secret: str | None = None):
        """An s3fs filesystem on this server (fresh: no cached listings); ``secret`` replaces
        the right one."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret if secret is None else secret,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
        )
