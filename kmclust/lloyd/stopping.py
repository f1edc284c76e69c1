"""When a Lloyd run stops: one pure function holding both rules the engine knows.

``rule="study"`` (the sweep's rule; every stored result used it): a run has
*converged* when no centroid moved farther than ``tol`` (L2) in its last
update. ``rule="sklearn"`` (the estimator's, scikit-learn's ``KMeans``): a run
has converged when the squared Frobenius norm of all moves, Σ‖Δc‖², is at
most ``tol`` — an absolute tolerance, which the caller derives as
scikit-learn does (``tol`` times the mean per-feature variance of X).

Under both, a pass in which no label changed moves no centroid (shift 0), so
it stops the run ("strict convergence"); otherwise the run stops,
unconverged, after ``max_iter`` iterations. An update that relocated an empty
cluster is a change, never convergence. ``RULE_VERSION`` enters the sweep
config's identity, so one results store never mixes the results of two rules.
"""

from __future__ import annotations

import numpy as np

#: Bump when the study rule below changes what any run does.
RULE_VERSION = 1
#: The rules :func:`stop` knows.
RULES = ("study", "sklearn")


def shift(drift: np.ndarray | float, rule: str = "study") -> float:
    """The quantity a rule compares with ``tol``: max ‖Δc‖ (study) or Σ‖Δc‖² (sklearn)."""
    d = np.asarray(drift, dtype=np.float64)
    if rule == "study":
        return float(d.max())
    if rule == "sklearn":
        return float(np.dot(d.ravel(), d.ravel()))
    raise ValueError(f"unknown stopping rule {rule!r}: one of {', '.join(RULES)}")


def raw_tol(tol: float, scale: float, rule: str = "study") -> float:
    """``tol`` given in scaled units, in the data's raw units (squared for the sklearn rule)."""
    return tol / scale**2 if rule == "sklearn" else tol / scale


def stop(
    drift: np.ndarray | float, tol: float, n_iter: int, max_iter: int, rule: str = "study"
) -> tuple[bool, bool]:
    """``(stop, converged)`` after an update whose per-centroid moves were ``drift``.

    Pass ``drift=math.inf`` after a relocation (it can stop a run only by ``max_iter``).
    """
    if shift(drift, rule) <= tol:
        return True, True
    return n_iter >= max_iter, False
