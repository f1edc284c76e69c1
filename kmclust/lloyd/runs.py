"""A Lloyd run's state on the driver, and its outcome."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from kmclust.lloyd.weighted import WeightSpec


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
    shift: float = math.nan  # what the stopping rule compared with tol in the last update
    inertia: float = math.nan  # Σ w‖x − z‖² (w = 1 unweighted), scaled units: scikit-learn's

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
    weights: WeightSpec | None = None  # sample weights: sums/counts are packed weighted sums
    shift: float = math.nan  # the stopping rule's measure of that move (kmclust.lloyd.stopping)

    @property
    def k(self) -> int:
        return self.c64.shape[0]


def start_runs(inits: Sequence[np.ndarray], scale: float, n: int, d: int) -> list[Run]:
    """The runs from their initial centroids; a run that cannot start has failed already."""
    runs = [Run(i, np.asarray(c, dtype=np.float64) / scale) for i, c in enumerate(inits)]
    for run in runs:
        if run.c64.ndim != 2 or run.c64.shape[1] != d:
            run.error = f"initial centroids have shape {run.c64.shape}, expected (k, {d})"
        elif not 1 <= run.k <= n:
            run.error = f"k={run.k} must be between 1 and the number of samples ({n})"
        elif not np.all(np.isfinite(run.c64)):
            run.error = "initial centroids contain NaN or inf"
        if run.error:
            run.state = "failed"
    return runs
