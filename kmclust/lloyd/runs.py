"""A Lloyd run's state on the driver, and its outcome."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np


@dataclass
class RunResult:
    """Outcome of one Lloyd run; distances and centroids in scaled units."""

    centroids: np.ndarray  # (k, D) float64
    jclust: float = math.nan
    mean_distance: float = math.nan
    n_iter: int = 0
    converged: bool = False
    n_relocated: int = 0
    history: list[float] = field(default_factory=list)
    labels: np.ndarray | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Run:
    """Driver-side state of one run (raw data units)."""

    index: int
    c64: np.ndarray
    state: str = "active"  # active | eval | done | failed
    n_iter: int = 0
    converged: bool = False
    n_relocated: int = 0
    history: list[float] = field(default_factory=list)
    labels: list[tuple[int, np.ndarray]] = field(default_factory=list)
    error: str = ""
    sse: Fraction | float = math.nan  # exact sums of the final pass (kmclust.lloyd.exact.exact_sum)
    dist: Fraction | float = math.nan
    sums: np.ndarray | None = None  # running per-cluster sums (raw units, float64) and counts
    counts: np.ndarray | None = None
    drift: np.ndarray | None = None  # how far each centroid moved in the last update (raw units)

    @property
    def k(self) -> int:
        return self.c64.shape[0]
