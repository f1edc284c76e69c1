"""kmclust.data.idx against hand-built bytes, every malformed-file case, and a fuzzer."""

from __future__ import annotations

import gzip
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kmclust.data.idx import read_idx, read_idx_pair, write_idx
from kmclust.errors import IDXError

RNG = np.random.default_rng(1234)


def images_bytes(
    n: int, rows: int = 28, cols: int = 28, magic: int = 0x00000803
) -> tuple[bytes, np.ndarray]:
    """An images file built by hand with struct (independent of write_idx)."""
    pixels = RNG.integers(0, 256, (n, rows, cols), dtype=np.uint8)
    return struct.pack(">IIII", magic, n, rows, cols) + pixels.tobytes(), pixels


def labels_bytes(values: list[int]) -> bytes:
    return struct.pack(">II", 0x00000801, len(values)) + bytes(values)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_hand_built_files(tmp_path: Path, gz: bool) -> None:
    data, pixels = images_bytes(7)
    suffix = ".gz" if gz else ""
    img = tmp_path / f"img{suffix}"
    lab = tmp_path / f"lab{suffix}"
    img.write_bytes(gzip.compress(data) if gz else data)
    lab.write_bytes(
        gzip.compress(labels_bytes([3, 1, 4, 1, 5, 9, 2]))
        if gz
        else labels_bytes([3, 1, 4, 1, 5, 9, 2])
    )
    got_images, got_labels = read_idx_pair(img, lab)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    np.testing.assert_array_equal(got_images, pixels)
    assert got_labels.tolist() == [3, 1, 4, 1, 5, 9, 2]


def test_writer_produces_the_hand_built_bytes(tmp_path: Path) -> None:
    data, pixels = images_bytes(5)
    write_idx(tmp_path / "a", pixels)
    assert (tmp_path / "a").read_bytes() == data
    write_idx(tmp_path / "a.gz", pixels)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == data
    write_idx(tmp_path / "l", np.array([0, 9, 7], dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == b"\x00\x00\x08\x01\x00\x00\x00\x03\x00\x09\x07"


@pytest.mark.parametrize("name", ["x", "x.gz"])
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    pixels = RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, 50, dtype=np.uint8)
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / f"i{name}", pixels), "images"), pixels
    )
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / f"l{name}", labels), "labels"), labels
    )


def test_writer_refuses_other_dtypes(tmp_path: Path) -> None:
    with pytest.raises(IDXError, match="uint8"):
        write_idx(tmp_path / "f", np.zeros((2, 28, 28), dtype=np.float32))


GOOD, _ = images_bytes(4)


def _html() -> bytes:
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body>gone</body></html>\n"
    )


# (file name, file bytes, kind, expected fragment of the message)
BAD = {
    "empty": ("f", b"", "images", "empty file"),
    "html": ("f", _html(), "images", "HTML page"),
    "html-gz-name": ("f.gz", _html(), "images", "HTML page"),
    "html-gzipped": ("f.gz", gzip.compress(_html()), "images", "HTML page"),
    "gzip-without-gz-name": (
        "f",
        gzip.compress(GOOD),
        "images",
        "gzip-compressed but its name does not end in .gz",
    ),
    "gz-name-not-gzip": ("f.gz", GOOD, "images", "named .gz but not gzip-compressed"),
    "bad-magic": ("f", b"\x12\x34" + GOOD[2:], "images", "bad magic number"),
    "float-type": ("f", GOOD[:2] + b"\x0d" + GOOD[3:], "images", "element type 0x0D"),
    "labels-as-images": ("f", labels_bytes([1, 2]), "images", "is an IDX labels file"),
    "images-as-labels": ("f", GOOD, "labels", "is an IDX images file"),
    "wrong-ndim": (
        "f",
        struct.pack(">II", 0x00000802, 4) + struct.pack(">I", 784) + GOOD[16:],
        "images",
        "dimension",
    ),
    "wrong-pixels": ("f", images_bytes(2, 32, 32)[0], "images", "32x32 pixels, expected 28x28"),
    "short-header": ("f", GOOD[:10], "images", "truncated header"),
    "truncated": ("f", GOOD[:-1], "images", "truncated"),
    "too-long": ("f", GOOD + b"\0", "images", "longer than declared"),
    "gz-short-stream": ("f.gz", gzip.compress(GOOD[:-784]), "images", "truncated"),
    "gz-long-stream": ("f.gz", gzip.compress(GOOD + b"\1" * 784), "images", "longer than declared"),
    "gz-cut": ("f.gz", gzip.compress(GOOD)[:-30], "images", "truncated gzip stream"),
    "gz-garbage": ("f.gz", b"\x1f\x8b" + bytes(200), "images", "corrupt gzip"),
    "absurd-raw": (
        "f",
        struct.pack(">IIII", 0x803, 4_000_000_000, 28, 28) + bytes(100),
        "images",
        "limit",
    ),
    "huge-raw": (
        "f",
        struct.pack(">IIII", 0x803, 1_000_000, 28, 28) + bytes(100),
        "images",
        "truncated",
    ),
    "absurd-gz": (
        "f.gz",
        gzip.compress(struct.pack(">IIII", 0x803, 10_000_000, 28, 28)),
        "images",
        "gzip file can hold",
    ),
    "label-out-of-range": (
        "f",
        labels_bytes([1, 2, 12, 3]),
        "labels",
        "label 12 at index 2 is outside 0-9",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_raises_one_line_idx_error(tmp_path: Path, case: str) -> None:
    name, data, kind, fragment = BAD[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(IDXError) as info:
        read_idx(path, kind, expect_shape=(28, 28))
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IDXError, match="no such file"):
        read_idx(tmp_path / "nope", "images")


def test_count_mismatch(tmp_path: Path) -> None:
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.write_bytes(GOOD)  # 4 images
    lab.write_bytes(labels_bytes([1, 2, 3]))
    with pytest.raises(IDXError, match="4 images but .* 3 labels"):
        read_idx_pair(img, lab)


def test_lying_gzip_header_is_rejected_before_allocating(tmp_path: Path) -> None:
    """A gzip file declaring 7.8 GB (under the hard cap) must not make us allocate it."""
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 10_000_000, 28, 28) + bytes(10_000)))
    tracemalloc.start()
    try:
        with pytest.raises(IDXError):
            read_idx(path, "images")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


