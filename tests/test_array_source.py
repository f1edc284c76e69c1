"""The array source: .npy, .npz, zarr arrays and groups (xarray datasets), local and on S3.

Every staged store is compared with the arrays the test wrote (pixels, labels,
split, class names) as xarray reads the store back; the fingerprint of a file
with hashlib over its bytes; J of a sweep on an unlabelled RGB .npy with a
numpy float64 computation from the run's centroids. Bad input ends with one
`error:` line, exit code 2 and nothing at --out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from s3server import ACCESS_KEY, SECRET_KEY

from kmclust.cli import run_main
from kmclust.commands.stage import main as stage_main
from kmclust.data import arrays
from kmclust.data.stores import open_images, stage, verify_store

ROOT = Path(__file__).resolve().parents[1]
STAGE, SWEEP, REPORT = (ROOT / p for p in ("data/stage.py", "jobs/sweep.py", "jobs/report.py"))
LABEL_VARS = ("train_accuracy", "test_accuracy", "nmi", "ari", "cluster_label")
# xarray writing the tests' <U strings to zarr v3 warns that the dtype has no v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:.*Zarr (V|format )3:Warning")


def cli(script: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    cmd = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def rng_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def read_back(out: Path | str) -> xr.Dataset:
    """The staged store as plain xarray reads it (not kmclust's reader)."""
    ds = xr.open_zarr(out).load()
    verify_store(out)  # every chunk readable, labels within the classes, split train/test
    return ds


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_npy_is_an_unlabelled_gray_store(tmp_path: Path) -> None:
    images = rng_images((50, 5, 7))
    np.save(tmp_path / "in.npy", images)
    out = tmp_path / "a.zarr"
    proc = cli(STAGE, "array", "--from", tmp_path / "in.npy", "--out", out, "--chunk-rows", 16)
    assert proc.returncode == 0, proc.stderr
    ds = read_back(out)
    np.testing.assert_array_equal(ds.images.values, images)
    assert ds.images.dims == ("sample", "y", "x") and "labels" not in ds
    assert ds.attrs["labelled"] is False and "class_names" not in ds.attrs
    assert (ds.split.values == "train").all() and ds.attrs["n_train"] == 50
    sha = {"in.npy": sha256_file(tmp_path / "in.npy")}
    assert ds.attrs["sha256"] == sha
    want = hashlib.sha256(json.dumps(sorted(sha.items())).encode()).hexdigest()
    assert ds.attrs["fingerprint"] == want
    assert open_images(out)["images"].shape[1:] == (5, 7)  # kmclust's reader accepts it


def test_npz_rgb_with_labels_and_split(tmp_path: Path) -> None:
    images, labels = rng_images((30, 6, 4, 3), 1), np.arange(30) % 4
    split = np.where(np.arange(30) % 3 == 0, "test", "train")
    names = np.array(["red", "green", "blue", "grey"])
    src = tmp_path / "in.npz"
    np.savez_compressed(src, images=images, labels=labels, split=split, class_names=names)
    out = tmp_path / "c.zarr"
    proc = cli(STAGE, "array", "--from", src, "--out", out, "--chunk-rows", 7)
    assert proc.returncode == 0, proc.stderr
    ds = read_back(out)
    assert ds.images.dims == ("sample", "y", "x", "channel")
    np.testing.assert_array_equal(ds.images.values, images)
    np.testing.assert_array_equal(ds.labels.values, labels)
    assert ds.split.values.tolist() == split.tolist()
    assert ds.attrs["class_names"] == names.tolist() and ds.attrs["labelled"] is True
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (20, 10)
    assert ds.attrs["sha256"] == {"in.npz": sha256_file(src)}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_floats_are_rounded_half_to_even(tmp_path: Path, dtype: str) -> None:
    grid = np.arange(511) / 510  # every half step of 1/255, the exact halves included
    values = np.concatenate([grid, np.random.default_rng(2).random(209)]).astype(dtype)
    images = values.reshape(20, 6, 6, 1)  # a gray channel axis: squeezed
    np.save(tmp_path / "f.npy", images)
    ds = read_back(stage("array", tmp_path / "f.zarr", from_dir=tmp_path / "f.npy"))
    want = [round(float(v) * 255) for v in values]  # Python's round: half to even
    np.testing.assert_array_equal(ds.images.values.ravel(), want)
    assert ds.images.shape == (20, 6, 6)


def test_fortran_ordered_npy(tmp_path: Path) -> None:
    images = np.asfortranarray(rng_images((9, 4, 5), 3))
    np.save(tmp_path / "f.npy", images)
    ds = read_back(stage("array", tmp_path / "f.zarr", from_dir=tmp_path / "f.npy"))
    np.testing.assert_array_equal(ds.images.values, images)


def test_zarr_array_input_and_its_fingerprint(tmp_path: Path) -> None:
    images = rng_images((23, 5, 4, 3), 4).astype(np.uint16)  # integers 0-255, another dtype
    fps = []
    for name, chunks, fmt in (("a", (7, 5, 4, 3), 3), ("b", (23, 5, 4, 3), 2)):
        src = tmp_path / name / "in.zarr"  # the same name: the name is part of the fingerprint
        arr = zarr.create_array(src, shape=images.shape, dtype="u2", chunks=chunks, zarr_format=fmt)
        arr[:] = images
        out = tmp_path / f"{name}-out.zarr"
        proc = cli(STAGE, "array", "--from", src, "--out", out, "--chunk-rows", 10)
        assert proc.returncode == 0, proc.stderr
        ds = read_back(out)
        np.testing.assert_array_equal(ds.images.values, images)
        assert "labels" not in ds and ds.attrs["input_format"] == "zarr array"
        fps.append(ds.attrs["fingerprint"])
    assert fps[0] == fps[1], "the same pixels in other chunks and format: the same fingerprint"
    arr = zarr.open_array(tmp_path / "a" / "in.zarr", mode="r+")
    arr[22, 4, 3, 2] = 255 - images[22, 4, 3, 2]
    changed = stage("array", tmp_path / "c-out.zarr", from_dir=tmp_path / "a" / "in.zarr")
    assert open_images(changed).attrs["fingerprint"] != fps[0]


def _dataset(n: int = 24) -> xr.Dataset:
    return xr.Dataset(
        {
            "images": (("n", "h", "w"), rng_images((n, 6, 5), 5) / np.float32(255)),
            "labels": ("n", (np.arange(n) % 3).astype(np.int32)),
            "split": ("n", np.arange(n) >= n - 6),
            "class_names": ("class", np.array(["ant", "bee", "cat"])),
        }
    )


def test_xarray_dataset_input(tmp_path: Path) -> None:
    src = _dataset()
    src.to_zarr(tmp_path / "ds.zarr", encoding={"images": {"chunks": (5, 6, 5)}})
    out = tmp_path / "out.zarr"
    proc = cli(STAGE, "array", "--from", tmp_path / "ds.zarr", "--out", out, "--chunk-rows", 8)
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr
    ds = read_back(out)
    np.testing.assert_array_equal(ds.images.values, rng_images((24, 6, 5), 5))
    np.testing.assert_array_equal(ds.labels.values, src.labels.values)
    np.testing.assert_array_equal(ds.split.values == "test", src.split.values)
    assert ds.attrs["class_names"] == ["ant", "bee", "cat"]
    # the class names as the group's attr, and a plain zarr group (no dimension names)
    attr = src.drop_vars("class_names").assign_attrs(class_names=["ant", "bee", "cat"])
    attr.to_zarr(tmp_path / "attr.zarr")
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    for name in ("images", "labels", "split"):
        plain.create_array(name, data=src[name].values)
    for name in ("attr", "plain"):
        got = stage("array", tmp_path / f"{name}-out.zarr", from_dir=tmp_path / f"{name}.zarr")
        ds2 = read_back(got)
        np.testing.assert_array_equal(ds2.images.values, ds.images.values)
        np.testing.assert_array_equal(ds2.labels.values, ds.labels.values)
        assert ds2.split.values.tolist() == ds.split.values.tolist()
    assert ds2.attrs["class_names"] == ["0", "1", "2"]  # the plain group has no names


def test_a_staged_store_restages_as_it_is(tmp_path: Path) -> None:
    first = stage("digits", tmp_path / "digits.zarr", chunk_rows=500)
    again = stage("array", tmp_path / "again.zarr", from_dir=first)
    a, b = xr.open_zarr(first).load(), read_back(again)
    for name in ("images", "labels", "split"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a.attrs["class_names"] == b.attrs["class_names"]


def _peak_staging(src: Path, out: Path) -> int:
    """Peak bytes numpy and Python allocated while staging `src` (tracemalloc)."""
    tracemalloc.start()
    try:
        stage("array", out, from_dir=src, chunk_rows=200)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_input_is_streamed_in_bounded_blocks(tmp_path: Path, monkeypatch) -> None:
    """Compressed .npz of 16 and 32 MB staged with 1 MB reads: the peak does not grow."""
    monkeypatch.setattr(arrays, "READ_BYTES", 2**20)
    peaks = []
    for n in (1600, 3200):
        images = rng_images((n, 100, 100), 6)
        src = tmp_path / f"big{n}.npz"
        np.savez_compressed(src, images=images, labels=np.arange(n) % 7)
        peaks.append(_peak_staging(src, tmp_path / f"big{n}.zarr"))
        np.testing.assert_array_equal(read_back(tmp_path / f"big{n}.zarr").images.values, images)
    assert peaks[1] < 1.25 * peaks[0] + 2**20, f"peaks {peaks} grow with the input"
    assert peaks[1] < images.nbytes / 3, f"peak {peaks[1] / 2**20:.1f} MiB while staging"


def test_zarr_input_on_s3(s3, tmp_path: Path) -> None:
    src = _dataset()
    src.to_zarr(tmp_path / "ds.zarr")
    s3.filesystem().put(str(tmp_path / "ds.zarr"), f"{s3.bucket}/in/ds.zarr", recursive=True)
    url = f"s3://{s3.bucket}/in/ds.zarr"
    proc = cli(STAGE, "array", "--from", url, "--out", tmp_path / "env.zarr", env=s3.env())
    assert proc.returncode == 0, proc.stderr
    local = read_back(tmp_path / "env.zarr")
    np.testing.assert_array_equal(local.images.values, rng_images((24, 6, 5), 5))
    np.testing.assert_array_equal(local.labels.values, src.labels.values)
    assert local.attrs["class_names"] == ["ant", "bee", "cat"]
    # credentials in --storage-options only, for --from and --out alike
    env = s3.env()
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    key, secret = getattr(s3, "key", ACCESS_KEY), getattr(s3, "secret", SECRET_KEY)
    options = json.dumps({"key": key, "secret": secret})
    out = f"s3://{s3.bucket}/out.zarr"
    proc = cli(STAGE, "array", "--from", url, "--out", out, "--storage-options", options, "-v",
               env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for text in (proc.stdout, proc.stderr):
        assert SECRET_KEY not in text and ACCESS_KEY not in text and secret not in text
    remote = read_back(out)
    for name in ("images", "labels", "split"):
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
    assert remote.attrs["fingerprint"] == local.attrs["fingerprint"]
    np.save(tmp_path / "in.npy", images := rng_images((9, 4, 4, 3), 8))  # a file on S3 too
    s3.filesystem().put(str(tmp_path / "in.npy"), f"{s3.bucket}/in.npy")
    npy = stage("array", tmp_path / "npy.zarr", from_dir=f"s3://{s3.bucket}/in.npy")
    np.testing.assert_array_equal(read_back(npy).images.values, images)
    missing = cli(STAGE, "array", "--from", f"s3://{s3.bucket}/nothing.zarr", "--out",
                  tmp_path / "m.zarr", env=s3.env())  # fmt: skip
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "no such file" in errors[0]
    assert not (tmp_path / "m.zarr").exists()


def test_sweep_and_report_on_an_unlabelled_rgb_npy(tmp_path: Path) -> None:
    """60 RGB 12 x 10 images, three colours: stage, sweep (k 2-3), report; J from numpy."""
    rng = np.random.default_rng(7)
    base = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.int16)
    noise = rng.integers(-25, 26, (60, 12, 10, 3))
    images = np.clip(base[np.arange(60) % 3][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    np.save(tmp_path / "rgb.npy", images)
    store, out = tmp_path / "rgb.zarr", tmp_path / "r.zarr"
    assert cli(STAGE, "array", "--from", tmp_path / "rgb.npy", "--out", store).returncode == 0
    args = ["--dataset", store, "--k", "2,3", "--seeds", "2", "--train", "all"]
    proc = cli(SWEEP, *args, "--scheduler", "threads", "--out", out, "--no-report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ds = xr.open_zarr(out).load()
    assert not any(name in ds for name in LABEL_VARS)
    assert ds.centroids.dims[-4:] == ("cluster", "y", "x", "channel")
    x = images.reshape(60, -1).astype(np.float64) / 255
    for k in ds.k.values:
        for seed in ds.seed.values:
            for init in ds.init.values:
                cell = ds.sel(k=k, init=init, seed=seed)
                assert cell.status.item() == "done"
                c = cell.centroids.values.reshape(ds.sizes["cluster"], -1)[:k].astype(np.float64)
                d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
                labels = d.argmin(1)
                np.testing.assert_allclose(float(cell.jclust), d[np.arange(60), labels].mean(),
                                           rtol=1e-6)  # fmt: skip
                np.testing.assert_array_equal(cell.cluster_size.values[:k], np.bincount(labels))
    report = cli(REPORT, out, "--out", tmp_path / "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "12 × 10 × 3 images (RGB" in text and "**unlabelled**" in text


# ------------------------------------------------------------------ bad input

IMG = rng_images((40, 5, 7))


def _npy(array: np.ndarray, **kw):
    return lambda src: np.save(src.with_suffix(".npy"), array, **kw) or src.with_suffix(".npy")


def _npz(**arrays_: np.ndarray):
    return lambda src: np.savez(src.with_suffix(".npz"), **arrays_) or src.with_suffix(".npz")


def _late(value) -> np.ndarray:
    """Good rows but the very last value: met only when the last block is read."""
    bad = rng_images((40, 5, 7)).astype(np.float64 if value != 300 else np.int64)
    bad = bad / 255 if bad.dtype.kind == "f" else bad
    bad[-1, -1, -1] = value
    return bad


def _cut_npy(src: Path) -> Path:
    np.save(src.with_suffix(".npy"), IMG)
    path = src.with_suffix(".npy")
    path.write_bytes(path.read_bytes()[:-50])
    return path


def _flip_npz(src: Path) -> Path:
    path = src.with_suffix(".npz")
    np.savez_compressed(path, images=IMG)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the compressed images member
    path.write_bytes(bytes(raw))
    return path


def _zarr(**variables: np.ndarray):
    def make(src: Path) -> Path:
        group = zarr.open_group(src.with_suffix(".zarr"), mode="w")
        for name, value in variables.items():
            group.create_array(name, data=value)
        return src.with_suffix(".zarr")

    return make


def _corrupt_zarr(src: Path) -> Path:
    path = src.with_suffix(".zarr")
    arr = zarr.create_array(path, shape=IMG.shape, dtype="u1", chunks=(10, 5, 7))
    arr[:] = IMG
    (path / "c" / "3" / "0" / "0").write_bytes(b"not a chunk")
    return path


def _names_disagree(src: Path) -> Path:
    path = src.with_suffix(".zarr")
    _dataset().assign_attrs(class_names=["x", "y", "z"]).to_zarr(path)
    return path


def _empty_dir(src: Path) -> Path:
    src.mkdir()
    return src


BAD = {
    "rank-2": (_npy(IMG[0]), "got shape (5, 7)"),
    "rank-5": (_npy(IMG.reshape(40, 5, 7, 1, 1)), "got shape (40, 5, 7, 1, 1)"),
    "rgba": (_npy(rng_images((4, 5, 7, 4))), "(4, 5, 7, 4): 4 channels"),
    "no-images": (_npy(np.zeros((0, 5, 7), np.uint8)), "holds no images"),
    "complex": (_npy(IMG.astype(complex)), "got complex128"),
    "object": (_npy(IMG.astype(object), allow_pickle=True), "got object"),
    "bool": (_npy(IMG > 9), "got bool"),
    "strings": (_npy(IMG.astype(str)), "integers 0-255 or floats"),
    "int-late": (_npy(_late(300)), "values must lie in [0, 255] (rows 38-39)"),
    "negative": (_npy(IMG.astype(np.int16) - 1), "[0, 255]"),
    "nan-late": (_npy(_late(np.nan)), "NaN or infinite values (rows 38-39)"),
    "float-above-1": (_npy(_late(1.5)), "[0, 1]"),
    "label-count": (_npz(images=IMG, labels=np.arange(39) % 3), "39 labels for 40 images"),
    "names-no-labels": (_npz(images=IMG, class_names=np.array(["a"])), "without 'labels'"),
    "garbage": (lambda src: (src.write_bytes(b"images\n1,2,3\n"), src)[1], "cannot read as .npy"),
    "truncated-npy": (_cut_npy, "truncated"),
    "corrupt-npz": (_flip_npz, "cannot read"),
    "not-zarr": (_empty_dir, "neither an .npy/.npz file nor a zarr array or group"),
    "group-no-images": (_zarr(labels=np.arange(40)), "without an 'images' array"),
    "group-unknown": (_zarr(images=IMG, label=np.arange(40)), "unknown variables label"),
    "group-labels": (_zarr(images=IMG, labels=np.arange(41)), "41 labels for 40 images"),
    "names-disagree": (_names_disagree, "'class_names' variable and attr differ"),
    "corrupt-chunk": (_corrupt_zarr, "cannot read 'images' rows"),
    "missing": (lambda src: src, "no such file or zarr store"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    monkeypatch.setattr(arrays, "READ_BYTES", 8 * 35 * 8)  # 8 rows a read: a late bad value
    make, fragment = BAD[case]
    src = make(tmp_path / "in")
    (tmp_path / "out").mkdir()
    argv = ["array", "--from", str(src), "--out", str(tmp_path / "out" / "a.zarr")]
    code = run_main(stage_main, [*argv, "--chunk-rows", "10"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert fragment in lines[0], lines[0]
    assert captured.out == "" and list((tmp_path / "out").iterdir()) == []


def test_a_late_bad_value_from_the_command_line(tmp_path: Path) -> None:
    """The real script: a NaN in the last of several chunks, nothing left beside --out."""
    np.save(tmp_path / "in.npy", _late(np.nan))
    proc = cli(STAGE, "array", "--from", tmp_path / "in.npy", "--out", tmp_path / "a.zarr",
               "--chunk-rows", 8)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "NaN" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


def test_image_options_are_refused(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "in.npy", IMG)
    argv = ["array", "--from", str(tmp_path / "in.npy"), "--out", str(tmp_path / "a.zarr")]
    assert run_main(stage_main, [*argv, "--size", "4x4"]) == 2
    assert "--size applies only to the images source" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]
