"""Entropy calibration (Cao, Valiant & Liang, "On the Entropy Calibration of Language Models",
arXiv 2511.11966).

With ``p̃`` the distribution a decoder samples from, per step ``t``:

* generation entropy ``H_t = E_X E_{Ŷ~p̃}[ H(p̃(·|X, Ŷ_<t)) ]`` — the exact entropy of the whole
  next-token distribution at each generated position (the paper's Rao-Blackwellised estimator);
* human log loss ``L_t = E_X E_{Y~p*}[ -log p̃(Y_t | X, Y_<t) ]`` — teacher forced under the same
  distribution;
* ``EntCE = H - L`` (the paper's final sign: positive means the entropy is too high), with ``H``
  and ``L`` token-weighted means over all steps, in nats/token.

A truncating decoder gives some human tokens probability 0, so its log loss is ``+inf``; this is
reported as it is, together with the fraction of human tokens it excludes, its log loss on the
included tokens, and the gap between that and the raw model's log loss on the same tokens.

Standard errors treat texts as independent clusters (the tokens of one text are correlated): for
a token-weighted mean ``m = Σ_i S_i / Σ_i N_i`` the delta-method variance is
``n/(n-1) · Σ_i (S_i - m N_i)² / (Σ_i N_i)²``. EntCE's error pairs generation ``i`` with human
text ``i`` (same prompt) when both sets have the same number of texts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = [
    "CalibrationResult",
    "entropy_calibration",
    "entropy_slope",
    "per_step_mean",
    "weighted_mean",
]


def _check(values: Tensor, mask: Tensor, what: str) -> tuple[Tensor, Tensor]:
    values = torch.as_tensor(values, dtype=torch.float64)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if values.ndim != 2 or values.shape != mask.shape:
        raise ValueError(
            f"{what}: values and mask must both be [texts, steps], got "
            f"{tuple(values.shape)} and {tuple(mask.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError(f"{what}: no valid token")
    return values, mask


def _residuals(values: Tensor, mask: Tensor) -> tuple[float, Tensor, float]:
    """Token-weighted mean, per-text residuals ``S_i - m N_i`` and ``Σ N_i``."""
    v = torch.where(mask, values, 0.0)
    sums = v.sum(-1)
    counts = mask.sum(-1).double()
    total = float(counts.sum())
    mean = float(sums.sum()) / total
    return mean, sums - mean * counts, total


def _check_group(n_texts: int, group: int) -> None:
    if group < 1 or n_texts % group:
        raise ValueError(f"{n_texts} texts cannot be split into clusters of {group} (samples)")


def weighted_mean(values: Tensor, mask: Tensor, group: int = 1) -> tuple[float, float]:
    """Token-weighted mean of ``values[mask]`` and its clustered standard error.

    ``values``/``mask``: ``[texts, steps]``. Clusters are texts, or runs of ``group`` consecutive
    texts (the samples of one prompt, prompt-major). Infinite values give an infinite mean and
    NaN error.
    """
    values, mask = _check(values, mask, "weighted_mean")
    _check_group(values.shape[0], group)
    if not bool(torch.isfinite(values[mask]).all()):
        return float(values[mask].mean()), math.nan
    mean, res, total = _residuals(values, mask)
    res = res.reshape(-1, group).sum(-1)
    n = int((mask.reshape(-1, group * mask.shape[1]).sum(-1) > 0).sum())
    if n < 2:
        return mean, math.nan
    var = n / (n - 1) * float((res * res).sum()) / total**2
    return mean, math.sqrt(var)


def per_step_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step mean over the texts that reach each step, its standard error, and the count.

    Returns three ``[steps]`` tensors (float64, float64, int64); steps no text reaches hold NaN.
    """
    values, mask = _check(values, mask, "per_step_mean")
    counts = mask.sum(0)
    v = torch.where(mask, values, 0.0)
    c = counts.double()
    mean = v.sum(0) / c
    dev = torch.where(mask, values - mean, 0.0)
    var = (dev * dev).sum(0) / (c - 1).clamp_min(1)
    se = (var / c).sqrt()
    se = torch.where(counts > 1, se, torch.nan)
    return mean, se, counts


