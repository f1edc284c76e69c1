"""Kernel invariants: exact toy cases and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kmclust.lloyd import chunk as kernels
from kmclust.lloyd.kernel import ChunkArgs, lloyd_chunk
from kmclust.lloyd.partial import ChunkState, combine

chunks = hnp.arrays(np.uint8, st.tuples(st.integers(2, 40), st.integers(1, 6)))


def _stack(cents: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in cents])]).astype(np.int64)
    return np.concatenate(cents), offsets


def _args(stack: np.ndarray, offsets: np.ndarray, m: int, **named) -> ChunkArgs:
    """A chunk task's arguments for integer data, every run of the stack, no labels wanted."""
    base = dict(
        centroids=stack,
        offsets=offsets,
        run_ids=np.arange(offsets.size - 1),
        evals={},
        m=m,
        integer=True,
        want_labels=False,
    )
    return ChunkArgs(**(base | named))


def test_assign_toy_two_runs_by_hand() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    stack, offsets = _stack([np.array([[0.0], [1.0]]), np.array([[5.0], [0.5], [12.0]])])
    labels, dmin = kernels.assign(x, stack, offsets)
    assert labels.tolist() == [[0, 1], [1, 1], [1, 2], [1, 2]]
    np.testing.assert_allclose(dmin, [[0, 0.25], [0, 0.25], [81, 4], [100, 1]], atol=1e-9)


def test_chunk_sums_counts_candidates_by_hand() -> None:
    x = np.array([[0, 0], [2, 0], [10, 10], [12, 10]], dtype=np.uint8)
    stack, offsets = _stack(
        [np.array([[1.0, 0.0], [11.0, 10.0], [100.0, 100.0]], dtype=np.float32)]
    )
    part, _ = lloyd_chunk(x, 7, _args(stack, offsets, 2))
    assert part.counts.tolist() == [2, 2, 0]
    np.testing.assert_array_equal(part.sums, [[2, 0], [22, 20], [0, 0]])
    assert part.sqnorm == 0 + 4 + 200 + 244
    # all four points lie at squared distance 1; ties broken by global index (start=7)
    assert part.cand_i.tolist() == [[7, 8]]
    np.testing.assert_allclose(part.cand_d, [[1, 1]])


def test_exact_errors_by_hand() -> None:
    x = np.array([[0, 0], [3, 4]], dtype=np.uint8)
    out = kernels.exact_errors(x, {1: np.array([[0.0, 0.0]])}, np.array([[9, 0], [9, 0]]))
    assert out == {1: (25.0, 5.0)}


