"""The digits and array sources: exact staging, a sweep and a report on 8 x 8 images, bad input."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from sklearn.datasets import load_digits

from kmclust.cli import run_main
from kmclust.commands.stage import main as stage_main
from kmclust.data.stores import load_images, open_images, stage
from kmclust.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "jobs" / "sweep.py"


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stage("digits", tmp_path_factory.mktemp("digits") / "digits.zarr", chunk_rows=500)


# ------------------------------------------------------------------ digits


def test_digits_are_scikit_learns_scaled_to_0_255(digits_store: Path) -> None:
    bunch = load_digits()
    ds = open_images(digits_store)
    assert ds["images"].shape == (1797, 8, 8)
    # v * 255 / 16 rounded half up, computed here in floats (the source uses integers)
    expected = np.floor(bunch.images * 255 / 16 + 0.5).astype(np.uint8)
    assert np.array_equal(load_images(ds).reshape(-1, 8, 8), expected)
    assert np.array_equal(ds["labels"].values, bunch.target)
    assert (ds["split"].values == "train").all()
    assert ds.attrs["class_names"] == [str(d) for d in range(10)]
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (1797, 0)
    # the mapping's fixed points: 0 -> 0, 8 -> 128 (the tie rounds up), 16 -> 255
    for v, u in ((0, 0), (8, 128), (16, 255)):
        assert (expected[bunch.images == v] == u).all() and (bunch.images == v).any()


def test_digits_fingerprint_is_the_bundled_files_bytes(digits_store: Path) -> None:
    path = importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    attrs = open_images(digits_store).attrs
    assert attrs["sha256"] == {"digits.csv.gz": digest}
    doc = json.dumps(sorted({"digits.csv.gz": digest}.items()), sort_keys=True)
    assert attrs["fingerprint"] == hashlib.sha256(doc.encode()).hexdigest()


def test_digits_is_built_in(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="built in"):
        stage("digits", tmp_path / "d.zarr", from_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sweep_and_report_on_digits(tmp_path: Path, digits_store: Path) -> None:
    out = tmp_path / "r.zarr"
    args = ["--scheduler", "threads", "--dataset", str(digits_store), "--k", "5,10"]
    args += ["--seeds", "2", "--train-per-class", "50", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out)
    assert ds.centroids.dims[-3:] == ("cluster", "y", "x")
    assert (ds.sizes["y"], ds.sizes["x"]) == (8, 8)
    assert (ds.status.values == "done").all()
    assert "8 × 8" in (tmp_path / "r-report" / "REPORT.md").read_text()


# ------------------------------------------------------------------ array


def _rng_images(n: int = 40, shape: tuple[int, int] = (5, 7)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_array_round_trips_exactly(tmp_path: Path) -> None:
    images = _rng_images()
    labels = np.arange(40) % 3
    split = np.where(np.arange(40) < 30, "train", "test")
    names = np.array(["cat", "dog", "owl"])
    src = tmp_path / "in.npz"
    np.savez(src, images=images, labels=labels, split=split, class_names=names)
    ds = open_images(stage("array", tmp_path / "a.zarr", from_dir=src, chunk_rows=16))
    assert ds["images"].shape == (40, 5, 7)  # the store takes its shape from the input
    assert np.array_equal(ds["images"].values, images)
    assert np.array_equal(ds["labels"].values, labels)
    assert np.array_equal(ds["split"].values, split)
    assert ds.attrs["class_names"] == ["cat", "dog", "owl"]
    assert ds.attrs["sha256"] == {"in.npz": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (30, 10)


def test_array_defaults_bool_split_and_floats(tmp_path: Path) -> None:
    images = _rng_images()
    labels = (np.arange(40) % 4).astype(np.int64)
    is_test = np.arange(40) % 5 == 0
    # images / 255 as floats come back exactly: rint(v * 255)
    for i, floats in enumerate((images / 255, (images / 255).astype(np.float32))):
        src = tmp_path / f"f{i}.npz"
        np.savez(src, images=floats, labels=labels, split=is_test)
        ds = open_images(stage("array", tmp_path / f"f{i}.zarr", from_dir=src))
        assert np.array_equal(ds["images"].values, images)
        assert np.array_equal(ds["split"].values == "test", is_test)
        assert ds.attrs["class_names"] == ["0", "1", "2", "3"]  # "0".."max label"
    src = tmp_path / "plain.npz"
    np.savez(src, images=images, labels=labels)
    ds = open_images(stage("array", tmp_path / "plain.zarr", from_dir=src))
    assert (ds["split"].values == "train").all()
    first = ds.attrs["fingerprint"]
    np.savez(src, images=images, labels=labels[::-1])  # other bytes, other fingerprint
    ds = open_images(stage("array", tmp_path / "plain2.zarr", from_dir=src))
    assert ds.attrs["fingerprint"] != first


def _save(**arrays: np.ndarray):
    return lambda path: np.savez(path, **arrays)


IMG, LAB = _rng_images(), np.arange(40) % 10
BAD_ARRAYS = {
    "images-2d": (_save(images=IMG.reshape(40, -1), labels=LAB), "must be (N, height, width)"),
    "images-empty-side": (_save(images=np.zeros((40, 0, 5)), labels=LAB), "(N, height, width)"),
    "images-nan": (_save(images=np.full((40, 5, 7), np.nan), labels=LAB), "NaN or infinite"),
    "images-inf": (_save(images=np.full((40, 5, 7), np.inf), labels=LAB), "NaN or infinite"),
    "float-above-1": (_save(images=IMG * 1.0, labels=LAB), "must lie in [0, 1]"),
    "float-negative": (_save(images=-(IMG / 255), labels=LAB), "must lie in [0, 1]"),
    "int-above-255": (_save(images=np.full((40, 5, 7), 256), labels=LAB), "[0, 255]"),
    "images-bool": (_save(images=IMG > 9, labels=LAB), "integers 0-255 or floats"),
    "no-images": (_save(labels=LAB), "no 'images'"),
    "names-without-labels": (
        _save(images=IMG, class_names=np.array(["a", "b"])),
        "'class_names' without 'labels'",
    ),
    "label-count": (_save(images=IMG, labels=LAB[:-1]), "39 labels for 40 images"),
    "labels-float": (_save(images=IMG, labels=LAB * 1.0), "1-D integer"),
    "labels-negative": (_save(images=IMG, labels=LAB - 1), "0-255"),
    "unknown-key": (_save(images=IMG, labels=LAB, extra=LAB), "unknown keys extra"),
    "split-values": (_save(images=IMG, labels=LAB, split=np.full(40, "val")), "'split'"),
    "split-length": (_save(images=IMG, labels=LAB, split=np.zeros(39, bool)), "'split'"),
    "too-few-names": (
        _save(images=IMG, labels=LAB, class_names=np.array(["a", "b"])),
        "only 2 class names",
    ),
    "duplicate-names": (
        _save(images=IMG, labels=LAB % 2, class_names=np.array(["a", "a"])),
        "distinct strings",
    ),
    "object-array": (
        _save(images=IMG, labels=LAB, class_names=np.array(["a", 1], dtype=object)),
        "cannot read",
    ),
    "npy-rank-2": (lambda path: np.save(path.open("wb"), IMG[0]), "got shape (5, 7)"),
    "not-numpy": (lambda path: path.write_text("images,labels\n"), "cannot read"),
    "truncated": (
        lambda path: path.write_bytes(_npz_bytes(path, images=IMG, labels=LAB)[:300]),
        "cannot read",
    ),
    "missing": (lambda path: None, "no such file"),
}


def _npz_bytes(path: Path, **arrays: np.ndarray) -> bytes:
    np.savez(path, **arrays)
    return path.read_bytes()


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_array_refuses_bad_input(tmp_path: Path, capsys, case: str) -> None:
    make, fragment = BAD_ARRAYS[case]
    src = tmp_path / "in.npz"
    make(src)
    (tmp_path / "out").mkdir()
    code = run_main(
        stage_main, ["array", "--from", str(src), "--out", str(tmp_path / "out/a.zarr")]
    )
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert captured.out == "" and list((tmp_path / "out").iterdir()) == []


def test_array_needs_from_on_the_command_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "data" / "stage.py"), "array", "--out", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: array needs --from PATH: an .npy or .npz file, or a zarr array or group "
        "(images; optionally labels, split, class_names)"
    ]
    assert list(tmp_path.iterdir()) == []
