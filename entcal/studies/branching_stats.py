"""The estimators of the branching study: Chang's predicted list size, a clustered ratio, R = 1.

For a branching process whose correct prefix spawns β erroneous children per step and whose
erroneous candidates keep R children each, the expected erroneous count after t steps is
β(1 − Rᵗ)/(1 − R) (:func:`predicted_erroneous`). R̂ is a ratio Σ wᵢ cᵢ / Σ wᵢ summed per prompt
(a cluster), so :func:`ratio_stats` gives its cluster-robust (delta method) standard error and a
percentile cluster-bootstrap interval; :func:`critical_theta` finds the θ where R̂ crosses 1.
The measurement that feeds them is :mod:`entcal.studies.branching`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from entcal.studies.branching import BranchingResult

__all__ = ["critical_theta", "predicted_erroneous", "ratio_stats"]


def predicted_erroneous(beta: float, R: float, steps: int) -> list[float]:
    """β(1 − Rᵗ)/(1 − R) for t = 1..steps (β t at R = 1): Chang's expected erroneous count."""
    t = np.arange(1, steps + 1, dtype=float)
    if not (math.isfinite(beta) and math.isfinite(R)):
        return [float("nan")] * steps
    if abs(R - 1.0) < 1e-9:
        return (beta * t).tolist()
    return (beta * (1.0 - R**t) / (1.0 - R)).tolist()


def ratio_stats(A: np.ndarray, B: np.ndarray, n_boot: int, rng: np.random.Generator):
    """Ratio ΣA/ΣB over clusters: estimate, cluster-robust SE, percentile bootstrap interval."""
    G = len(A)
    total_b = B.sum()
    if total_b <= 0:
        nan = float("nan")
        return nan, nan, nan, nan
    est = float(A.sum() / total_b)
    resid = A - est * B
    se = float(math.sqrt((resid**2).sum() * G / max(G - 1, 1)) / total_b)
    idx = rng.integers(0, G, size=(n_boot, G))
    bb = B[idx].sum(1)
    ok = bb > 0
    boots = A[idx].sum(1)[ok] / bb[ok]
    if boots.size < 10:
        return est, se, float("nan"), float("nan")
    low, high = np.percentile(boots, [2.5, 97.5])
    return est, se, float(low), float(high)


def critical_theta(results: Sequence[BranchingResult]) -> float | None:
    """The θ where R̂ crosses 1, by linear interpolation of R̂ in log θ (None if it does not)."""
    pts = sorted((r.theta, r.R) for r in results if r.theta is not None and math.isfinite(r.R))
    for (t0, r0), (t1, r1) in itertools.pairwise(pts):
        if (r0 - 1.0) * (r1 - 1.0) <= 0 and r0 != r1:
            frac = (1.0 - r0) / (r1 - r0)
            return float(math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))))
    return None
