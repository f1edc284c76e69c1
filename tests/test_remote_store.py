"""Data stores at URLs: staged to and read from a real S3 server (moto, 127.0.0.1).

Every case runs the CLI as a user would (``data/stage.py … --out s3://…``) with
credentials in the environment or in ``--storage-options``, and checks the
store against the same source staged on local disk, the refusals (one
``error:`` line, exit 2, nothing changed) and that no secret reaches the output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from s3server import ACCESS_KEY, SECRET_KEY, free_port

from kmclust.data.stores import open_images, stage, verify_store

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "data" / "stage.py"


def run_stage(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def assert_refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error:") and needle in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and sum(x.startswith("error:") for x in lines) == 1


def assert_no_secret(proc: subprocess.CompletedProcess) -> None:
    for text in (proc.stdout, proc.stderr):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


@pytest.fixture(scope="module")
def local_digits(tmp_path_factory) -> Path:
    return stage("digits", tmp_path_factory.mktemp("local") / "digits.zarr")


def test_stage_to_s3_equals_local(s3, local_digits, tmp_path):
    url = f"s3://{s3.bucket}/sets/digits.zarr"
    proc = run_stage("digits", "--out", url, "-v", env=s3.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc)
    assert list(tmp_path.iterdir()) == [], "staging to a URL left files in the working directory"
    got, want = open_images(url), open_images(local_digits)
    for name in ("images", "labels", "split"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    assert got.attrs["fingerprint"] == want.attrs["fingerprint"]
    verify_store(url)


def test_existing_store_needs_force_and_force_replaces(s3, tmp_path):
    url = f"s3://{s3.bucket}/digits.zarr"
    assert run_stage("digits", "--out", url, env=s3.env(), cwd=tmp_path).returncode == 0
    fs = s3.filesystem()
    before = {p: fs.cat_file(p) for p in fs.find(f"{s3.bucket}/digits.zarr")}
    assert_refused(run_stage("digits", "--out", url, env=s3.env(), cwd=tmp_path), "--force")
    assert {p: fs.cat_file(p) for p in fs.find(f"{s3.bucket}/digits.zarr")} == before
    fs.pipe_file(f"{s3.bucket}/digits.zarr/stray-file", b"left over")
    proc = run_stage("digits", "--out", url, "--force", env=s3.env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not s3.filesystem().exists(f"{s3.bucket}/digits.zarr/stray-file")
    verify_store(url)


def test_a_cut_upload_is_detected_and_repaired_by_force(s3, tmp_path):
    url = f"s3://{s3.bucket}/cut.zarr"
    assert run_stage("digits", "--out", url, env=s3.env(), cwd=tmp_path).returncode == 0
    fs = s3.filesystem()
    fs.rm_file(f"{s3.bucket}/cut.zarr/zarr.json")  # the root metadata is uploaded last
    with pytest.raises(Exception, match="incomplete store"):
        open_images(url)
    assert run_stage("digits", "--out", url, "--force", env=s3.env(), cwd=tmp_path).returncode == 0
    verify_store(url)


def test_non_store_at_the_url_is_never_replaced(s3, tmp_path):
    fs = s3.filesystem()
    fs.pipe_file(f"{s3.bucket}/notes.zarr/readme.txt", b"my notes")
    url = f"s3://{s3.bucket}/notes.zarr"
    proc = run_stage("digits", "--out", url, "--force", env=s3.env(), cwd=tmp_path)
    assert_refused(proc, "not a zarr store")
    assert fs.cat_file(f"{s3.bucket}/notes.zarr/readme.txt") == b"my notes"


def test_credentials_from_storage_options_never_shown(s3, tmp_path):
    env = s3.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY})
    url = f"s3://{s3.bucket}/opts.zarr"
    proc = run_stage(
        "digits", "--out", url, "--storage-options", options, "-v", env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc)
    bad = run_stage("digits", "--out", url, "--storage-options", '{"secret": "' + SECRET_KEY,
                    env=env, cwd=tmp_path)  # fmt: skip
    assert_refused(bad, "not valid JSON")
    assert_no_secret(bad)


@pytest.mark.parametrize(
    "url, needle",
    [
        ("s3://no-such-bucket-kmclust/x.zarr", "no such bucket"),
        ("gs://bucket/x.zarr", "pip install gcsfs"),
        ("s3://AKIA:secret@bucket/x.zarr", "credentials"),
    ],
)
def test_bad_destinations_one_line(s3, tmp_path, url, needle):
    proc = run_stage("digits", "--out", url, env=s3.env(), cwd=tmp_path)
    assert_refused(proc, needle)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_endpoint_one_line(s3, tmp_path):
    env = s3.env()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    env["AWS_MAX_ATTEMPTS"] = "1"
    proc = run_stage("digits", "--out", f"s3://{s3.bucket}/x.zarr", env=env, cwd=tmp_path)
    assert_refused(proc, "cannot reach")
    assert_no_secret(proc)


def test_reading_a_missing_store_at_a_url(s3):
    with pytest.raises(Exception, match="no such store"):
        open_images(f"s3://{s3.bucket}/absent.zarr")


def test_report_of_a_results_store_at_a_url(s3, tmp_path):
    from results_factory import make_results

    url = f"s3://{s3.bucket}/results/study.zarr"
    make_results(ks=range(5, 8), seeds=2).to_zarr(url, mode="w")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "report.py"), url],
        capture_output=True,
        text=True,
        timeout=300,
        env=s3.env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc)
    report = tmp_path / "results" / "study-report" / "REPORT.md"
    assert proc.stdout.strip().endswith(str(report.relative_to(tmp_path))), proc.stdout
    assert report.is_file() and any(report.parent.glob("*.png"))
    missing = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "report.py"), f"s3://{s3.bucket}/nothing.zarr"],
        capture_output=True,
        text=True,
        timeout=300,
        env=s3.env(),
        cwd=tmp_path,
    )
    assert_refused(missing, "not found")