@settings(max_examples=60, deadline=None)
@given(x=chunks, ks=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_delta_sums_equal_difference_of_full_sums(x: np.ndarray, ks: list[int], seed: int) -> None:
    """Sums after a label change = sums before + the kernel's delta (exact for integer data)."""
    rng = np.random.default_rng(seed)
    _, offsets = _stack([np.zeros((k, 1)) for k in ks])
    old = np.stack([rng.integers(0, k, x.shape[0]) for k in ks], axis=1)
    new = np.where(
        rng.random(old.shape) < 0.3, np.stack([rng.integers(0, k, x.shape[0]) for k in ks], 1), old
    )
    s_old, c_old = kernels.cluster_sums(x, old, offsets, True)
    s_new, c_new = kernels.cluster_sums(x, new, offsets, True)
    cols, d_s, d_c = kernels.delta_sums(x, new, old, offsets)
    d_s = kernels.dense_columns(cols, d_s, offsets[-1])
    np.testing.assert_array_equal(s_old + d_s, s_new)
    np.testing.assert_array_equal(c_old + d_c, c_new)


@settings(max_examples=60, deadline=None)
@given(
    x=chunks,
    ks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_partials_over_any_split_add_up(x: np.ndarray, ks: list[int], seed: int, data) -> None:
    rng = np.random.default_rng(seed)
    stack, offsets = _stack([rng.uniform(0, 255, (k, x.shape[1])).astype(np.float32) for k in ks])
    m = max(ks)
    args = _args(stack, offsets, m)
    whole, _ = lloyd_chunk(x, 0, args)
    cut = data.draw(st.integers(1, x.shape[0] - 1))
    parts = [lloyd_chunk(x[:cut], 0, args)[0], lloyd_chunk(x[cut:], cut, args)[0]]
    merged = combine(parts)
    np.testing.assert_array_equal(merged.sums, whole.sums)  # exact integer sums
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.sqnorm == whole.sqnorm
    # relocation candidates: present exactly for the runs with an empty cluster, equal over any
    # split; distances come from the float32 expansion (ulp-level differences between BLAS tiles):
    # a tolerance
    empty = np.minimum.reduceat(whole.counts, offsets[:-1]) == 0
    assert np.all((whole.cand_i[:, 0] >= 0) == empty)
    np.testing.assert_allclose(merged.cand_d[empty], whole.cand_d[empty], rtol=1e-5, atol=1e-2)
    brute = [
        np.sort(
            (
                (
                    x.astype(np.float64)[:, None, :]
                    - stack[offsets[p] : offsets[p + 1]].astype(np.float64)[None]
                )
                ** 2
            )
            .sum(-1)
            .min(1)
        )[::-1][:m]
        for p in np.flatnonzero(empty)
    ]
    for row, ref in zip(whole.cand_d[empty], brute):
        np.testing.assert_allclose(row[: ref.size], ref, rtol=1e-4, atol=1e-1)
    # counts per run add up to the number of rows; labels stay within each run's block
    per_run = np.add.reduceat(whole.counts, offsets[:-1])
    assert per_run.tolist() == [x.shape[0]] * len(ks)
    labels, _ = kernels.assign(x.astype(np.float32), stack, offsets)
    assert np.all(labels >= 0) and np.all(labels < np.array(ks)[None, :])


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.uint8, st.tuples(st.integers(6, 60), st.integers(1, 5))),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_lloyd_objective_never_increases(x: np.ndarray, k: int, seed: int) -> None:
    from kmclust.lloyd import driver

    rng = np.random.default_rng(seed)
    init = x[rng.choice(x.shape[0], k, replace=False)].astype(np.float64)
    (res,) = driver.lloyd(x, [init], tol=0, max_iter=50, persist=False, n_groups=1)
    if res.error:  # k above the number of distinct points: nothing to check
        assert "distinct" in res.error
        return
    hist = np.array(res.history)
    assert np.all(np.diff(hist) <= 1e-9 * max(1.0, hist[0]))
    assert res.jclust <= hist[-1] + 1e-9 * max(1.0, hist[0])


@settings(max_examples=60, deadline=None)
@given(
    x=chunks,
    ks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    dense_share=st.sampled_from([0, 10**9]),
)
def test_sums_match_brute_force_on_both_paths(
    x: np.ndarray, ks: list[int], seed: int, dense_share: int
) -> None:
    """Scatter or sparse (dense_share=0) and one-hot GEMM (huge dense_share) sums equal a float64
    loop, exactly."""
    rng = np.random.default_rng(seed)
    _, offsets = _stack([np.zeros((k, 1)) for k in ks])
    old = np.stack([rng.integers(0, k, x.shape[0]) for k in ks], axis=1)
    new = np.where(
        rng.random(old.shape) < 0.3, np.stack([rng.integers(0, k, x.shape[0]) for k in ks], 1), old
    )
    ref_sums = {}
    for name, labels in (("old", old), ("new", new)):
        sums = np.zeros((offsets[-1], x.shape[1]))
        for i in range(x.shape[0]):
            for p in range(len(ks)):
                sums[offsets[p] + labels[i, p]] += x[i].astype(np.float64)
        ref_sums[name] = sums
    saved = kernels.DENSE_SHARE
    kernels.DENSE_SHARE = dense_share
    try:
        s_old, _ = kernels.cluster_sums(x, old, offsets, True)
        cols, d_s, _ = kernels.delta_sums(x, new, old, offsets)
        d_s = kernels.dense_columns(cols, d_s, offsets[-1])
        s_float, _ = kernels.cluster_sums(x.astype(np.float64), old, offsets, False)
        cols32, d_f32, _ = kernels.delta_sums(x.astype(np.float32), new, old, offsets)
        d_f32 = kernels.dense_columns(cols32, d_f32, offsets[-1])
    finally:
        kernels.DENSE_SHARE = saved
    np.testing.assert_array_equal(s_old, ref_sums["old"])
    np.testing.assert_array_equal(s_old + d_s, ref_sums["new"])
    np.testing.assert_array_equal(s_float, ref_sums["old"])
    np.testing.assert_array_equal(
        d_f32, d_s
    )  # uint8 rows converted in blocks = float32 rows as given


@settings(max_examples=40, deadline=None)
@given(
    x=chunks,
    ks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    block=st.integers(1, 7),
)
def test_uint8_chunks_converted_in_blocks_equal_float_chunks(x, ks, seed, block) -> None:
    """uint8 rows converted a few at a time give the labels, sums and states of the same rows given
    as float32."""
    rng = np.random.default_rng(seed)
    stack, offsets = _stack([rng.uniform(0, 255, (k, x.shape[1])).astype(np.float32) for k in ks])
    evals = {0: stack[: ks[0]].astype(np.float64)}
    args = _args(stack, offsets, max(ks), evals=evals, want_labels=True, prune=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "BLOCK_ROWS", block)
        a, sa = lloyd_chunk(x, 3, args)
        rows = np.flatnonzero(rng.random(x.shape[0]) < 0.5)
        sub = kernels.distances(x, stack, rows)
    b, sb = lloyd_chunk(x.astype(np.float32), 3, args)
    np.testing.assert_array_equal(a.sums, b.sums)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(sa.labels, sb.labels)
    assert a.sqnorm == b.sqnorm and a.eval_sse[0] == b.eval_sse[0]
    ref = kernels.distances(x.astype(np.float32)[rows], stack)
    np.testing.assert_allclose(sub, ref, rtol=1e-5, atol=1e-2 * 255**2 * 1e-3)


@settings(max_examples=40, deadline=None)
@given(
    x=chunks,
    ks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_sparse_delta_partials_combine_to_the_whole_chunk(x, ks, seed, data) -> None:
    """Delta partials carry only the columns they touch; combined over any split they equal the
    whole chunk's."""
    rng = np.random.default_rng(seed)
    stack, offsets = _stack([rng.uniform(0, 255, (k, x.shape[1])).astype(np.float32) for k in ks])
    ids = np.arange(len(ks))
    old = np.stack([rng.integers(0, k, x.shape[0]) for k in ks], axis=1).astype(np.int32)

    def part(lo, hi):
        prev = [ChunkState(ids, old[lo:hi], None, None)]
        return lloyd_chunk(x[lo:hi], lo, _args(stack, offsets, max(ks)), prev)[0]

    whole = part(0, x.shape[0])
    cut = data.draw(st.integers(1, x.shape[0] - 1))
    merged = combine([part(0, cut), part(cut, x.shape[0])])
    assert whole.delta and merged.delta
    np.testing.assert_array_equal(merged.dense_sums(), whole.dense_sums())
    np.testing.assert_array_equal(merged.counts, whole.counts)
    labels, _ = kernels.assign(x, stack, offsets)
    ref = np.zeros((offsets[-1], x.shape[1]))
    for i in range(x.shape[0]):
        for p in range(len(ks)):
            ref[offsets[p] + labels[i, p]] += x[i]
            ref[offsets[p] + old[i, p]] -= x[i]
    np.testing.assert_array_equal(whole.dense_sums(), ref)
    if whole.sum_cols is not None:  # untouched columns are left out, not sent as zeros
        assert whole.sums.shape[0] == whole.sum_cols.size < offsets[-1]
