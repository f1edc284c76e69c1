"""The images source: folders of PNG/JPEG/BMP/GIF/TIFF staged exactly as Pillow decodes them.

Every expectation is Pillow's own decode of the file (np.asarray(Image.open(f).convert(mode))),
the file order and labels are worked out here from the folder names, and a colour 12 x 10 set
goes through sweep and report to RGB figures.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from kmclust.cli import run_main
from kmclust.commands.stage import main as stage_main
from kmclust.data.stores import (
    flat_images,
    image_rows,
    labelled,
    load_images,
    open_images,
    stage,
    verify_store,
)

ROOT = Path(__file__).resolve().parents[1]
SWEEP, STAGE = ROOT / "jobs" / "sweep.py", ROOT / "data" / "stage.py"
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF"}


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix])
    return path


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _expected_files(root: Path) -> list[tuple[Path, int, bool]]:
    """(file, label, is_test) in the documented order, worked out from the folder itself."""
    splits = ["train", "test"] if (root / "train").is_dir() else [""]
    out = []
    for split in splits:
        base = root / split
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        for label, name in enumerate(classes):
            files = sorted(p for p in (base / name).iterdir() if p.suffix in FORMATS)
            out += [(f, label, split == "test") for f in files]
    return out


def _pillow(files: list[Path], mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The reference: Pillow's own decode (and resize) of each file."""
    out = []
    for f in files:
        image = Image.open(f).convert(mode)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out.append(np.asarray(image))
    return np.stack(out)


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    """Three classes of 9 x 7 grayscale images, one file of each format per class, and a note."""
    root = tmp_path / "gray"
    rng = _rng(1)
    for name in ("b-dog", "a-cat", "c-owl"):
        for i, ext in enumerate(FORMATS):
            _save(root / name / f"img{i}{ext}", rng.integers(0, 256, (9, 7), dtype=np.uint8))
    (root / "a-cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    """train/ and test/ of 12 x 10 RGB PNGs, three classes of clearly different colours."""
    root = tmp_path / "rgb"
    rng = _rng(2)
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 12), ("test", 4)):
        for name, colour in colours.items():
            for i in range(n):
                noise = rng.integers(-25, 26, (12, 10, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                _save(root / split / name / f"{i:02d}.png", pixels)
    return root


def test_gray_classes_in_every_format_equal_pillows_decode(
    gray_folder: Path, tmp_path: Path
) -> None:
    ds = open_images(stage("images", tmp_path / "g.zarr", from_dir=gray_folder, workers=1))
    expected = _expected_files(gray_folder)
    files = [f for f, _, _ in expected]
    assert ds.images.dims == ("sample", "y", "x") and ds.images.shape == (15, 9, 7)
    np.testing.assert_array_equal(ds.images.values, _pillow(files, "L"))
    assert ds.labels.values.tolist() == [label for _, label, _ in expected]
    assert ds.labels.values.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert ds.attrs["class_names"] == ["a-cat", "b-dog", "c-owl"]
    assert (ds.split.values == "train").all() and ds.attrs["skipped_files"] == 1
    assert ds.attrs["image_mode"] == "L" and ds.attrs["labelled"] is True
    verify_store(tmp_path / "g.zarr")


def test_rgb_train_test_12x10(rgb_folder: Path, tmp_path: Path) -> None:
    out = stage("images", tmp_path / "c.zarr", from_dir=rgb_folder, chunk_rows=10)
    ds = open_images(out)
    expected = _expected_files(rgb_folder)
    assert ds.images.dims == ("sample", "y", "x", "channel")
    assert ds.images.shape == (48, 12, 10, 3) and ds.images.chunks[0] == (10,) * 4 + (8,)
    pixels = _pillow([f for f, _, _ in expected], "RGB")
    np.testing.assert_array_equal(ds.images.values, pixels)
    assert ds.labels.values.tolist() == [label for _, label, _ in expected]
    assert (ds.split.values == "test").tolist() == [t for _, _, t in expected]
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (36, 12)
    assert ds.attrs["class_names"] == ["blue", "green", "red"]
    # the engine's rows: (y, x, channel) flattened in C order
    assert flat_images(ds).shape == image_rows(out, "rgb-rows").shape == (48, 360)
    np.testing.assert_array_equal(load_images(ds), pixels.reshape(48, 360))
    np.testing.assert_array_equal(image_rows(out, "rgb-rows2").compute(), pixels.reshape(48, 360))
    verify_store(out)


def test_mode_and_size(rgb_folder: Path, tmp_path: Path) -> None:
    files = [f for f, _, _ in _expected_files(rgb_folder)]
    ds = open_images(stage("images", tmp_path / "l.zarr", from_dir=rgb_folder, mode="L"))
    assert ds.images.dims == ("sample", "y", "x")
    np.testing.assert_array_equal(ds.images.values, _pillow(files, "L"))
    # mixed sizes are fine with --size: every image resized with Pillow's bilinear filter
    odd = rgb_folder / "train" / "red" / "00.png"
    _save(odd, _rng(3).integers(0, 256, (31, 17, 3), dtype=np.uint8))
    ds = open_images(stage("images", tmp_path / "s.zarr", from_dir=rgb_folder, size=(8, 6)))
    assert ds.images.shape == (48, 8, 6, 3) and ds.attrs["size"] == [8, 6]
    np.testing.assert_array_equal(ds.images.values, _pillow(files, "RGB", (8, 6)))


def test_a_colour_image_after_gray_ones_makes_an_rgb_store(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    rng = _rng(4)
    for i in range(6):
        _save(root / "a" / f"{i}.png", rng.integers(0, 256, (5, 4), dtype=np.uint8))
    _save(root / "b" / "x.png", rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
    _save(root / "b" / "y.gif", rng.integers(0, 256, (5, 4), dtype=np.uint8))
    ds = open_images(stage("images", tmp_path / "m.zarr", from_dir=root, workers=2))
    files = [f for f, _, _ in _expected_files(root)]
    assert ds.images.shape == (8, 5, 4, 3) and ds.attrs["image_mode"] == "RGB"
    np.testing.assert_array_equal(ds.images.values, _pillow(files, "RGB"))


def test_unlabelled_folder(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    rng = _rng(5)
    for name in ("b.png", "a.jpg", "c.bmp"):
        _save(root / name, rng.integers(0, 256, (6, 6), dtype=np.uint8))
    out = stage("images", tmp_path / "u.zarr", from_dir=root)
    ds = open_images(out)
    assert "labels" not in ds and not labelled(ds)
    assert ds.attrs["labelled"] is False and "class_names" not in ds.attrs
    files = [root / n for n in ("a.jpg", "b.png", "c.bmp")]
    np.testing.assert_array_equal(ds.images.values, _pillow(files, "L"))
    verify_store(out)
    # a store that lost its labels without saying it is unlabelled is still refused
    split = ("sample",), ds.split.values.astype(object)
    xr.Dataset({"images": ds.images, "split": split}).to_zarr(
        tmp_path / "bad.zarr", zarr_format=3, consolidated=False
    )
    with pytest.raises(Exception, match="no 'labels' variable"):
        open_images(tmp_path / "bad.zarr")


def _chunks(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def test_same_bytes_whatever_the_parallelism(rgb_folder: Path, tmp_path: Path) -> None:
    runs = {
        "sync": {"workers": 1},
        "threads": {"workers": 2, "parallel": "threads"},
        "processes": {"workers": 3, "parallel": "processes"},
    }
    stores = {
        name: stage("images", tmp_path / f"{name}.zarr", from_dir=rgb_folder, chunk_rows=7, **kw)
        for name, kw in runs.items()
    }
    chunks = {name: _chunks(path) for name, path in stores.items()}
    assert chunks["sync"] == chunks["threads"] == chunks["processes"]
    prints = {open_images(p).attrs["fingerprint"] for p in stores.values()}
    assert len(prints) == 1
    # the fingerprint is the files' bytes and paths (a renamed class is another label)
    files = [f for f, _, _ in _expected_files(rgb_folder)]
    lines = "".join(
        f"{f.relative_to(rgb_folder).as_posix()}\t{hashlib.sha256(f.read_bytes()).hexdigest()}\n"
        for f in files
    )
    manifest = hashlib.sha256(lines.encode()).hexdigest()
    assert open_images(stores["sync"]).attrs["sha256"] == {"rgb": manifest}
    _save(files[5], np.zeros((12, 10, 3), np.uint8))
    changed = stage("images", tmp_path / "changed.zarr", from_dir=rgb_folder)
    assert open_images(changed).attrs["fingerprint"] not in prints
    os.rename(rgb_folder / "train" / "red", rgb_folder / "train" / "zred")
    os.rename(rgb_folder / "test" / "red", rgb_folder / "test" / "zred")
    renamed = stage("images", tmp_path / "renamed.zarr", from_dir=rgb_folder)
    assert open_images(renamed).attrs["fingerprint"] != open_images(changed).attrs["fingerprint"]


def test_sweep_and_report_on_a_12x10_rgb_folder(rgb_folder: Path, tmp_path: Path) -> None:
    store = stage("images", tmp_path / "rgb.zarr", from_dir=rgb_folder)
    out = tmp_path / "r.zarr"
    args = ["--scheduler", "threads", "--dataset", str(store), "--k", "2,3"]
    args += ["--seeds", "2", "--train", "all", "--out", str(out)]
    r = subprocess.run(
        [sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out)
    assert ds.centroids.dims[-4:] == ("cluster", "y", "x", "channel")
    assert (ds.sizes["y"], ds.sizes["x"], ds.sizes["channel"]) == (12, 10, 3)
    assert (ds.status.values == "done").all()
    report = tmp_path / "r-report"
    assert "12 × 10 × 3 images (RGB" in (report / "REPORT.md").read_text()
    figures = sorted(report.glob("representatives_*.png"))
    assert figures
    for path in figures:
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        # the red, green and blue centroids are drawn in colour: strongly red and blue pixels
        red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
        blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80) & (pixels[..., 1] < 80)
        assert red.sum() > 100 and blue.sum() > 100, path


# ------------------------------------------------------------------ bad input


def _truncated(root: Path) -> str:
    _save(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    whole = _save(root / "a" / "1.png", _rng(6).integers(0, 256, (8, 8), dtype=np.uint8))
    whole.write_bytes(whole.read_bytes()[:-30])
    return "a/1.png"


def _garbage(root: Path) -> str:
    _save(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    (root / "a" / "1.jpg").write_bytes(b"not a jpeg at all")
    return "a/1.jpg: cannot read as an image"


def _mixed_sizes(root: Path) -> str:
    _save(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    _save(root / "b" / "0.png", np.zeros((8, 5), np.uint8))
    _save(root / "b" / "1.png", np.zeros((8, 5), np.uint8))
    return "images of 2 sizes (HxW): 8x5 (e.g. b/0.png); 8x8 (e.g. a/0.png); give --size"


def _empty(root: Path) -> str:
    root.mkdir()
    return "no images"


def _class_without_images(root: Path) -> str:
    _save(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("x")
    return "b: class folder with no images"


def _split_mismatch(root: Path) -> str:
    _save(root / "train" / "a" / "0.png", np.zeros((8, 8), np.uint8))
    _save(root / "train" / "b" / "0.png", np.zeros((8, 8), np.uint8))
    _save(root / "test" / "a" / "0.png", np.zeros((8, 8), np.uint8))
    return "only in train: b; only in test: -"


def _images_beside_folders(root: Path) -> str:
    _save(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    _save(root / "1.png", np.zeros((8, 8), np.uint8))
    return "holds both images (1.png) and folders (a)"


def _sixteen_bit(root: Path) -> str:
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(root / "a" / "0.png")
    return "(16-bit or float) images are not supported"


BAD = {
    "truncated": (_truncated, []),
    "truncated-processes": (_truncated, ["--parallel", "processes", "--workers", "2"]),
    "truncated-threads": (_truncated, ["--parallel", "threads", "--workers", "2"]),
    "garbage": (_garbage, []),
    "mixed-sizes": (_mixed_sizes, []),
    "empty": (_empty, []),
    "class-without-images": (_class_without_images, []),
    "missing": (lambda root: "no such folder", []),
    "split-mismatch": (_split_mismatch, []),
    "images-beside-folders": (_images_beside_folders, []),
    "16-bit": (_sixteen_bit, []),
    "bad-size": (_empty, ["--size", "12by10"]),
    "bad-mode": (_empty, ["--mode", "CMYK"]),
    "workers": (_empty, ["--workers", "0"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, case: str) -> None:
    make, extra = BAD[case]
    src = tmp_path / "in"
    fragment = make(src)
    fragment = {"bad-size": "HxW", "bad-mode": "--mode", "workers": "positive"}.get(case, fragment)
    (tmp_path / "out").mkdir()
    argv = ["images", "--from", str(src), "--out", str(tmp_path / "out" / "s.zarr"), *extra]
    code = run_main(stage_main, argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, captured.err
    assert fragment in lines[0] and "Traceback" not in captured.err, captured.err
    assert captured.out == "" and list((tmp_path / "out").iterdir()) == []


def test_a_corrupt_file_from_the_command_line(tmp_path: Path) -> None:
    """The real script, worker processes: one error line naming the file, nothing written."""
    src = tmp_path / "in"
    _truncated(src)
    args = ["images", "--from", str(src), "--out", str(tmp_path / "s"), "--workers", "2"]
    r = subprocess.run(
        [sys.executable, str(STAGE), *args, "--parallel", "processes"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{src / 'a' / '1.png'}: cannot read" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_image_options_belong_to_the_images_source(tmp_path: Path, capsys) -> None:
    code = run_main(stage_main, ["digits", "--out", str(tmp_path / "d.zarr"), "--size", "8x8"])
    assert code == 2 and "--size applies only to the images source" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
