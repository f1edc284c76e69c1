"""The synthetic scale-up: more rows made from a staged set for out-of-core and scaling runs.

Row i is parent row `source_index[i]` (drawn uniformly, with replacement) moved
by `shift_y[i]`, `shift_x[i]` pixels (|shift| <= MAX_SHIFT, zero fill); its
label and split come with it. Draws are made in blocks of GEN_BLOCK rows, each
from its own seeded generator, so any row range can be made on its own and the
data depend only on the parent, the number of rows and the seed (not on the
chunking). Pure numpy: staging (kmclust.data.stores) writes the rows.
"""

from __future__ import annotations

import numpy as np

NAME = "synthetic"
GENERATOR = "shift-v1"
MAX_SHIFT = 2  # pixels of random shift in y and in x
GEN_BLOCK = 4096  # rows drawn from one RNG stream (independent of chunking)
EXTRA_ARRAYS = {"source_index": "int64", "shift_y": "int8", "shift_x": "int8"}  # name -> dtype


def shift_images(
    images: np.ndarray, dy: np.ndarray, dx: np.ndarray, max_shift: int = MAX_SHIFT
) -> np.ndarray:
    """Move image i down by dy[i] and right by dx[i] pixels (|d| <= max_shift), zero fill."""
    n, h, w = images.shape
    s = max_shift
    padded = np.zeros((n, h + 2 * s, w + 2 * s), dtype=images.dtype)
    padded[:, s : s + h, s : s + w] = images
    out = np.empty_like(images)
    for a in range(-s, s + 1):
        for b in range(-s, s + 1):
            rows = np.flatnonzero((dy == a) & (dx == b))
            if rows.size:
                out[rows] = padded[rows, s - a : s - a + h, s - b : s - b + w]
    return out


def synthetic_draws(
    seed: int, n_parent: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and (dy, dx) shifts of synthetic rows start…stop-1.

    Rows come in blocks of GEN_BLOCK, each from `np.random.default_rng([seed, block])`,
    so any row range is reproducible on its own and the data do not depend on chunking.
    """
    src, dy, dx = [], [], []
    for block in range(start // GEN_BLOCK, (stop - 1) // GEN_BLOCK + 1):
        rng = np.random.default_rng([seed, block])
        b_src = rng.integers(0, n_parent, GEN_BLOCK)
        b_dy, b_dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (2, GEN_BLOCK))
        lo = max(start - block * GEN_BLOCK, 0)
        hi = min(stop - block * GEN_BLOCK, GEN_BLOCK)
        src.append(b_src[lo:hi])
        dy.append(b_dy[lo:hi])
        dx.append(b_dx[lo:hi])
    return (
        np.concatenate(src),
        np.concatenate(dy).astype(np.int8),
        np.concatenate(dx).astype(np.int8),
    )


def synthetic_rows(
    parent: dict[str, np.ndarray], seed: int, start: int, stop: int
) -> dict[str, np.ndarray]:
    """Rows start…stop-1 made from `parent` (images, labels, is_test), with their draws."""
    src, dy, dx = synthetic_draws(seed, len(parent["labels"]), start, stop)
    return {
        "images": shift_images(parent["images"][src], dy, dx),
        "labels": parent["labels"][src],
        "is_test": parent["is_test"][src],
        "source_index": src,
        "shift_y": dy,
        "shift_x": dx,
    }


def generation(parent_fingerprint: str, rows: int, seed: int) -> dict:
    """The parameters that, with the parent's inputs, determine a synthetic store's data."""
    return {
        "parent_fingerprint": parent_fingerprint,
        "rows": rows,
        "seed": seed,
        "max_shift": MAX_SHIFT,
        "generator": GENERATOR,
    }
