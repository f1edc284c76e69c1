"""Fuzz: reading an IDX file never allocates more memory than the file itself can justify.

tests/test_idx.py fuzzes "parses or raises IDXError" and checks one lying
gzip header for allocation; this file fuzzes the allocation bound itself over
lying headers (declared counts up to 2³²−1), raw and gzip files, short and
highly compressible payloads:

- a raw file can justify at most its own size;
- a gzip file at most what its compressed bytes can expand to: deflate's
  maximum ratio is 1032:1 (zlib technical details, "Maximum compression
  factor"), plus gzip's own header/trailer bytes;
- and, whatever its header claims, at most about twice what the file really
  holds (its size, or what its gzip stream decompresses to before it ends or
  breaks): the reader grows its array by doubling as data arrives, so a lying
  header cannot make it allocate the claim up front.

Both bounds allow one copy of the data plus SLACK, no more: a reader that
decompresses whole and copies (the bug this file first caught: a 382-byte
gzip labels file peaking at 1.5 MB, four copies of its 0.39 MB claim) fails.

Memory is measured with tracemalloc, which sees numpy's buffers (numpy
reports its data allocations to it).
"""

from __future__ import annotations

import gzip
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kmclust.data.idx import read_idx
from kmclust.errors import IDXError

DEFLATE_MAX_RATIO = 1032
GZIP_OVERHEAD = 1024  # gzip header, trailer and block headers, generously
SLACK = 1 << 20  # read buffers (gzip reads 128 KiB at a time), headers, small objects

COUNTS = st.one_of(
    st.integers(0, 50),  # honest-sized files
    st.integers(
        1_000, 11_000_000
    ),  # 0.8 MB … 8.6 GB of images: under the reader's hard cap, the dangerous range
    st.integers(0, 2**32 - 1),  # anything a header can say
)


@st.composite
def idx_files(draw) -> tuple[bytes, str, bool]:
    """(file bytes, kind, gzip?) with a plausible header whose count may lie."""
    kind = draw(st.sampled_from(["images", "labels"]))
    n = draw(COUNTS)
    header = (
        struct.pack(">IIII", 0x803, n, 28, 28) if kind == "images" else struct.pack(">II", 0x801, n)
    )
    body = draw(
        st.one_of(
            st.binary(max_size=2048),  # incompressible-ish and short
            st.integers(0, 400_000).map(
                bytes
            ),  # zeros: compress ~1000:1, so a tiny .gz may be honest and large
            st.just(bytes(n * (784 if kind == "images" else 1)))
            if n <= 50
            else st.just(b""),  # exactly as declared
        )
    )
    compress = draw(st.booleans())
    data = header + body
    if compress:
        data = gzip.compress(data, compresslevel=9)
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(data) - 1))))
    return (data if cut is None else data[:cut]), kind, compress


def justified(size: int, compressed: bool) -> int:
    """The most bytes of data a file of ``size`` bytes can hold."""
    return DEFLATE_MAX_RATIO * size + GZIP_OVERHEAD if compressed else size


def held(data: bytes, compressed: bool) -> int:
    """What a file really holds: its size, or what its gzip stream yields till it ends or breaks.

    Fed 16 bytes at a time so a cut or corrupt stream still counts what came out before the damage.
    """
    if not compressed:
        return len(data)
    inflater = zlib.decompressobj(wbits=31)  # gzip framing, one member (gzip.compress writes one)
    total = 0
    try:
        for i in range(0, len(data), 16):
            total += len(inflater.decompress(data[i : i + 16]))
    except zlib.error:
        pass
    return total


def _peak_of_read(path: Path, kind: str) -> tuple[int, np.ndarray | None]:
    """(peak traced bytes, array or None on IDXError) of one read_idx call."""
    tracemalloc.start()
    try:
        try:
            arr = read_idx(path, kind)
        except IDXError:
            arr = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, arr


def _gz_labels(claimed: int, body: bytes) -> tuple[bytes, str, bool]:
    return gzip.compress(struct.pack(">II", 0x801, claimed) + body, compresslevel=9), "labels", True


@settings(max_examples=200, deadline=None)
@given(idx_files())
# the reported failure: a 382-byte gzip file claiming 392,500 labels and holding 348,500 zeros
# (old reader: peak 1,542,621 bytes, ~4 copies of the claim, against a bound of 1,443,824)
@example(_gz_labels(392_500, bytes(348_500)))
@example(_gz_labels(348_500, bytes(348_500)))  # the same, honest: 382 bytes, peak was 1,427,979
# 2 kB of incompressible gzip may claim 2 MB (under 1032:1) but holds 2 kB: no 2 MB allocation
@example(_gz_labels(2_000_000, np.random.default_rng(0).bytes(2000)))
def test_fuzz_allocation_is_bounded_by_what_the_file_can_hold(
    case: tuple[bytes, str, bool],
) -> None:
    data, kind, compressed = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if compressed else "f")
        path.write_bytes(data)
        peak, arr = _peak_of_read(path, kind)
    assert peak <= justified(len(data), compressed) + SLACK, (peak, len(data), compressed)
    assert peak <= 2 * held(data, compressed) + SLACK, (peak, held(data, compressed), compressed)
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.nbytes <= justified(len(data), compressed)
        assert arr.nbytes <= held(data, compressed)


def test_honest_gzip_costs_one_copy_of_its_data(tmp_path: Path) -> None:
    """A valid 2 MB labels file in 2 kB of gzip costs the array plus buffers, not copies of it."""
    path = tmp_path / "f.gz"
    data = _gz_labels(2_000_000, bytes(2_000_000))[0]
    path.write_bytes(data)
    peak, arr = _peak_of_read(path, "labels")
    assert arr is not None and arr.shape == (2_000_000,) and not arr.any()
    assert peak <= arr.nbytes + SLACK, peak


def test_out_of_range_label_is_found_without_a_full_size_mask(tmp_path: Path) -> None:
    """The 0-9 check names the first bad label and costs no second copy of a large labels file."""
    n = 3_000_000
    path = tmp_path / "f"
    path.write_bytes(struct.pack(">II", 0x801, n) + bytes(n - 1) + b"\x0c")
    tracemalloc.start()
    try:
        with pytest.raises(IDXError, match=f"label 12 at index {n - 1:d} is outside 0-9"):
            read_idx(path, "labels")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= n + SLACK, peak


def test_measurement_sees_the_array(tmp_path: Path) -> None:
    """tracemalloc does count the reader's numpy buffer, so the fuzz bound can fail."""
    n = 3000
    path = tmp_path / "f"
    path.write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + bytes(n * 784))
    tracemalloc.start()
    try:
        arr = read_idx(path, "images")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arr.shape == (n, 28, 28)
    assert peak >= n * 784
