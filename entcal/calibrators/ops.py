"""Batched tensor math of future-entropy calibration (no model, no state).

The future-entropy-adjusted distribution of Cao, Valiant & Liang ("On the Entropy Calibration of
Language Models", arXiv 2511.11966, Eq. 9 of the NeurIPS version)::

    p_α(v) ∝ exp( (1 + α) · log p(v) − α · Ĥ(v) ),

where Ĥ(v) predicts the entropy of the continuation after choosing ``v``. Writing
``φ(v) = log p(v) − Ĥ(v)``, ``log p_α = log p + α·φ − logsumexp(log p + α·φ)``: the log loss of a
token ``y`` is convex in α, with derivative ``E_{p_α}[φ] − φ(y)`` and second derivative
``Var_{p_α}(φ) ≥ 0`` (Lemma A.2 of the paper; moment matching of φ).

Only the *candidates*, the most probable tokens covering at least ``1 − 1e-4`` of the mass, get
their own prediction; every other token gets the mass-weighted mean of the candidates' Ĥ, so the
tail is tempered by ``(1 + α)`` alone and nothing is truncated.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "COVER_MASS",
    "adjusted_logprobs",
    "check_alpha",
    "cover_candidates",
    "cover_mask",
    "entropy_stats",
    "fill_phi",
    "fill_phi_dense",
]

COVER_MASS = 1.0 - 1e-4
_LADDER_START = 64


def entropy_stats(logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Entropy ``H = −Σ p log p`` and varentropy ``Σ p (log p)² − H²`` of each row (nats).

    ``logprobs`` must be normalized (log-softmax); ``-inf`` entries contribute 0.
    """
    p = logprobs.exp()
    lp = torch.where(p > 0, logprobs, torch.zeros_like(logprobs))
    ent = -(p * lp).sum(-1)
    second = (p * lp * lp).sum(-1)
    return ent, (second - ent * ent).clamp_min(0.0)


def cover_candidates(logprobs: Tensor, mass: float = COVER_MASS) -> tuple[Tensor, Tensor]:
    """The most probable tokens of each row that together hold at least ``mass`` of it.

    A partial sort: ``topk`` with k = 64, 256, 1024, ... until every row is covered, instead of a
    full-vocabulary sort.

    Returns:
        ``(ids, valid)``, both ``(N, M)`` with M the largest count any row needs; row i's
        candidates are ``ids[i, valid[i]]``, in decreasing probability. Zero-probability tokens
        are never candidates.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    vocab = logprobs.shape[-1]
    k = min(_LADDER_START, vocab)
    while True:
        vals, ids = torch.topk(logprobs, k, dim=-1, sorted=True)
        probs = vals.exp()
        before = probs.cumsum(-1) - probs  # mass strictly above each slot
        # A slot is needed while the mass before it is still short of the target.
        needed = (before < mass) & (probs > 0)
        count = needed.sum(-1)
        covered = (probs.sum(-1) >= mass) | (count < k)
        if bool(covered.all()) or k == vocab:
            break
        k = min(k * 4, vocab)
    m = max(int(count.max()), 1)
    return ids[:, :m], needed[:, :m]


def cover_mask(
    logprobs: Tensor, mass: float = COVER_MASS, step: float = 0.25, probs: Tensor | None = None
) -> Tensor:
    """Bool ``(N, V)``: the tokens with ``log p >= max log p - k·step`` for the smallest ``k``
    whose kept tokens hold at least ``mass`` of the row.

    A superset of the minimal cover (:func:`cover_candidates`) by at most the tokens within one
    ``step`` (nats) of its boundary, found with one float64 histogram of the mass over
    ``step``-wide bins of ``log p`` below the row maximum: a few elementwise passes, no sort and
    no gather, whatever the number of candidates (flat rows need tens of thousands at 1 - 1e-4).
    Tokens more than 64 nats below the maximum are never kept (their mass is below ``V·e^-64``).
    ``probs``: ``logprobs.exp()`` if the caller has it.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}")
    n_bins = int(64.0 / step) + 1  # the last bin collects everything deeper (and -inf)
    top = logprobs.amax(-1, keepdim=True)
    depth = torch.sub(top, logprobs).div_(step).nan_to_num_(posinf=n_bins - 1)
    bins = depth.clamp_(max=n_bins - 1).long()
    hist = torch.zeros(logprobs.shape[0], n_bins, dtype=torch.float64, device=logprobs.device)
    hist.scatter_add_(1, bins, (logprobs.exp() if probs is None else probs).double())
    cum = hist[:, :-1].cumsum(-1)
    # the first bin at which the kept mass reaches ``mass`` of the row's total
    k = (cum < mass * hist.sum(-1, keepdim=True)).sum(-1, keepdim=True).clamp(max=n_bins - 2)
    return bins <= k


def fill_phi(
    logprobs: Tensor, cand_ids: Tensor, cand_valid: Tensor, cand_entropy: Tensor
) -> Tensor:
    """φ(v) = log p(v) − Ĥ(v) over the whole vocabulary.

    Candidates use their own ``cand_entropy``; every other token the mass-weighted mean of the
    candidates' Ĥ (``Σ_c p(c)·Ĥ(c) / Σ_c p(c)``).
    """
    probs = logprobs.gather(-1, cand_ids).exp() * cand_valid
    h = torch.where(cand_valid, cand_entropy, torch.zeros_like(cand_entropy))
    mean = (probs * h).sum(-1) / probs.sum(-1).clamp_min(1e-30)
    fut = mean[:, None].expand_as(logprobs).clone()
    fut.scatter_(-1, cand_ids, torch.where(cand_valid, cand_entropy, mean[:, None]))
    return logprobs - fut


def fill_phi_dense(logprobs: Tensor, keep: Tensor, entropy: Tensor) -> Tensor:
    """:func:`fill_phi` when Ĥ is known for every token: ``entropy (N, V)``, ``keep`` the
    candidates (bool ``(N, V)``). Candidates keep their Ĥ; every other token gets the candidates'
    mass-weighted mean. A few elementwise passes, no gather, whatever the number of candidates.
    """
    p = torch.where(keep, logprobs.exp(), 0.0)
    mean = (p * entropy).sum(-1, keepdim=True) / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return logprobs - torch.where(keep, entropy, mean)


def check_alpha(alpha: Tensor) -> None:
    """``ValueError`` unless every α > −1 (the exponent ``1 + α`` of p must stay positive)."""
    if bool((alpha <= -1).any()):
        raise ValueError("alpha must be > -1 (the exponent 1 + alpha of p must stay positive)")


def adjusted_logprobs(logprobs: Tensor, phi: Tensor, alpha: Tensor | float) -> Tensor:
    """``log p_α = log_softmax(log p + α·φ)`` with per-row ``alpha`` (shape ``(N,)`` or scalar).

    α = 0 returns ``logprobs`` unchanged; ``-inf`` tokens stay ``-inf`` (α > −1 is required so that
    the exponent ``(1 + α)`` of p stays positive).
    """
    alpha_t = torch.as_tensor(alpha, dtype=logprobs.dtype, device=logprobs.device)
    if alpha_t.ndim == 1:
        alpha_t = alpha_t[:, None]
    check_alpha(alpha_t)
    finite = torch.isfinite(logprobs)
    z = torch.where(finite, logprobs + alpha_t * torch.where(finite, phi, 0.0), logprobs)
    return torch.log_softmax(z, dim=-1)
