"""Dask arrays whose chunks are sparse rows: blocks kept where they live, one task per block.

A dask array of scipy.sparse chunks (what ``da.from_array(csr, asarray=False)``,
``map_blocks(scipy.sparse.csr_matrix)`` or dask-ml's text vectorisers make) or of
pydata ``sparse`` chunks is taken as row blocks: each chunk becomes a
:class:`kmclust.lloyd.sparse.Block` (canonical float64 CSR, squared norms, its
rows' weights), persisted once for the whole fit (under distributed: on the
workers). Each pass maps :func:`kmclust.lloyd.sparse.step` over the blocks and
reduces their small results on the driver (labels, exact level sums per cluster,
the k farthest rows); the matrix itself never leaves the workers. Block results
are exact, so a fit is the same bits as the in-memory fit of the same rows.
"""

from __future__ import annotations

from collections.abc import Callable

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp

from kmclust.lloyd import sparse

NONFINITE = "Input X contains NaN or infinity."


def is_sparse(x) -> bool:
    """Whether ``x`` is a dask array with scipy.sparse or pydata ``sparse`` chunks."""
    if not isinstance(x, da.Array):
        return False
    meta = getattr(x, "_meta", None)
    return sp.issparse(meta) or (
        type(meta).__module__.split(".")[0] == "sparse" and hasattr(meta, "tocsr")
    )


def as_csr(chunk) -> sp.csr_matrix:
    """A chunk (scipy.sparse, pydata sparse or dense) as CSR."""
    if sp.issparse(chunk):
        return chunk
    if hasattr(chunk, "tocsr"):
        return chunk.tocsr()
    return sp.csr_matrix(np.asarray(chunk))


def _block(chunk, w: np.ndarray | None, start: int) -> sparse.Block:
    return sparse.block(as_csr(chunk), w, start)


def _pieces(x: da.Array, sample_weight: np.ndarray | None) -> list[tuple]:
    """(delayed chunk, its rows' weights, its first row) per row chunk (columns joined first)."""
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    starts = np.concatenate([[0], np.cumsum(x.chunks[0])]).astype(int)
    out = []
    for i, chunk in enumerate(x.to_delayed()[:, 0]):
        s, e = int(starts[i]), int(starts[i + 1])
        out.append((chunk, None if sample_weight is None else sample_weight[s:e], s))
    return out


def _shared(args: tuple) -> list:
    """Arrays as one graph key each (sent once to each worker, not once per task)."""
    return [dask.delayed(a) if isinstance(a, np.ndarray) else a for a in args]


class DaskRows:
    """The row blocks of a sparse-chunked dask array, persisted (:class:`sparse_fit.Rows`)."""

    def __init__(self, x: da.Array, sample_weight: np.ndarray | None = None) -> None:
        self.w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        pieces = _pieces(x, self.w)
        self.blocks = list(dask.persist(*[dask.delayed(_block)(*p) for p in pieces]))
        shapes = dask.compute(*[dask.delayed(sparse.summary)(b) for b in self.blocks])
        if not all(s[3] for s in shapes):
            raise ValueError(NONFINITE)
        self.n = sum(s[0] for s in shapes)
        top, max_w = max(s[1] for s in shapes), max(s[2] for s in shapes)
        self.grids = sparse.grids(self.n, top, max_w)
        g = self.grids  # the levels of every block's entries, kept beside it for the whole fit
        self.blocks = list(
            dask.persist(*[dask.delayed(sparse.with_levels)(b, g) for b in self.blocks])
        )

    def map(self, fn: Callable, *args) -> list:
        shared = _shared(args)
        return list(dask.compute(*[dask.delayed(fn)(b, *shared) for b in self.blocks]))


def _predict_block(chunk, w, start, c) -> tuple:
    b = _block(chunk, w, start)
    if not sparse.summary(b)[3]:
        raise ValueError(NONFINITE)
    return sparse.errors(b, c)


def predict(
    x: da.Array, centers: np.ndarray, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Labels (int32) and Σ w ‖x − c_label‖² for fixed centres, one pass (nothing persisted)."""
    (c,) = _shared((np.asarray(centers, dtype=np.float64),))
    tasks = [dask.delayed(_predict_block)(*p, c) for p in _pieces(x, sample_weight)]
    parts = dask.compute(*tasks)
    return np.concatenate([p[0] for p in parts]), float(sum(p[1] for p in parts))


def _distances_block(chunk, c: np.ndarray) -> np.ndarray:
    x = as_csr(chunk).astype(np.float64)
    if not np.isfinite(x.data).all():
        raise ValueError(NONFINITE)
    return sparse.distances(x.tocsr(), c)


def distances(x: da.Array, centers: np.ndarray) -> da.Array:
    """Lazy dense (n, k) Euclidean distances to every centre, block by block."""
    if x.numblocks[1] != 1:
        x = x.rechunk({1: -1})
    c = np.asarray(centers, dtype=np.float64)
    return x.map_blocks(
        _distances_block,
        c,
        dtype=np.float64,
        chunks=(x.chunks[0], (c.shape[0],)),
        meta=np.empty((0, 0)),
    )
