"""Samplers from the serving ecosystem: top-H, quadratic smoothing, dynamic temperature, XTC,
mirostat v1's Zipf estimate."""

from __future__ import annotations

import torch
from torch import Tensor

from entcal.decoding.ops.common import F32_MAX, NEG_INF, largest, rows

#: Candidates top-H looks at: transformers' TopHLogitsWarper considers the 100 most probable
#: tokens, renormalized among themselves.
TOP_H_CANDIDATES = 100


def top_h_mask(logits: Tensor, top_h: float | Tensor) -> Tensor:
    """Top-H (Potraghloo et al. 2025, arXiv 2509.02510; transformers' ``TopHLogitsWarper``).

    Among the ``TOP_H_CANDIDATES`` most probable tokens, with ``q`` their probabilities
    renormalized among themselves and sorted in decreasing order, keep the longest prefix whose
    cumulative entropy terms ``Σ_{j<=i} -q_j log q_j`` stay ``<= top_h · H(q)`` (the most probable
    token is always kept); every other token is removed. ``top_h`` in ``(0, 1]`` per row; ``0``
    leaves the row untouched. Computed with transformers' float32 operations in its order, so
    the kept sets are identical. The 100 candidates come from the 100 blocks of ``BLOCK`` tokens
    with the largest maxima (they hold the row's 100 largest logits), so no full-row ``topk``
    runs: with exact ties at the 100th logit, which of the tied tokens is a candidate may differ
    from ``torch.topk``'s choice on the full row. ``min_tokens_to_keep`` does not apply
    (transformers ignores it as well). Returns the ``[N, V]`` bool mask of removed tokens
    (:func:`top_h_apply` writes the processed logits instead, without a full-size mask).
    """
    kept = top_h_kept(logits, top_h)
    if kept is None:
        return torch.zeros_like(logits, dtype=torch.bool)
    idx, keep, active = kept
    remove = torch.ones_like(logits, dtype=torch.bool).scatter_(1, idx, ~keep)
    return remove if active is None else remove & active.view(-1, 1)


def top_h_apply(logits: Tensor, top_h: float | Tensor) -> Tensor | None:
    """``logits`` with the tokens :func:`top_h_mask` removes set to ``-inf``, as a new tensor
    written in one pass (``-inf`` everywhere, then the at most 100 kept logits scattered back):
    top-H keeps a handful of tokens, so this skips the full-size mask and the pass that reads
    it. Rows with ``top_h = 0`` are returned untouched; ``None`` when no row is on."""
    kept = top_h_kept(logits, top_h)
    if kept is None:
        return None
    idx, keep, active = kept
    vals = logits.gather(1, idx).masked_fill_(~keep, NEG_INF)
    out = torch.full_like(logits, NEG_INF).scatter_(1, idx, vals)
    return out if active is None else torch.where(active.view(-1, 1), out, logits)


