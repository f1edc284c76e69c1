"""Store locations: paths and fsspec URLs, secrets kept out of text, clear errors (real S3)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from s3server import SECRET_KEY

from kmclust.errors import ConfigError
from kmclust.location import describe, locate, parse_storage_options, scrub


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
