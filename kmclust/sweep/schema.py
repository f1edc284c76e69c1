"""The results schema: one row per variable of a results store, read by the sweep and the report.

Each row says what a variable is (dims, dtype, fill value, long label) and how
the report uses it (required, summarised, shown in the table, compared between
inits, drawn against k). The sweep builds its template and fills its cells from
this table; the report takes its columns, comparisons and figures from it; the
test factory builds fake stores from it. Adding a metric means one row here and
the code that computes its value. Rows marked ``labels`` need the data's class labels: the
results of an unlabelled store (attribute ``labelled: false``) leave them out rather than fill
them with NaN. Imports numpy only, so that the report (and
the option checks of the jobs) can read it without the sweep's run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: attribute that marks a store as kmclust results; its value is the schema version
RESULTS_MARK = "kmclust_results"
#: version of the results layout; a store without the mark predates versions
SCHEMA_VERSION = 1
#: the grid's dims: every variable starts with them (one value or array per cell)
CELL_DIMS = ("k", "init", "seed")
#: stands for the image dims of the data store, e.g. ("y", "x"), in a row's ``extra``
IMAGE = "image"


class Shown(NamedTuple):
    """A column of the report's table: mean ± std over the done seeds."""

    heading: str
    decimals: int


class Compared(NamedTuple):
    """A metric compared between inits, paired over seeds."""

    label: str
    unit: str
    better: str  # "lower" or "higher"
    decimals: int
    wins: str  # what the better init does: "reaches lower J_clust"
    beats: str  # the same, short: "is lower"


class Plot(NamedTuple):
    """A figure of the metric against k (mean over seeds, ±1 s.d. band, seeds as dots)."""

    file: str
    alt: str
    ylabel: str
    title: str
    knees: bool = False  # mark the elbow of each init's curve
    cap: str | None = None  # a config key whose value is drawn as a line when reached


@dataclass(frozen=True)
class Var:
    """One variable of the results store."""

    name: str
    dtype: str
    fill: object
    label: str  # the variable's long_name attribute
    extra: tuple[str, ...] = ()  # dims after CELL_DIMS (padded up to max k, max_iter, image)
    required: bool = False  # the report refuses a store without it; resume cannot add it
    labels: bool = False  # needs the true labels: absent from the results of unlabelled data
    summary: bool = False  # summarised per (k, init) by the report
    shown: Shown | None = None
    compared: Compared | None = None
    plot: Plot | None = None

    def dims(self, image_dims: tuple[str, ...]) -> tuple[str, ...]:
        """All dims of the variable, the image dims of the data put in for IMAGE."""
        extra = [d for e in self.extra for d in (image_dims if e == IMAGE else (e,))]
        return CELL_DIMS + tuple(extra)


_PIXELS = "pixels in [0, 1]"

