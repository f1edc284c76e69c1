"""Selecting rows of a dask array under key names of the caller's choosing."""

from __future__ import annotations

import dask.array as da
import numpy as np


def take_rows(x: da.Array, idx: np.ndarray, name: str) -> da.Array:
    """Rows ``idx`` (sorted) of ``x``, selected chunk by chunk under key names after ``name``.

    Unlike ``x[idx]`` (whose shuffle keys hash only the indices, so every
    rebuild shares them), every key here carries ``name``.
    """
    bounds = np.concatenate([[0], np.cumsum(x.chunks[0])])
    parts = []
    for b in range(x.numblocks[0]):
        sel = idx[(idx >= bounds[b]) & (idx < bounds[b + 1])] - bounds[b]
        if sel.size:
            parts.append(
                x.blocks[b].map_blocks(
                    lambda blk, s=sel: blk[s],
                    chunks=((sel.size,), x.chunks[1]),
                    dtype=x.dtype,
                    name=f"{name}-take-{b}",
                )
            )
    return da.concatenate(parts) if parts else x[:0]