def entropy_slope(values: Tensor, mask: Tensor, group: int = 1) -> tuple[float, float]:
    """Slope of ``values`` over steps (nats/token per step) and its standard error.

    The slope is the least-squares fit of the per-step mean curve on the step index, weighted by
    how many texts reach each step — the paper's error accumulation (entropy rising with ``t``).
    Its error comes from the spread of the per-text least-squares slopes (texts of >= 3 tokens),
    averaged first over each run of ``group`` consecutive texts (the samples of one prompt).
    """
    values, mask = _check(values, mask, "entropy_slope")
    _check_group(values.shape[0], group)
    mean, _, counts = per_step_mean(values, mask)
    ok = counts > 0
    steps = torch.arange(values.shape[1], dtype=torch.float64)
    if int(ok.sum()) < 2:
        return math.nan, math.nan
    w = counts[ok].double()
    x, y = steps[ok], mean[ok]
    xm = (w * x).sum() / w.sum()
    ym = (w * y).sum() / w.sum()
    slope = float((w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum())
    # Per-text slopes, vectorised over texts.
    m = mask.double()
    n_i = m.sum(-1)
    keep = n_i >= 3
    if int(keep.sum()) < 2:
        return slope, math.nan
    xbar = (m * steps).sum(-1) / n_i.clamp_min(1)
    ybar = (m * torch.where(mask, values, 0.0)).sum(-1) / n_i.clamp_min(1)
    dx = (steps[None] - xbar[:, None]) * m
    dy = (torch.where(mask, values, 0.0) - ybar[:, None]) * m
    slopes = (dx * dy).sum(-1) / (dx * dx).sum(-1).clamp_min(1e-12)
    kept = keep.reshape(-1, group).double()
    per_cluster = (torch.where(keep, slopes, 0.0).reshape(-1, group)).sum(-1) / kept.sum(-1)
    s = per_cluster[kept.sum(-1) > 0]
    if s.numel() < 2:
        return slope, math.nan
    return slope, float(s.std() / math.sqrt(s.numel()))


@dataclasses.dataclass
class CalibrationResult:
    """Paper 1's numbers for one decoder (nats/token; per-step lists are plain floats).

    ``human_log_loss`` and ``entce`` are infinite when the decoder excludes a human token;
    ``*_included`` are then the finite values on the tokens it keeps.
    """

    gen_entropy: float
    gen_entropy_se: float
    gen_entropy_per_step: list[float]
    entropy_slope: float
    entropy_slope_se: float
    human_log_loss: float
    human_log_loss_se: float
    human_log_loss_per_step: list[float]
    human_tokens_excluded: float
    human_log_loss_included: float
    raw_log_loss_included: float | None
    log_loss_gap: float | None
    entce: float
    entce_se: float
    entce_included: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def entropy_calibration(
    gen_entropy: Tensor,
    gen_mask: Tensor,
    human_logprob: Tensor,
    human_mask: Tensor,
    raw_human_logprob: Tensor | None = None,
    samples_per_prompt: int = 1,
) -> CalibrationResult:
    """EntCE and its parts for one decoder.

    Args:
        gen_entropy: ``[n_gen, T]`` entropy of the sampling distribution at each generated step;
            with ``samples_per_prompt = k`` and ``n_gen = k·n_human``, generation ``i·k + j``
            continues the prompt of human text ``i`` (prompt-major), and the standard errors
            cluster by prompt.
        gen_mask: ``[n_gen, T]`` valid generated steps.
        human_logprob: ``[n_human, T']`` log-prob of each human token under the same sampling
            distribution (``-inf`` where the decoder excludes it).
        human_mask: ``[n_human, T']`` valid human tokens.
        raw_human_logprob: the raw model's log-probs of the same human tokens, for the gap.
        samples_per_prompt: generations per prompt (see ``gen_entropy``).

    Raises ``ValueError`` for shapes that do not fit together.
    """
    gen_entropy, gen_mask = _check(gen_entropy, gen_mask, "gen_entropy")
    human_logprob, human_mask = _check(human_logprob, human_mask, "human_logprob")
    loss = -human_logprob
    excluded = human_mask & torch.isposinf(loss)
    included = human_mask & ~excluded
    frac_excluded = float(excluded.sum()) / float(human_mask.sum())
    k = samples_per_prompt
    if k > 1 and gen_entropy.shape[0] != k * human_logprob.shape[0]:
        raise ValueError(
            f"{gen_entropy.shape[0]} generations for {human_logprob.shape[0]} human texts at "
            f"{k} samples per prompt"
        )
    h, h_se = weighted_mean(gen_entropy, gen_mask, k)
    h_steps, _, _ = per_step_mean(gen_entropy, gen_mask)
    slope, slope_se = entropy_slope(gen_entropy, gen_mask, k)
    step_loss = torch.where(human_mask, loss, 0.0)
    counts = human_mask.sum(0)
    loss_steps = step_loss.sum(0) / counts.double()
    if bool(included.any()):
        l_inc, _ = weighted_mean(loss.masked_fill(~included, 0.0), included)
    else:
        l_inc = math.nan
    raw_inc = gap = None
    if raw_human_logprob is not None:
        raw = torch.as_tensor(raw_human_logprob, dtype=torch.float64)
        if raw.shape != human_mask.shape:
            raise ValueError("raw_human_logprob must have the shape of human_logprob")
        if bool(included.any()):
            raw_inc, _ = weighted_mean(-raw.masked_fill(~included, 0.0), included)
            gap = l_inc - raw_inc
    if frac_excluded > 0:
        l_all, l_se, entce, entce_se = math.inf, math.nan, -math.inf, math.nan
    else:
        l_all, l_se = weighted_mean(loss, human_mask)
        entce = h - l_all
        entce_se = _difference_se(gen_entropy, gen_mask, loss, human_mask, h_se, l_se, k)
    return CalibrationResult(
        gen_entropy=h,
        gen_entropy_se=h_se,
        gen_entropy_per_step=h_steps.tolist(),
        entropy_slope=slope,
        entropy_slope_se=slope_se,
        human_log_loss=l_all,
        human_log_loss_se=l_se,
        human_log_loss_per_step=loss_steps.tolist(),
        human_tokens_excluded=frac_excluded,
        human_log_loss_included=l_inc,
        raw_log_loss_included=raw_inc,
        log_loss_gap=gap,
        entce=entce,
        entce_se=entce_se,
        entce_included=h - l_inc if not math.isnan(l_inc) else math.nan,
    )


def _difference_se(
    a: Tensor, a_mask: Tensor, b: Tensor, b_mask: Tensor, a_se, b_se, k: int = 1
) -> float:
    """Standard error of ``mean(a) - mean(b)``, clustered by prompt: generation texts
    ``i·k .. i·k + k − 1`` and human text ``i`` share a prompt when ``len(a) = k·len(b)``;
    otherwise the two sets are taken as independent."""
    if a.shape[0] != k * b.shape[0]:
        return math.sqrt(a_se**2 + b_se**2)
    _, ra, ta = _residuals(a, a_mask)
    _, rb, tb = _residuals(b, b_mask)
    ra = ra.reshape(b.shape[0], -1).sum(-1)  # one cluster per prompt
    n = b.shape[0]
    if n < 2:
        return math.nan
    r = ra / ta - rb / tb
    return math.sqrt(n / (n - 1) * float((r * r).sum()))
