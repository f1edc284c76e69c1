"""Store locations: paths and fsspec URLs, secrets kept out of text, clear errors (real S3)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from s3server import SECRET_KEY

from kmclust.errors import ConfigError
from kmclust.location import describe, locate, merge_options, parse_storage_options, scrub


def test_paths_and_file_urls_are_local(tmp_path):
    assert locate(tmp_path / "a.zarr").path == tmp_path / "a.zarr"
    loc = locate(f"file://{tmp_path}/a.zarr")
    assert loc.is_local and loc.path == tmp_path / "a.zarr"
    assert locate(f"local://{tmp_path}/b.zarr").path == tmp_path / "b.zarr"
    assert not locate("memory://x/y.zarr").is_local
    assert locate("s3://bucket/data/x.zarr").name == "x.zarr"
    assert str(locate("s3://bucket/x.zarr").child("images")) == "s3://bucket/x.zarr/images"


def test_options_never_in_repr_or_str():
    loc = locate("s3://bucket/x.zarr", {"secret": SECRET_KEY, "key": "AKIA0000"})
    assert SECRET_KEY not in repr(loc) and SECRET_KEY not in str(loc)
    assert loc.storage_options() == {"secret": SECRET_KEY, "key": "AKIA0000"}
    assert locate("x.zarr", {"anon": True}).storage_options() is None


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ConfigError, match="credentials") as err:
        locate(f"s3://AKIA0000:{SECRET_KEY}@bucket/x.zarr")
    assert SECRET_KEY not in str(err.value)


@pytest.mark.parametrize(
    "url, needle",
    [("nosuch://a/b", "unknown URL scheme"), ("gs://bucket/x.zarr", "pip install gcsfs")],
)
def test_unusable_schemes_name_the_fix(url, needle):
    assert importlib.util.find_spec("gcsfs") is None, "this case needs gcsfs to be absent"
    with pytest.raises(ConfigError, match=needle):
        locate(url)


def test_storage_options_json_errors_do_not_echo():
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    assert parse_storage_options(None) == {}
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        parse_storage_options('{"secret": "' + SECRET_KEY)
    assert SECRET_KEY not in str(err.value)
    with pytest.raises(ConfigError, match="JSON object"):
        parse_storage_options(json.dumps([SECRET_KEY]))


def test_scrub_hides_nested_values_and_env_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123456")
    text = f"failed with {SECRET_KEY} and env-secret-123456 and tok"
    out = scrub(text, {"client_kwargs": {"aws_secret_access_key": SECRET_KEY}, "token": "tok"})
    assert out == "failed with *** and *** and ***"


def test_missing_bucket_is_one_clear_line(s3):
    fs, path = locate(f"s3://no-such-bucket-{s3.bucket}/x.zarr").filesystem()
    with pytest.raises(Exception) as caught:
        fs.ls(path)
    err = describe(caught.value, locate(f"s3://no-such-bucket-{s3.bucket}/x.zarr"))
    assert "no such" in str(err) and "\n" not in str(err)


def test_unreachable_endpoint_is_one_clear_line(s3, monkeypatch):
    from s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    loc = locate(
        f"s3://{s3.bucket}/x.zarr",
        {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}},
    )
    fs, path = loc.filesystem()
    with pytest.raises(Exception) as caught:
        fs.ls(path)
    err = describe(caught.value, loc)
    assert "cannot reach" in str(err), err
    assert SECRET_KEY not in str(err)


def test_a_store_written_and_read_through_a_location(s3):
    import numpy as np
    import xarray as xr

    loc = locate(f"s3://{s3.bucket}/t.zarr")
    ds = xr.Dataset({"a": ("n", np.arange(5, dtype=np.uint8))})
    ds.to_zarr(loc.url, storage_options=loc.storage_options(), mode="w")
    back = xr.open_zarr(loc.url, storage_options=loc.storage_options())
    np.testing.assert_array_equal(back.a.values, np.arange(5))
    assert s3.filesystem().exists(f"{s3.bucket}/t.zarr/zarr.json")


def test_scrub_shows_endpoint_region_anon_ssl_and_hides_the_rest(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123456")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token-abcdef")
    options = {
        "key": "AKIAKEYID0000",
        "secret": SECRET_KEY,
        "token": "tok",
        "endpoint_url": "http://127.0.0.1:9000",
        "region_name": "eu-west-1",
        "anon": "true",
        "use_ssl": "false",
        "profile": "my-aws-profile",
        "client_kwargs": {
            "endpoint_url": "http://minio.example:9000",
            "region_name": "us-east-2",
            "aws_session_token": "nested-token-value",
        },
        "config_kwargs": {"endpoint_url": "http://elsewhere.example:1"},  # not an allowed path
    }
    shown = "http://127.0.0.1:9000 eu-west-1 true false http://minio.example:9000 us-east-2"
    hidden = (
        f"AKIAKEYID0000 {SECRET_KEY} tok my-aws-profile nested-token-value "
        "http://elsewhere.example:1 env-secret-123456 env-token-abcdef"
    )
    assert scrub(f"{shown} | {hidden}", options) == f"{shown} | " + " ".join(["***"] * 8)


def test_command_line_options_override_the_profile_key_by_key():
    profile = {
        "key": "K",
        "secret": "S",
        "client_kwargs": {"endpoint_url": "E", "region_name": "R"},
    }
    before = json.dumps(profile)
    cli = {"secret": "S2", "client_kwargs": {"region_name": "R2"}, "anon": False}
    assert merge_options(profile, cli) == {
        "key": "K",
        "secret": "S2",
        "client_kwargs": {"endpoint_url": "E", "region_name": "R2"},
        "anon": False,
    }
    assert json.dumps(profile) == before  # the profile's own mapping is not changed
    assert merge_options(profile, None) == profile
    assert merge_options(profile, {"client_kwargs": None})["client_kwargs"] is None


def _boto(code: str, message: str) -> BaseException:
    """The exception s3fs raises for a botocore error (PermissionError caused by ClientError)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": code, "Message": message}}, "ListObjectsV2")
    try:
        raise translate_boto_error(error) from error
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        ("InvalidAccessKeyId", "access key id is not known"),
        ("SignatureDoesNotMatch", "secret does not match"),
        ("AccessDenied", "not allowed"),
        ("403", "forbidden"),
        ("ExpiredToken", "session token has expired"),
    ],
)
def test_refused_credentials_are_one_readable_line(code, needle):
    loc = locate("s3://bucket/x.zarr", {"key": "AKIAKEYID0000", "secret": SECRET_KEY})
    err = str(describe(_boto(code, f"refused for {SECRET_KEY}"), loc))
    assert err.startswith("s3://bucket/x.zarr: access denied: the credentials were refused")
    assert f"({code}: " in err and needle in err and "--storage-options" in err
    assert SECRET_KEY not in err and "\n" not in err


def test_missing_or_partial_credentials_say_so():
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    loc = locate("s3://bucket/x.zarr")
    assert "no credentials were found" in str(describe(NoCredentialsError(), loc))
    partial = PartialCredentialsError(provider="explicit", cred_var="aws_access_key_id")
    err = str(describe(partial, loc))
    assert "incomplete credentials" in err and "aws_access_key_id" in err


def test_unreachable_endpoint_from_options_is_named(s3):
    from s3server import ACCESS_KEY, free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    retries = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
    options = {"endpoint_url": endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
    options["config_kwargs"] = retries
    loc = locate(f"s3://{s3.bucket}/x.zarr", options)
    fs, path = loc.filesystem()
    with pytest.raises(Exception) as caught:
        fs.ls(path)
    err = str(describe(caught.value, loc))
    assert "cannot reach" in err and endpoint in err, err
    assert SECRET_KEY not in err and ACCESS_KEY not in err
