"""Wrong credentials and storage options from cluster.yaml, on an S3 server that checks keys.

The server is moto with IAM authentication on (tests/s3server.py,
``S3Server(auth=True)``): one IAM user's access key is accepted, a wrong secret
(SignatureDoesNotMatch) or an unknown key id (InvalidAccessKeyId) is refused
with 403, as AWS does. The jobs run as a user runs them, in subprocesses whose
environment holds only the AWS settings each case gives (no ~/.aws files, no
instance metadata). Every refusal must be one ``error:`` line with exit code 2
that says the credentials were refused, leave nothing behind (locally or in the
bucket) and show no secret; a cluster.yaml profile's ``storage_options`` reach
the data and results stores, ``--storage-options`` overrides them key by key,
and neither reaches the output, the results' attributes or the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr
from procs import BLAS1, ROOT, SWEEP, clean_env, error_lines
from s3server import S3Server

from kmclust.data.stores import stage

STAGE = ROOT / "data" / "stage.py"
WRONG_SECRET = "kmclust-wrong-secret-0123456789abcdef"
UNKNOWN_KEY = "AKIAKMCLUSTNOSUCHKEY"
#: a grid of two cells (k=3, random init, two seeds) on the store's own split
GRID = ["--k", "3", "--init", "random", "--seeds", "2", "--train", "all"]
PROFILE = """\
profiles:
  s3auth:
    module: distributed
    class: LocalCluster
    kwargs: {n_workers: 1, threads_per_worker: 1, processes: true, host: 127.0.0.1,
             dashboard_address: "127.0.0.1:0"}
    storage_options:
      key: ${KMCLUST_TEST_S3_KEY}
      secret: ${KMCLUST_TEST_S3_SECRET}
      endpoint_url: ENDPOINT
"""


@pytest.fixture(scope="module")
def s3_auth():
    """A moto S3 server that checks credentials, with one user's key and one bucket."""
    server = S3Server(auth=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def digits_url(s3_auth: S3Server) -> str:
    """scikit-learn's digits staged to the server with the right credentials (a positive
    control: the server accepts kmclust's requests when the key is right)."""
    url = f"s3://{s3_auth.bucket}/sets/digits.zarr"
    right = {"key": s3_auth.key, "secret": s3_auth.secret, "endpoint_url": s3_auth.endpoint}
    stage("digits", url, chunk_rows=400, storage_options=right)
    return url


def job_env(**aws: str) -> dict[str, str]:
    """The test's environment without any AWS setting or credentials file, plus ``aws``."""
    env = {k: v for k, v in clean_env(**BLAS1).items() if not k.startswith("AWS_")}
    none = "/nonexistent/kmclust-aws"
    return env | {
        "AWS_SHARED_CREDENTIALS_FILE": none,
        "AWS_CONFIG_FILE": none,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "1",
        **aws,
    }


def run(script: Path, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one ``error:`` line, the last, holding every needle; no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error:"), proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[-1], proc.stderr


def assert_no_secret(server: S3Server, *texts: str) -> None:
    for text in texts:
        for secret in (server.secret, WRONG_SECRET):
            assert secret not in text


def listing(server: S3Server) -> set[str]:
    return set(server.filesystem().find(server.bucket))


def test_the_server_refuses_a_wrong_secret_and_accepts_the_right_one(s3_auth):
    good = s3_auth.filesystem()
    good.pipe(f"{s3_auth.bucket}/probe.txt", b"ok")
    assert good.cat(f"{s3_auth.bucket}/probe.txt") == b"ok"
    good.rm(f"{s3_auth.bucket}/probe.txt")
    with pytest.raises(PermissionError):
        s3_auth.filesystem(secret=WRONG_SECRET).ls(s3_auth.bucket)


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("wrong secret", ("credentials were refused", "SignatureDoesNotMatch")),
        ("unknown key id", ("credentials were refused", "InvalidAccessKeyId")),
        ("--storage-options", ("credentials were refused", "SignatureDoesNotMatch")),
        ("no credentials", ("no credentials were found",)),
        ("secret without key", ("incomplete credentials", "aws_access_key_id")),
    ],
)
def test_stage_with_wrong_credentials_is_one_line_and_writes_nothing(
    s3_auth, tmp_path, case, needles
):
    env = job_env(**s3_auth.env({}))
    extra: list[str] = []
    if case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = WRONG_SECRET
    elif case == "unknown key id":
        env["AWS_ACCESS_KEY_ID"] = UNKNOWN_KEY
    elif case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    elif case == "secret without key":  # botocore takes the key and the secret from one source
        extra = ["--storage-options", json.dumps({"secret": WRONG_SECRET})]
    else:  # the right ones in the environment, a wrong secret on the command line (it wins)
        extra = ["--storage-options", json.dumps({"key": s3_auth.key, "secret": WRONG_SECRET})]
    before = listing(s3_auth)
    url = f"s3://{s3_auth.bucket}/new/digits.zarr"
    proc = run(STAGE, "digits", "--out", url, *extra, env=env, cwd=tmp_path)
    assert_refused(proc, url, *needles)
    assert_no_secret(s3_auth, proc.stdout, proc.stderr)
    assert list(tmp_path.iterdir()) == []
    assert listing(s3_auth) == before


