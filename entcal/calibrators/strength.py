"""Fit the calibrated decoder's gate by calibration, not by log loss.

The gate is ``α_t = α_0 + g_b(t) · max(0, D̂_t − c)``: a threshold ``c`` on the predicted excess
future entropy, a strength ``g_b`` per position bucket ``b`` and a small base ``α_0`` (a mild
temperature, for the part of the error no state reveals: in the first steps the state has no
history yet, so the gate cannot open there however strong it is). Human log loss cannot choose
it: human text almost never enters the states where the gate opens, so the log-loss optimum is
``g ≈ 0``. Instead, for each candidate threshold and base, the strengths are set so that entropy
calibration error

    EntCE_b = mean entropy of the decoder's generations in bucket b
              − mean human log loss under the decoder in bucket b        (nats/token)

is zero in every bucket (a flat entropy curve, not only a zero mean), on the training split's
own prompts. Generations are re-sampled after each update with the same seed (common random
numbers), and each strength moves multiplicatively against its bucket's error,
``g_b ← g_b · exp(κ · EntCE_b)``; an upstream bucket changes the states downstream, so all buckets
are updated together for a few rounds (each base starting from the strengths the previous one
ended with). Of all gates evaluated, those whose every bucket is within ``tolerance`` of 0
calibrate, and the one of them with the lowest human log-loss cost wins (cost:
the human log loss under the decoder minus under the raw model, on the same documents); if none
does, the one of smallest root-mean-square bucket error. (Each evaluation is one sample of
generations: with 32 prompts a bucket's EntCE has a standard error of about 0.1 nats/token, so
the tolerance cannot be much tighter.)

Every evaluated gate is logged (``grid``), with its EntCE per bucket and its cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["GateEvaluation", "fit_gate", "update_strengths"]

#: step of the multiplicative update (per nat/token of bucket error)
KAPPA = 1.0
#: the strengths stay within these bounds
STRENGTH_MIN, STRENGTH_MAX = 0.0, 8.0


@dataclasses.dataclass
class GateEvaluation:
    """One gate's result on the gate documents: EntCE per bucket and in all, the human cost."""

    threshold: float
    strength: list[float]
    entce_buckets: list[float]
    entce: float
    cost: float
    gated_human_fraction: float
    base: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def update_strengths(
    strength: Sequence[float], entce_buckets: Sequence[float], kappa: float = KAPPA
) -> list[float]:
    """``g_b · exp(κ · EntCE_b)``, clipped to ``[STRENGTH_MIN, STRENGTH_MAX]``; a zero strength
    restarts at 0.05 when its bucket is still too entropic."""
    out = []
    for g, e in zip(strength, entce_buckets):
        g = max(g, 0.05) if e > 0 else g
        out.append(min(STRENGTH_MAX, max(STRENGTH_MIN, g * math.exp(kappa * e))))
    return out


def fit_gate(
    evaluate: Callable[[float, list[float], float], GateEvaluation],
    thresholds: Sequence[float],
    n_buckets: int,
    rounds: int = 5,
    tolerance: float = 0.1,
    start: float | Sequence[float] = 1.0,
    log_path: Path | None = None,
    bases: Sequence[float] = (0.0,),
) -> tuple[GateEvaluation, list[GateEvaluation]]:
    """Search the gate: for each threshold and each base in turn, ``rounds`` strength updates
    (from ``start``, one strength or one per bucket, for the first base, then from where the
    previous base ended).

    ``evaluate(threshold, strengths, base)`` generates with that gate and scores it. Evaluations
    already in ``log_path`` (a JSON list, rewritten after each one) are reused, so an
    interrupted fit resumes. Returns the chosen gate and the whole grid.
    """
    done: dict[str, GateEvaluation] = {}
    if log_path is not None and log_path.exists():
        for row in json.loads(log_path.read_text()):
            ev = GateEvaluation(**row)
            done[_key(ev.threshold, ev.strength, ev.base)] = ev
    grid: list[GateEvaluation] = []

    def run(c: float, g: list[float], base: float) -> GateEvaluation:
        key = _key(c, g, base)
        if key not in done:
            done[key] = evaluate(c, g, base)
            if log_path is not None:
                tmp = log_path.with_suffix(".tmp")
                tmp.write_text(json.dumps([e.to_json() for e in done.values()], indent=1))
                tmp.replace(log_path)
        grid.append(done[key])
        return done[key]

    for c in thresholds:
        g = [float(start)] * n_buckets if isinstance(start, (int, float)) else list(start)
        for base in bases:
            for r in range(rounds):
                ev = run(c, g, base)
                if max(abs(e) for e in ev.entce_buckets) <= tolerance / 2 or r == rounds - 1:
                    break
                g = update_strengths(g, ev.entce_buckets)
    ok = [e for e in grid if max(abs(x) for x in e.entce_buckets) <= tolerance]
    best = min(ok, key=lambda e: e.cost) if ok else min(grid, key=_rms)
    return best, grid


def _rms(ev: GateEvaluation) -> float:
    return math.sqrt(sum(e * e for e in ev.entce_buckets) / len(ev.entce_buckets))


def _key(c: float, g: Sequence[float], base: float) -> str:
    return json.dumps([round(c, 6), [round(x, 6) for x in g], round(base, 6)])
