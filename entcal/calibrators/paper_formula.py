"""Batched tensor math of future-entropy calibration (no model, no state).

The future-entropy-adjusted distribution of Cao, Valiant & Liang ("On the Entropy Calibration of
Language Models", arXiv 2511.11966, Eq. 9 of the NeurIPS version)::

    p_α(v) ∝ exp( (1 + α) · log p(v) − α · Ĥ(v) ),

where Ĥ(v) predicts the entropy of the continuation after choosing ``v``. Writing
``φ(v) = log p(v) − Ĥ(v)``, ``log p_α = log p + α·φ − logsumexp(log p + α·φ)``: the log loss of a
token ``y`` is convex in α, with derivative ``E_{p_α}[φ] − φ(y)`` and second derivative
``Var_{p_α}(φ) ≥ 0`` (Lemma A.2 of the paper; moment matching of φ).

Only the *candidates* (the lookahead decoder: its top-k tokens) get their own Ĥ; every other token
gets the mass-weighted mean of the candidates' Ĥ, so the tail is tempered by ``(1 + α)`` alone
and nothing is truncated. (The ``calibrated`` decoder uses the state-gated form with no
per-candidate term: :mod:`entcal.calibrators.calibrated`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adjusted_logprobs",
    "check_alpha",
    "fill_phi",
]


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


def check_alpha(alpha: Tensor) -> None:
    """``ValueError`` unless every α > −1 (the exponent ``1 + α`` of p must stay positive)."""
    if bool((alpha <= -1).any()):
        raise ValueError("alpha must be > -1 (the exponent 1 + alpha of p must stay positive)")


_ALPHA_CAP = 1e6


def adjusted_logprobs(logprobs: Tensor, phi: Tensor, alpha: Tensor | float) -> Tensor:
    """``log p_α = log_softmax(log p + α·φ)`` with per-row ``alpha`` (shape ``(N,)`` or scalar).

    α = 0 returns ``logprobs`` unchanged; ``-inf`` tokens stay ``-inf`` (α > −1 is required so that
    the exponent ``(1 + α)`` of p stays positive).
    """
    alpha_t = torch.as_tensor(alpha, dtype=logprobs.dtype, device=logprobs.device)
    if alpha_t.ndim == 1:
        alpha_t = alpha_t[:, None]
    check_alpha(alpha_t)
    # Beyond ~1e6 the distribution is already the argmax of φ (to float32 resolution); the cap
    # keeps α·φ finite for any accepted α (α = 1e300 would give inf·0 = NaN).
    alpha_t = alpha_t.clamp(max=_ALPHA_CAP)
    finite = torch.isfinite(logprobs)
    z = torch.where(finite, logprobs + alpha_t * torch.where(finite, phi, 0.0), logprobs)
    return torch.log_softmax(z, dim=-1)