VARIABLES: tuple[Var, ...] = (
    Var(
        "jclust",
        "f8",
        np.nan,
        "J_clust: mean squared distance to the assigned centroid (pixels in [0,1])",
        required=True,
        summary=True,
        shown=Shown("J_clust", 3),
        compared=Compared(
            "J_clust", "pixel intensity²", "lower", 3, "reaches lower J_clust", "is lower"
        ),
        plot=Plot(
            "jclust_vs_k.png",
            "J_clust vs k",
            f"J_clust = mean ‖x − z‖² (pixel intensity², {_PIXELS})",
            "Clustering objective J_clust vs k",
            knees=True,
        ),
    ),
    Var(
        "mean_distance",
        "f8",
        np.nan,
        "mean distance to the assigned centroid (the original study's J_clust)",
        required=True,
        summary=True,
        shown=Shown("mean distance", 3),
        plot=Plot(
            "mean_distance_vs_k.png",
            "mean distance vs k",
            f"mean ‖x − z‖ (pixel intensity, {_PIXELS})",
            "Mean distance to the assigned centroid vs k",
        ),
    ),
    Var(
        "n_iter",
        "i4",
        0,
        "Lloyd iterations run",
        required=True,
        summary=True,
        shown=Shown("iterations", 1),
        compared=Compared(
            "Lloyd iterations", "count", "lower", 1, "needs fewer Lloyd iterations", "needs fewer"
        ),
        plot=Plot(
            "iterations_vs_k.png",
            "iterations vs k",
            "Lloyd iterations run (count)",
            "Iterations until convergence vs k",
            cap="max_iter",
        ),
    ),
    Var("converged", "bool", False, "every centroid moved at most tol in the last update"),
    Var(
        "train_accuracy",
        "f8",
        np.nan,
        "share of training images in a cluster whose majority label is their own",
        required=True,
        labels=True,
        summary=True,
    ),
    Var(
        "test_accuracy",
        "f8",
        np.nan,
        "share of held-out images in a cluster whose (training) majority label is their own",
        required=True,
        labels=True,
        summary=True,
        shown=Shown("test accuracy", 3),
        compared=Compared(
            "test accuracy",
            "fraction correct",
            "higher",
            3,
            "reaches higher test accuracy",
            "is higher",
        ),
    ),
    Var(
        "n_relocated",
        "i4",
        0,
        "empty clusters relocated during the run",
        required=True,
        summary=True,
        shown=Shown("relocations/run", 1),
        plot=Plot(
            "relocations_vs_k.png",
            "relocations vs k",
            "empty-cluster relocations per run (count)",
            "Empty clusters re-seeded during a run vs k",
        ),
    ),
    Var(
        "nmi",
        "f8",
        np.nan,
        "normalized mutual information (training set)",
        labels=True,
        summary=True,
    ),
    Var("ari", "f8", np.nan, "adjusted Rand index (training set)", labels=True, summary=True),
    Var(
        "acc",
        "f8",
        np.nan,
        "Hungarian-matched accuracy (training set; only where k is the number of classes)",
        labels=True,
        summary=True,
    ),
    Var(
        "purity",
        "f8",
        np.nan,
        "share of training images in their cluster's majority class",
        labels=True,
    ),
    Var(
        "davies_bouldin",
        "f8",
        np.nan,
        "Davies–Bouldin index of the training set (lower: tighter, better separated clusters)",
        summary=True,
        plot=Plot(
            "davies_bouldin_vs_k.png",
            "Davies–Bouldin index vs k",
            "Davies–Bouldin index (lower is better)",
            "Davies–Bouldin index vs k",
        ),
    ),
    Var(
        "calinski_harabasz",
        "f8",
        np.nan,
        "Calinski–Harabasz index of the training set (higher: better separated clusters)",
        summary=True,
        plot=Plot(
            "calinski_harabasz_vs_k.png",
            "Calinski–Harabasz index vs k",
            "Calinski–Harabasz index (higher is better)",
            "Calinski–Harabasz index vs k",
        ),
    ),
    Var(
        "silhouette",
        "f8",
        np.nan,
        "mean silhouette of a seeded sample of training images (config silhouette_sample)",
        summary=True,
        plot=Plot(
            "silhouette_vs_k.png",
            "silhouette vs k",
            "mean silhouette coefficient (higher is better)",
            "Silhouette of a training sample vs k",
        ),
    ),
    Var(
        "seconds",
        "f8",
        np.nan,
        "wall seconds from the start of the cell's batch until the cell was done",
        summary=True,
    ),
    Var(
        "status",
        "O",
        "pending",
        "done, failed or pending; written after the cell's data",
        required=True,
    ),
    Var("error", "O", "", "why the cell failed"),
    Var(
        "cluster_size",
        "f8",
        np.nan,
        "training images per cluster (NaN beyond k)",
        extra=("cluster",),
        required=True,
    ),
    Var(
        "cluster_label",
        "f8",
        np.nan,
        "majority class of the cluster's training members (-1: none; NaN beyond k)",
        extra=("cluster",),
        required=True,
        labels=True,
    ),
    Var(
        "centroids",
        "f4",
        np.nan,
        f"cluster centres, {_PIXELS} (NaN beyond k)",
        extra=("cluster", IMAGE),
        required=True,
    ),
    Var(
        "jclust_history",
        "f8",
        np.nan,
        "J_clust after each Lloyd iteration (NaN beyond n_iter)",
        extra=("iteration",),
    ),
)
BY_NAME: dict[str, Var] = {v.name: v for v in VARIABLES}
#: the results attribute that says whether the data had labels (absent: labelled)
LABELLED = "labelled"


def variables(labelled: bool = True) -> tuple[Var, ...]:
    """The variables of a results store of labelled data, or of unlabelled data."""
    return VARIABLES if labelled else tuple(v for v in VARIABLES if not v.labels)


def empty(
    grid: tuple[int, int, int],
    sizes: Mapping[str, int],
    image_dims: tuple[str, ...],
    labelled: bool = True,
) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Every variable as (dims, array of its fill value); ``sizes`` gives each extra dim's size.

    Without labels (``labelled`` False) the variables that need them are left out.
    """
    out = {}
    for var in variables(labelled):
        dims = var.dims(image_dims)
        shape = grid + tuple(sizes[d] for d in dims[len(CELL_DIMS) :])
        out[var.name] = (dims, np.full(shape, var.fill, dtype=var.dtype))
    return out
