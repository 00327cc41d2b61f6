"""The per-step rules of the adaptive decoders: mirostat's truncation and EDT's temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mirostat_mask(logits: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """Mirostat v2 truncation (Basu et al. 2021, arXiv 2007.14966).

    Removes tokens whose surprise ``-log2 p_i`` exceeds ``mu`` (bits), always keeping the most
    probable token. Returns ``(remove, lse)`` where ``lse`` ``[N]`` is the row's log-normalizer
    (nats), used to compute the surprise of the sampled token for the ``mu`` update.
    """
    lse = torch.logsumexp(logits, dim=-1)
    # -log2 p_i > mu  <=>  l_i < lse - mu * ln 2 ; computed in logit space (no softmax).
    thr = lse - mu.to(logits.dtype) * math.log(2.0)
    remove = logits < thr.view(-1, 1)
    remove &= logits < logits.amax(-1, keepdim=True)
    return remove, lse


def edt_temperature(logits: Tensor, t0: Tensor, base: Tensor, theta: Tensor) -> Tensor:
    """Entropy-based dynamic temperature (Zhang et al. 2024, arXiv 2403.14541), per row.

    ``T = T0 * N^(θ / H)`` with ``H`` the entropy (nats) of ``softmax(logits)``, ``0 < N < 1``:
    confident steps (``H -> 0``) get ``T -> 0`` (greedy), uncertain ones approach ``T0``.
    Returns ``T`` ``[N]``, floored at 1e-6 so that dividing by it stays finite.
    """
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).nansum(-1).double()  # masked tokens: 0 * -inf = nan, skipped
    expo = theta.double() / h.clamp(min=1e-12)
    t = t0.double() * torch.exp(expo * torch.log(base.double()))
    t = torch.nan_to_num(t, nan=1.0)  # all -inf rows: any temperature leaves them unchanged
    return t.clamp(min=1e-6, max=torch.finfo(logits.dtype).max).to(logits.dtype)