def top_h_kept(
    logits: Tensor, top_h: float | Tensor
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Top-H's candidates: ``(idx [N, C], keep [N, C] bool, active [N] bool or None when every
    row is on)`` with ``C = min(TOP_H_CANDIDATES, V)``; ``None`` when no row is on."""
    n, v = logits.shape
    if not isinstance(top_h, Tensor):  # one value for every row: no per-row tensor, no sync
        if top_h <= 0 or n == 0:
            return None
        th: Tensor = torch.tensor(float(top_h), dtype=logits.dtype, device=logits.device)
        active = None
    else:
        th = rows(top_h, n, logits.device, logits.dtype)
        active = th > 0
        if not bool(active.any()):
            return None
        if bool(active.all()):
            active = None
    top, idx = largest(logits, min(TOP_H_CANDIDATES, v))
    # torch.distributions.Categorical(logits=top): normalized logits, softmax, clamped entropy
    norm = top - top.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    entropy = -(norm.clamp(min=torch.finfo(norm.dtype).min) * probs).sum(-1)
    cumulative = torch.cumsum(-probs * torch.log(probs), dim=-1)
    keep = cumulative <= (entropy * th).unsqueeze(-1)
    keep[:, 0] = True
    return idx, keep, active


def quadratic_smoothing(logits: Tensor, factor: float | Tensor, curve: float | Tensor) -> Tensor:
    """Quadratic ("smoothing") sampling, as text-generation-webui's ``smoothing_factor``.

    With ``d = l - max l`` per row, ``k = (3 - curve) / 2`` and ``s = (curve - 1) / 2``::

        l' = max l - k·f·d² + s·f·d³

    so the top logit is fixed and the others fall quadratically (``curve = 1``) or, for
    ``curve > 1``, cubically in their distance from it: a large ``f`` sharpens, a small one
    flattens the head. Masked tokens stay ``-inf``; rows with ``factor = 0`` are unchanged.
    text-generation-webui takes the maximum over the whole batch; entcal takes it per row, so a
    row's result does not depend on its batch (identical at batch 1).
    """
    n = logits.shape[0]
    dtype = logits.dtype
    f = rows(factor, n, logits.device, torch.float64).view(-1, 1)
    c = rows(curve, n, logits.device, torch.float64).view(-1, 1)
    top = logits.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    d = logits - top
    # d²·(a + d·b) with the factor applied last: huge factors, curves or logits give ±inf (one
    # infinity per product at most), and d = 0 (the top token) is exactly the top
    a = ((c - 3.0) / 2.0).clamp(-F32_MAX, F32_MAX).to(dtype)
    b = ((c - 1.0) / 2.0).clamp(max=F32_MAX).to(dtype)
    shape = d.square().mul_(d * b + a).mul_(f.clamp(max=F32_MAX).to(dtype))
    out = shape.add_(top).nan_to_num_(nan=NEG_INF).clamp_(max=torch.finfo(dtype).max)
    keep = (d == 0) | torch.isinf(logits) | (f == 0)  # -inf stays; neutral rows untouched
    return torch.where(keep, logits, out)


def dynatemp_temperature(
    logits: Tensor, temp: float | Tensor, spread: float | Tensor, exponent: float | Tensor
) -> Tensor:
    """Dynamic temperature by normalized entropy (llama.cpp's ``temp_ext``, koboldcpp's
    ``dynatemp_range`` / ``dynatemp_exponent``), per row.

    ``T = T_min + (T_max - T_min) · (H / log n)^exponent`` with ``T_min = max(0, temp - spread)``,
    ``T_max = temp + spread``, ``H`` the entropy (nats) of ``softmax(logits)`` and ``n`` the
    number of tokens not masked. Rows with ``spread = 0`` get ``temp``; rows with at most one
    candidate get ``T = 1`` (llama.cpp leaves them alone). Returns ``T`` ``[N]`` (float64);
    divide with :func:`temperature`, which takes ``T = 0`` as greedy (ties all kept).
    ``H`` and ``n`` are over the tokens this stage sees: llama.cpp applies the temperature last,
    after truncation, and the chain applies it first; write a pipeline
    (``"top_k=40 | min_p=0.05 | temperature=1,dynatemp_range=0.5"``) for llama.cpp's placement.
    """
    n = logits.shape[0]
    dev = logits.device
    t = rows(temp, n, dev, torch.float64)
    r = rows(spread, n, dev, torch.float64)
    e = rows(exponent, n, dev, torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).nansum(-1).double()  # masked tokens: 0 * -inf = nan, skipped
    count = torch.isfinite(logits).sum(-1).double()
    normalized = (h / count.clamp(min=2.0).log()).clamp(0.0, 1.0)
    lo = (t - r).clamp(min=0.0)
    dynamic = lo + (t + r - lo) * normalized.pow(e)
    dynamic = torch.where(count > 1, dynamic, torch.ones_like(dynamic))
    return torch.where(r > 0, dynamic, t)


def xtc_mask(
    logits: Tensor, threshold: float | Tensor, fire: Tensor, min_keep: int | Tensor = 1
) -> Tensor:
    """XTC, "exclude top choices" (llama.cpp / text-generation-webui), on the rows where ``fire``.

    With ``p = softmax(logits)``: if at least two tokens have ``p >= threshold``, remove all of
    them except the least probable one, provided at least ``min_keep`` tokens remain; rows with
    ``threshold > 0.5`` (at most one token can reach it) or ``fire`` False are unchanged.
    ``fire`` ``[N]`` bool is the per-sequence coin (probability ``xtc_probability``) drawn by the
    caller. Tokens tied with the least probable token above the threshold are all kept
    (llama.cpp keeps one of them, in its sort order). text-generation-webui also skips the step
    when newline or EOS would be removed; entcal, like llama.cpp, does not.
    """
    n = logits.shape[0]
    thr = rows(threshold, n, logits.device, torch.float64)
    mk = rows(min_keep, n, logits.device, torch.long)
    # p >= threshold  <=>  logit >= lse + log(threshold): no softmax; masked tokens never qualify
    cut = (torch.logsumexp(logits, dim=-1).double() + thr.log()).to(logits.dtype).view(-1, 1)
    cut = torch.maximum(cut, torch.full_like(cut, torch.finfo(logits.dtype).min))
    above = logits >= cut
    count = above.sum(-1)
    lowest = torch.where(above, logits, float("inf")).amin(-1, keepdim=True)
    # what stays: the candidates below the lowest qualifying token, plus that token (and ties)
    left = (logits <= lowest).sum(-1) - (logits == NEG_INF).sum(-1)
    act = fire.to(logits.device) & (thr <= 0.5) & (count >= 2) & (left >= mk)
    if not bool(act.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    return (logits > lowest) & act.view(-1, 1)


def mirostat_v1_k(logits: Tensor, mu: Tensor, m: int | Tensor) -> Tensor:
    """Mirostat v1's ``k`` per row (Basu et al. 2021, Algorithm 1; as llama.cpp computes it).

    From the ``m`` most probable tokens, the Zipf exponent is estimated by least squares,
    ``ŝ = Σ t_i b_i / Σ t_i²`` with ``t_i = log((i+2)/(i+1))``, ``b_i = log(p_i / p_{i+1})``
    (``i < m - 1``); then with ``ε = ŝ - 1`` and vocabulary size ``V``::

        k = (ε · 2^mu / (1 - V^(-ε)))^(1/ŝ)

    Returns ``k`` ``[N]`` (int64, at least 1, at most ``V``); ``mu`` in bits.
    """
    n, v = logits.shape
    mm = rows(m, n, logits.device, torch.long)
    width = int(min(int(mm.max()), v))
    # log(p_i / p_{i+1}) is a logit difference: the top m logits suffice, no softmax
    top = largest(logits, width)[0].double()
    i = torch.arange(width - 1, device=logits.device, dtype=torch.float64)
    t = torch.log((i + 2.0) / (i + 1.0))
    b = top[:, :-1] - top[:, 1:]  # log(p_i / p_{i+1})
    use = (i.view(1, -1) < (mm - 1).view(-1, 1)) & torch.isfinite(b)
    s_hat = (torch.where(use, t * b, 0.0)).sum(-1) / torch.where(use, t * t, 0.0).sum(-1)
    eps = s_hat - 1.0
    base = eps * torch.exp2(mu.double()) / (1.0 - torch.pow(float(v), -eps))
    k = torch.exp(torch.log(base) / s_hat)
    k = torch.nan_to_num(k, nan=1.0, posinf=float(v), neginf=1.0)
    return k.clamp(1.0, float(v)).floor().long()