@pytest.mark.parametrize("out", ["local", "s3"])
def test_sweep_with_a_wrong_secret_is_one_line_and_writes_nothing(
    s3_auth, digits_url, tmp_path, out
):
    """The data store (local --out) or the results store (s3 --out) refuses the key first."""
    env = job_env(**(s3_auth.env({}) | {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}))
    target = "r.zarr" if out == "local" else f"s3://{s3_auth.bucket}/runs/r.zarr"
    before = listing(s3_auth)
    args = ["--dataset", digits_url, "--out", target, *GRID, "--scheduler", "threads"]
    proc = run(SWEEP, *args, env=env, cwd=tmp_path)
    assert_refused(proc, digits_url if out == "local" else target, "credentials were refused")
    assert_no_secret(s3_auth, proc.stdout, proc.stderr)
    assert list(tmp_path.iterdir()) == []
    assert listing(s3_auth) == before


def write_profile(server: S3Server, tmp_path: Path) -> Path:
    config = tmp_path / "profiles.yaml"
    config.write_text(PROFILE.replace("ENDPOINT", server.endpoint), encoding="utf-8")
    return config


def test_profile_storage_options_precedence_and_unset_variable(s3_auth, digits_url, tmp_path):
    """--dry-run checks the results store at its URL with the merged options, no cluster."""
    config = write_profile(s3_auth, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = f"s3://{s3_auth.bucket}/runs/dry.zarr"
    args = ["--dataset", digits_url, "--out", out, *GRID, "--scheduler", "s3auth"]
    args += ["--cluster-config", str(config), "--dry-run"]
    right_secret = json.dumps({"secret": s3_auth.secret})
    wrong_secret = json.dumps({"secret": WRONG_SECRET})
    variables = {"KMCLUST_TEST_S3_KEY": s3_auth.key}
    # key and endpoint from the profile, the profile's wrong secret overridden by the right one
    env = job_env(**variables, KMCLUST_TEST_S3_SECRET=WRONG_SECRET)
    proc = run(SWEEP, *args, "--storage-options", right_secret, env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    # the profile's right secret overridden by a wrong one: refused
    env = job_env(**variables, KMCLUST_TEST_S3_SECRET=s3_auth.secret)
    refused = run(SWEEP, *args, "--storage-options", wrong_secret, env=env, cwd=work)
    assert_refused(refused, out, "credentials were refused", "SignatureDoesNotMatch")
    # a variable the profile uses is not set: one line naming it
    unset = run(SWEEP, *args, env=job_env(**variables), cwd=work)
    assert_refused(unset, "${KMCLUST_TEST_S3_SECRET}", "s3auth", "not set")
    for done in (proc, refused, unset):
        assert_no_secret(s3_auth, done.stdout, done.stderr)
        assert s3_auth.key not in done.stdout + done.stderr
    assert list(work.iterdir()) == []
    assert not s3_auth.filesystem().exists(out)


@pytest.mark.slow
def test_sweep_with_profile_storage_options_keeps_them_secret(s3_auth, digits_url, tmp_path):
    """s3:// → s3:// on the profile's cluster, credentials only in the profile's variables."""
    config = write_profile(s3_auth, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = f"s3://{s3_auth.bucket}/runs/profile.zarr"
    env = job_env(KMCLUST_TEST_S3_KEY=s3_auth.key, KMCLUST_TEST_S3_SECRET=s3_auth.secret)
    args = ["--dataset", digits_url, "--out", out, *GRID, "--scheduler", "s3auth"]
    proc = run(SWEEP, *args, "--cluster-config", str(config), "--timeout", "60", env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    right = {"key": s3_auth.key, "secret": s3_auth.secret, "endpoint_url": s3_auth.endpoint}
    results = xr.open_zarr(out, storage_options=right)
    assert (results.status.values == "done").all()
    recorded = json.dumps([results.attrs, *(v.attrs for v in results.variables.values())])
    report = [p.read_bytes().decode("utf-8", "replace") for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "REPORT.md" for p in work.rglob("*")), "no report written"
    for text in (proc.stdout, proc.stderr, recorded, *report):
        assert s3_auth.secret not in text and s3_auth.key not in text
