"""When a Lloyd run stops: one pure rule, used wherever the driver decides.

A run has *converged* when no centroid moved farther than ``tol`` (L2) in its
last update; a pass in which no label changed moves no centroid, so it stops
the run too. Otherwise the run stops, unconverged, after ``max_iter``
iterations. An update that relocated an empty cluster is a change, never
convergence. ``RULE_VERSION`` enters the sweep config's identity, so one
results store never mixes the results of two rules.
"""

from __future__ import annotations

#: Bump when the rule below changes what any run does.
RULE_VERSION = 1


def stop(shift: float, tol: float, n_iter: int, max_iter: int) -> tuple[bool, bool]:
    """``(stop, converged)`` after an update whose largest centroid move was ``shift``.

    Pass ``shift=math.inf`` after a relocation (it can stop a run only by ``max_iter``).
    """
    if shift <= tol:
        return True, True
    return n_iter >= max_iter, False
