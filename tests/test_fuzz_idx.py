"""Fuzz: reading an IDX file never allocates more memory than the file itself can justify.

tests/test_idx.py fuzzes "parses or raises IDXError" and checks one lying
gzip header for allocation; this file fuzzes the allocation bound itself over
lying headers (declared counts up to 2³²−1), raw and gzip files, short and
highly compressible payloads:

- a raw file can justify at most its own size;
- a gzip file at most what its compressed bytes can expand to: deflate's
  maximum ratio is 1032:1 (zlib technical details, "Maximum compression
  factor"), plus gzip's own header/trailer bytes.

Memory is measured with tracemalloc, which sees numpy's buffers (numpy
reports its data allocations to it).
"""

from __future__ import annotations

import gzip
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kmclust.errors import IDXError
from kmclust.idx import read_idx

DEFLATE_MAX_RATIO = 1032
GZIP_OVERHEAD = 1024  # gzip header, trailer and block headers, generously
SLACK = 1 << 20  # read buffers (gzip reads 128 KiB at a time), headers, small objects

COUNTS = st.one_of(
    st.integers(0, 50),  # honest-sized files
    st.integers(1_000, 11_000_000),  # 0.8 MB … 8.6 GB of images: under the reader's hard cap, the dangerous range
    st.integers(0, 2**32 - 1),  # anything a header can say
)


@st.composite
def idx_files(draw) -> tuple[bytes, str, bool]:
    """(file bytes, kind, gzip?) with a plausible header whose count may lie."""
    kind = draw(st.sampled_from(["images", "labels"]))
    n = draw(COUNTS)
    header = struct.pack(">IIII", 0x803, n, 28, 28) if kind == "images" else struct.pack(">II", 0x801, n)
    body = draw(st.one_of(
        st.binary(max_size=2048),  # incompressible-ish and short
        st.integers(0, 400_000).map(bytes),  # zeros: compress ~1000:1, so a tiny .gz may be honest and large
        st.just(bytes(n * (784 if kind == "images" else 1))) if n <= 50 else st.just(b""),  # exactly as declared
    ))
    compress = draw(st.booleans())
    data = header + body
    if compress:
        data = gzip.compress(data, compresslevel=9)
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(data) - 1))))
    return (data if cut is None else data[:cut]), kind, compress


def justified(size: int, compressed: bool) -> int:
    """The most bytes of data a file of ``size`` bytes can hold."""
    return DEFLATE_MAX_RATIO * size + GZIP_OVERHEAD if compressed else size


@settings(max_examples=200, deadline=None)
@given(idx_files())
def test_fuzz_allocation_is_bounded_by_what_the_file_can_hold(case: tuple[bytes, str, bool]) -> None:
    data, kind, compressed = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if compressed else "f")
        path.write_bytes(data)
        tracemalloc.start()
        try:
            try:
                arr = read_idx(path, kind)
            except IDXError:
                arr = None
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak <= justified(len(data), compressed) + SLACK, (peak, len(data), compressed)
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.nbytes <= justified(len(data), compressed)


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
