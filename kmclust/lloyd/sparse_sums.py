"""Exact sums of sparse rows on a grid fixed by the whole data: the same bits for any chunking.

Each term ``v`` (a weighted entry ``w_i·x_ij``, a weight, a squared entry) is split on a
ladder of powers of two set by the whole data set — ``n`` terms at most per sum, every
``|v| < 2**top`` — as ``v = Σ_l q_l · 2**(top − l·bits)`` with integer ``q_l``,
``|q_l| ≤ 2**bits`` and ``bits = 52 − ⌈log2(n + 1)⌉``. A sum of at most ``n`` such
integers stays below ``2**52``, so float64 adds them exactly in any order and any
grouping: the level sums of row blocks add up to the level sums of the whole matrix, bit
for bit. The levels are joined in one fixed order (smallest first), so the result depends
only on the data, never on the chunking or the reduction tree. A block needs as many
levels as its smallest entry's last bit is below ``2**top`` (TF-IDF values: 2 or 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Grid:
    """The ladder: level ``l`` (1-based) has unit ``2**(top − l·bits)``."""

    top: int
    bits: int


def grid(n: int, max_abs: float) -> Grid:
    """The grid for sums of at most ``n`` terms of magnitude at most ``max_abs``."""
    if not math.isfinite(max_abs):
        raise ValueError("terms must be finite")
    top = math.frexp(max_abs)[1] if max_abs > 0 else 0  # max_abs < 2**top
    return Grid(top, 52 - math.ceil(math.log2(n + 1)))


def levels(values: np.ndarray, g: Grid) -> list[np.ndarray]:
    """Integer-valued float64 arrays ``q_l`` with ``values = Σ_l q_l·2**(top − l·bits)``.

    Scaling by powers of two and ``rint`` are exact, so every step is exact; the
    residual is zero at the latest when the unit reaches the smallest float64.
    """
    r = np.array(values, dtype=np.float64)
    out, e = [], g.top
    while True:
        e -= g.bits
        q = np.rint(np.ldexp(r, -e))
        out.append(q)
        r -= np.ldexp(q, e)
        if not r.any():
            return out


def join(parts: list, g: Grid) -> np.ndarray:
    """``Σ_l parts[l]·2**(top − (l+1)·bits)`` as dense float64, smallest level first."""
    total = None
    for i in range(len(parts) - 1, -1, -1):
        p = parts[i].toarray() if sp.issparse(parts[i]) else np.asarray(parts[i], np.float64)
        term = np.ldexp(p, g.top - (i + 1) * g.bits)
        total = term if total is None else total + term
    return total


def add(a: list, b: list) -> list:
    """Level-wise sum of two level lists (exact: integer values below ``2**52``)."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [p + shorter[i] if i < len(shorter) else p for i, p in enumerate(longer)]


def cluster_sums(x: sp.csr_matrix, entry_levels: list, labels: np.ndarray, k: int) -> list:
    """Levels of the per-cluster sums of the rows of ``x``, as (k, D) CSR matrices.

    ``entry_levels`` are the :func:`levels` of the stored entries of ``x`` (times their
    row's weight); each level is summed by one sparse product, exactly.
    """
    n = x.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    return [onehot @ sp.csr_matrix((q, x.indices, x.indptr), shape=x.shape) for q in entry_levels]


def group_sums(values: np.ndarray, groups: np.ndarray, k: int, g: Grid) -> list[np.ndarray]:
    """Levels of per-group sums of ``values`` (e.g. weights per cluster), as (k,) arrays."""
    return [np.bincount(groups, weights=q, minlength=k) for q in levels(values, g)]


def column_sums(x: sp.csr_matrix, wx: np.ndarray, g: Grid) -> list[np.ndarray]:
    """Levels of the per-column sums of stored entries ``wx`` (the columns of ``x``)."""
    return [np.bincount(x.indices, weights=q, minlength=x.shape[1]) for q in levels(wx, g)]
