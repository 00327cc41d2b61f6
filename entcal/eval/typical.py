"""Typical-set checks: the asymptotic equipartition property for perplexity (Mudumbai & Bell,
"Slaves to the Law of Large Numbers", arXiv 2405.13798).

For a text ``y_1..y_N`` with next-token distributions ``p_n`` (the distribution *actually sampled
from*: after temperature / truncation):

* log-perplexity ``l = -(1/N) Σ_n log p_n(y_n)``, mean entropy ``h = (1/N) Σ_n H(p_n)``;
* ``l - h → 0`` as ``N`` grows: ``Z_n = -log p_n(y_n) - H(p_n)`` is a martingale difference with
  conditional variance the varentropy ``V_n``, so ``E[(l - h)²] = V̄/N`` (the envelope
  ``sqrt(V̄/N)``) and ``z = √N (l - h) / √V̄ ⇒ N(0, 1)`` (martingale CLT), tested here with a
  Kolmogorov-Smirnov test;
* a text is in the ε-typical set when ``|l - h| <= ε``.

Scoring text sampled from ``q`` with another distribution ``p`` (truncated samples scored by the
raw model) makes ``l - h`` converge to the mean of ``CE(q_n, p_n) - H(p_n)``, not 0: the same
functions applied to raw-model statistics show that.

``z`` is the negative of Fast-DetectGPT's analytic criterion with ``q = p``
(see :mod:`entcal.eval.detect`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = ["DEFAULT_EPSILON", "AEPResult", "aep", "prefix_grid"]

#: Default ε of the typical set, nats/token.
DEFAULT_EPSILON = 0.1


def prefix_grid(length: int) -> list[int]:
    """Prefix lengths 1, 2, 4, ... up to ``length`` (always included)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    grid, n = [], 1
    while n < length:
        grid.append(n)
        n *= 2
    grid.append(length)
    return grid


@dataclasses.dataclass
class AEPResult:
    """Per-text ``l``, ``h``, ``V̄``, ``z`` (lists) and the summary statistics.

    ``curve`` maps ``N`` (prefix length) to the mean ``|l_N - h_N|``, the mean signed gap, and the
    envelope ``sqrt(mean V̄_N / N)`` over the texts that reach ``N``.
    """

    log_perplexity: list[float]
    mean_entropy: list[float]
    mean_varentropy: list[float]
    z: list[float]
    mean_gap: float
    mean_abs_gap: float
    envelope: float
    z_mean: float
    z_std: float
    z_ks_statistic: float
    z_ks_pvalue: float
    epsilon: float
    typical_fraction: float
    curve: dict[str, list[float]]

    def to_dict(self, per_text: bool = True) -> dict:
        out = dataclasses.asdict(self)
        if not per_text:
            for key in ("log_perplexity", "mean_entropy", "mean_varentropy", "z"):
                out.pop(key)
        return out


def aep(
    logprob: Tensor,
    entropy: Tensor,
    varentropy: Tensor,
    mask: Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    grid: list[int] | None = None,
) -> AEPResult:
    """AEP statistics of ``B`` texts from per-token ``[B, T]`` statistics of one distribution.

    Args:
        logprob: ``log p_n(y_n)``; entropy: ``H(p_n)``; varentropy: ``V_n``; mask: valid tokens.
        epsilon: ε of the typical set (> 0, nats/token).
        grid: prefix lengths of the convergence curve (default :func:`prefix_grid`).

    Texts whose mean varentropy is 0 (deterministic distributions, e.g. greedy) have an undefined
    ``z`` (NaN) and are left out of the KS test.
    """
    from scipy import stats

    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    lp = torch.as_tensor(logprob, dtype=torch.float64)
    ent = torch.as_tensor(entropy, dtype=torch.float64)
    var = torch.as_tensor(varentropy, dtype=torch.float64)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if not (lp.shape == ent.shape == var.shape == mask.shape) or lp.ndim != 2:
        raise ValueError("logprob, entropy, varentropy and mask must all be [texts, steps]")
    keep = mask.sum(-1) > 0
    if not bool(keep.any()):
        raise ValueError("aep: no text has a valid token")
    lp, ent, var, mask = lp[keep], ent[keep], var[keep], mask[keep]
    m = mask.double()
    surprisal = torch.where(mask, -lp, 0.0)
    ent = torch.where(mask, ent, 0.0)
    var = torch.where(mask, var, 0.0)
    n = m.sum(-1)
    l_ = surprisal.sum(-1) / n
    h_ = ent.sum(-1) / n
    vbar = var.sum(-1) / n
    gap = l_ - h_
    with torch.no_grad():
        z = torch.where(vbar > 0, n.sqrt() * gap / vbar.clamp_min(1e-300).sqrt(), torch.nan)
    finite_z = z[torch.isfinite(z)]
    if finite_z.numel() >= 2:
        ks = stats.kstest(finite_z.numpy(), "norm")
        ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
        z_mean, z_std = float(finite_z.mean()), float(finite_z.std())
    else:
        ks_stat = ks_p = z_mean = z_std = math.nan
    # Convergence curve over prefix lengths (cumulative sums, vectorised over texts).
    cs = surprisal.cumsum(-1)
    ch = ent.cumsum(-1)
    cv = var.cumsum(-1)
    lengths = n.long()
    curve: dict[str, list[float]] = {"n": [], "mean_abs_gap": [], "mean_gap": [], "envelope": []}
    for big_n in grid or prefix_grid(int(lengths.max())):
        reach = lengths >= big_n
        if not bool(reach.any()):
            continue
        g = (cs[reach, big_n - 1] - ch[reach, big_n - 1]) / big_n
        v = cv[reach, big_n - 1] / big_n
        curve["n"].append(big_n)
        curve["mean_abs_gap"].append(float(g.abs().mean()))
        curve["mean_gap"].append(float(g.mean()))
        curve["envelope"].append(math.sqrt(float(v.mean()) / big_n))
    envelope = float((vbar / n).sqrt().mean())
    return AEPResult(
        log_perplexity=l_.tolist(),
        mean_entropy=h_.tolist(),
        mean_varentropy=vbar.tolist(),
        z=z.tolist(),
        mean_gap=float(gap.mean()),
        mean_abs_gap=float(gap.abs().mean()),
        envelope=envelope,
        z_mean=z_mean,
        z_std=z_std,
        z_ks_statistic=ks_stat,
        z_ks_pvalue=ks_p,
        epsilon=float(epsilon),
        typical_fraction=float((gap.abs() <= epsilon).double().mean()),
        curve=curve,
    )