# ------------------------------------------------------------------ fuzz


def _header_strategy() -> st.SearchStrategy[bytes]:
    """Mostly plausible IDX headers (right magic, small dims), random twists and payload lengths."""
    dim = st.one_of(st.integers(0, 4), st.sampled_from([2, 3, 28, 28, 2**31, 2**32 - 1]))

    @st.composite
    def build(draw) -> bytes:
        zero = draw(st.sampled_from([0] * 8 + [1, 0xFFFF]))
        dtype = draw(st.sampled_from([0x08] * 8 + [0x0D, 0x00]))
        ndim = draw(st.sampled_from([1, 3] * 4 + [0, 2, 4]))
        dims = [draw(dim) for _ in range(ndim)]
        header = struct.pack(">HBB", zero, dtype, ndim) + struct.pack(f">{ndim}I", *dims)
        declared = int(np.prod(dims)) if dims else 1
        choices = [declared] * 4 + [declared - 1, declared + 1, 0, 3] if declared < 5_000 else [5]
        length = max(draw(st.sampled_from(choices)), 0)
        payload = draw(st.binary(min_size=length, max_size=length))
        return header + payload

    return build()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(st.binary(max_size=300), _header_strategy()),
    cut=st.one_of(st.none(), st.integers(0, 300)),
    compress=st.booleans(),
    gz_name=st.booleans(),
    kind=st.sampled_from(["images", "labels"]),
    shape=st.sampled_from([(28, 28), (2, 3), None]),
)
# found by this fuzz: a zero dimension beside absurd ones (0 bytes of data, but no array
# numpy can shape)
@example(
    data=b"\x00\x00\x08\x03\x00\x00\x00\x00\x81\x03\t\x1c\xfd\xfd\xfd\xfd",
    cut=None,
    compress=False,
    gz_name=False,
    kind="images",
    shape=None,
)
@example(
    data=b"\x00\x00\x08\x03\x81\x03\t\x1c\x00\x00\x00\x00\xfd\xfd\xfd\xfd",
    cut=None,
    compress=True,
    gz_name=True,
    kind="images",
    shape=None,
)
def test_fuzz_read_idx_parses_or_raises_idx_error(
    data, cut, compress, gz_name, kind, shape
) -> None:
    blob = gzip.compress(data) if compress else data
    if cut is not None:
        blob = blob[:cut]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if gz_name else "f")
        path.write_bytes(blob)
        try:
            arr = read_idx(path, kind, expect_shape=shape)
        except IDXError as exc:
            assert str(path) in str(exc)
            return
    assert arr.dtype == np.uint8
    assert arr.ndim == (3 if kind == "images" else 1)
    if kind == "labels":
        assert arr.size == 0 or arr.max() <= 9
