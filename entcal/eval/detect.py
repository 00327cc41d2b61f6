"""Zero-shot detectors of generated text from per-token statistics of a scoring model, and their
AUROC / TPR at a fixed FPR.

Every score is oriented so that **higher means "more machine-like"** (so AUROC > 0.5 means the
detector separates in its documented direction; below 0.5 it separates the other way). With
``s_t = -log p_t(x_t)``, ``H_t`` and ``V_t`` the entropy and varentropy of ``p_t``:

* ``log_likelihood``: ``-(1/L) Σ_t s_t`` (Gehrmann et al. 2019; DetectGPT's baseline);
* ``log_rank``: ``-(1/L) Σ_t log rank_t`` (GLTR; DetectGPT's log-rank baseline);
* ``entropy``: ``-(1/L) Σ_t H_t`` (DetectGPT's entropy baseline: machine text sits where the
  model is sure);
* ``typicality``: ``Σ_t (H_t - s_t) / sqrt(Σ_t V_t)`` — Fast-DetectGPT's analytic sampling
  discrepancy (Bao et al., ICLR 2024, ``get_sampling_discrepancy_analytic``) with the sampling
  model equal to the scoring model: ``μ_t = -H_t``, ``σ²_t = V_t``. It is ≈ N(0, 1) on text
  sampled from the model itself (the AEP ``z`` with the sign flipped);
* ``binoculars``: ``-log PPL_M(x) / log X-PPL_{O,M}(x)`` with
  ``log X-PPL = (1/L) Σ_t -Σ_v softmax(O_t)_v log softmax(M_t)_v`` (Hans et al., ICML 2024; ``M``
  is the scoring model — the code's "performer" — and ``O`` a second model with the same
  tokenizer — the "observer"); negated because a low Binoculars score means machine.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["DETECTORS", "auroc", "detector_scores", "roc", "tpr_at_fpr"]

DETECTORS = ("log_likelihood", "log_rank", "entropy", "typicality", "binoculars")


def detector_scores(
    logprob: Tensor,
    entropy: Tensor,
    varentropy: Tensor,
    mask: Tensor,
    rank: Tensor | None = None,
    observer_cross_entropy: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Per-text detector scores ``{name: [B]}`` from per-token ``[B, T]`` raw-model statistics.

    ``log_rank`` needs ``rank``; ``binoculars`` needs ``observer_cross_entropy``; both are left
    out when missing. Texts with no valid token get NaN.
    """
    mask = torch.as_tensor(mask, dtype=torch.bool)
    m = mask.double()
    n = m.sum(-1)
    safe_n = n.clamp_min(1)

    def mean(x: Tensor) -> Tensor:
        return torch.where(mask, torch.as_tensor(x, dtype=torch.float64), 0.0).sum(-1) / safe_n

    lp = torch.as_tensor(logprob, dtype=torch.float64)
    h = torch.as_tensor(entropy, dtype=torch.float64)
    v = torch.as_tensor(varentropy, dtype=torch.float64)
    out: dict[str, Tensor] = {
        "log_likelihood": mean(lp),
        "entropy": -mean(h),
    }
    if rank is not None:
        out["log_rank"] = -mean(torch.as_tensor(rank, dtype=torch.float64).clamp_min(1).log())
    total_var = torch.where(mask, v, 0.0).sum(-1)
    disc = torch.where(mask, lp + h, 0.0).sum(-1)
    out["typicality"] = torch.where(
        total_var > 0, disc / total_var.clamp_min(1e-300).sqrt(), torch.nan
    )
    if observer_cross_entropy is not None:
        xppl = mean(observer_cross_entropy)
        log_ppl = -mean(lp)
        out["binoculars"] = -log_ppl / xppl
    result = {}
    for key in DETECTORS:
        if key in out:
            val = torch.where(n > 0, out[key], torch.nan)
            result[key] = val.numpy()
    return result


def _clean(human: np.ndarray, machine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    human = np.asarray(human, dtype=np.float64)
    machine = np.asarray(machine, dtype=np.float64)
    return human[np.isfinite(human)], machine[np.isfinite(machine)]


def auroc(human: np.ndarray, machine: np.ndarray) -> float:
    """Area under the ROC curve, machine = positive class (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    human, machine = _clean(human, machine)
    if human.size == 0 or machine.size == 0:
        return math.nan
    y = np.r_[np.zeros(human.size), np.ones(machine.size)]
    return float(roc_auc_score(y, np.r_[human, machine]))


def roc(human: np.ndarray, machine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` arrays of the ROC curve, machine = positive class."""
    from sklearn.metrics import roc_curve

    human, machine = _clean(human, machine)
    y = np.r_[np.zeros(human.size), np.ones(machine.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[human, machine])
    return fpr, tpr


def tpr_at_fpr(human: np.ndarray, machine: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate at a threshold whose false-positive rate is <= ``fpr``.

    With ``n`` human texts the attainable FPRs are multiples of ``1/n``: for ``n < 100`` the
    1% point means no human text above the threshold.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    human, machine = _clean(human, machine)
    if human.size == 0 or machine.size == 0:
        return math.nan
    f, t = roc(human, machine)
    return float(t[f <= fpr + 1e-12].max())
