"""Temperature and the rules that threshold each token on its own: top-k, min-p, epsilon, eta,
top-nσ (each kept set equal to transformers' warper on the same tensor)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entcal.decoding.ops.common import NEG_INF, finite_extent, kth_largest, min_keep_guard, rows


def temperature(
    logits: Tensor,
    t: float | Tensor,
    row_max: Tensor | None = None,
    extent: float | None = None,
) -> Tensor:
    """``logits / T`` per row (``T > 0``); bitwise equal to transformers' TemperatureLogitsWarper.

    Where that division would overflow (``|max logit| / T`` beyond the dtype's range, or ``T``
    itself not representable, e.g. ``T = 1e-300``), the row is computed as
    ``(logits - max) * min(1/T, float32 max)`` instead (in float32 at least), with tokens whose
    probability is then exactly 0 in the dtype written as ``-inf``: the same distribution as the
    exact ``softmax(x / T)``, so in the limit ``T -> 0`` the argmax (and its ties) at 0 and every
    other token at ``-inf``, never NaN or ``+inf``. All-``-inf`` rows stay all ``-inf``.
    ``row_max`` ``[N]``: the rows' maxima if the caller has them (:func:`check_logits` returns
    them), which saves the pass that finds them; ``extent``: their :func:`finite_extent` if the
    caller has it (``Decoder.__call__`` does), which saves the synchronization.

    >>> temperature(torch.tensor([[0.0, 1.0, -1.0]]), 1e-300)
    tensor([[-inf, 0., -inf]])
    """
    # torch divides half-precision tensors by a Python scalar in float32: limits are float32's
    acc = torch.promote_types(logits.dtype, torch.float32)
    amax = torch.finfo(acc).max
    out_max = torch.finfo(logits.dtype).max
    if not isinstance(t, Tensor):
        if t >= 1.0:  # |x / t| <= |x|: nothing can overflow (T beyond float32: -inf/inf = NaN)
            return logits / min(t, amax)
        # Overflow check before the division (a few scalar ops on the row maxima: fewer
        # temporaries around the one full-size result)
        # (an all -inf row makes this None: the general path below handles it)
        top_abs = extent
        if top_abs is None:
            top_abs = finite_extent(logits.amax(-1) if row_max is None else row_max)
        if top_abs is not None and t >= torch.finfo(acc).tiny and top_abs / t <= out_max:
            return logits / t
        plain = logits / t  # a float32 division by the same float32 value as below
    else:
        tt = rows(t, logits.shape[0], logits.device, logits.dtype).clamp(
            max=torch.finfo(logits.dtype).max
        )
        plain = logits / tt.view(-1, 1)
    # Overflow check (one reduction): the row is safe iff its largest |logit| / T is in range.
    t64 = rows(t, logits.shape[0], logits.device, torch.float64)
    top = (logits.amax(-1) if row_max is None else row_max.to(logits.device)).to(torch.float64)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    # Only the top logit matters: a lower one that overflows to -inf had probability 0 anyway.
    reach = top.abs() / t64
    safe = (reach <= out_max) & (t64 >= torch.finfo(acc).tiny)
    if isinstance(t, Tensor):  # the per-row T itself must be representable in the dtype
        safe &= t64 >= torch.finfo(logits.dtype).tiny
    if bool(safe.all()):
        return plain
    inv = (1.0 / t64).clamp(max=amax).to(acc).view(-1, 1)
    shifted = (logits.to(acc) - top.to(acc).view(-1, 1)) * inv
    # (x - max) <= 0 and 0 * inv = 0: the argmax stays finite. Below 2·log(tiny) a token's
    # probability is exactly 0 in this dtype (subnormals included), so it is written as -inf.
    tiny = torch.finfo(logits.dtype).tiny
    shifted = shifted.masked_fill(shifted < 2.0 * math.log(tiny), float("-inf")).to(logits.dtype)
    return torch.where(safe.view(-1, 1), plain, shifted)


def top_k_mask(logits: Tensor, k: int | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Top-k (Fan et al. 2018): remove tokens below the k-th largest logit; ``k=0`` keeps all.

    Like transformers, ``k`` is raised to ``min_keep`` and ties with the k-th logit are kept.
    """
    if not isinstance(k, Tensor) and not isinstance(min_keep, Tensor):
        # one k for every row (the common case): no per-row tensors, no synchronization
        if k <= 0 or logits.shape[0] == 0:
            return torch.zeros_like(logits, dtype=torch.bool)
        return logits < kth_largest(logits, int(max(k, min_keep)))
    n = logits.shape[0]
    kk = rows(k, n, logits.device, torch.long)
    mk = rows(min_keep, n, logits.device, torch.long)
    active = kk > 0
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    kk = torch.where(active, torch.maximum(kk, mk), torch.full_like(kk, logits.shape[-1]))
    remove = logits < kth_largest(logits, kk)
    return remove if bool(active.all()) else remove & active.view(-1, 1)


def min_p_mask(logits: Tensor, min_p: float | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Min-p (Nguyen et al. 2024, arXiv 2407.01082): remove ``p_i < min_p * max_j p_j``.

    Computed with transformers' float32 arithmetic (softmax, max, product) so boundary cases agree.
    """
    n = logits.shape[0]
    mp = rows(min_p, n, logits.device, logits.dtype)
    probs = torch.softmax(logits, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    remove = probs < mp.view(-1, 1) * top
    mk = rows(min_keep, n, logits.device, torch.long)
    if bool((mk > 1).any()):
        remove &= min_keep_guard(logits, mk)
    return remove


def epsilon_mask(logits: Tensor, epsilon: float | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Epsilon sampling (Hewitt et al. 2022, arXiv 2210.15191): remove ``p_i < epsilon``."""
    n = logits.shape[0]
    eps = rows(epsilon, n, logits.device, logits.dtype)
    probs = logits.softmax(dim=-1)
    return (probs < eps.view(-1, 1)) & min_keep_guard(logits, min_keep)


def eta_mask(logits: Tensor, eta: float | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Eta sampling (Hewitt et al. 2022): remove ``p_i < min(eta, sqrt(eta) * exp(-H(p)))``.

    ``H`` in nats, computed like ``torch.distributions.Categorical(logits=...).entropy()`` as
    transformers does. ``eta = 0`` rows are untouched.
    """
    n = logits.shape[0]
    e = rows(eta, n, logits.device, logits.dtype).view(-1, 1)
    probs = logits.softmax(dim=-1)
    # Categorical(logits=x): normalized logits, softmax of those, clamp at finfo.min, -(l*p).sum.
    # (in place where transformers makes new tensors: the same values, and a full-size fresh
    # tensor costs more than the arithmetic on a CPU)
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    cprobs = torch.softmax(norm, dim=-1)
    ent = -norm.clamp_(min=torch.finfo(norm.dtype).min).mul_(cprobs).sum(-1, keepdim=True)
    del norm, cprobs
    thr = torch.minimum(e, torch.sqrt(e) * torch.exp(-ent))
    remove = probs < thr
    if isinstance(min_keep, int) and min_keep == 1:
        # In exact arithmetic max p >= exp(-H) > threshold; in float32 a tie at the top can
        # round H below log 2 and remove both, so the top token is kept explicitly (as the
        # transformers warper's min_tokens_to_keep guard does).
        return remove & (logits < logits.amax(-1, keepdim=True))
    return remove & min_keep_guard(logits, min_keep)


def top_n_sigma_mask(logits: Tensor, n_sigma: float | Tensor) -> Tensor:
    """Top-nσ (Tang et al. 2024, arXiv 2411.07641): keep ``l_i >= max(l) - n * σ(l)``.

    ``σ`` is the population standard deviation of the row's *finite* logits (as in llama.cpp).
    The kept set is invariant to temperature (scaling the logits scales max and σ alike).
    ``n = inf`` rows are untouched. Statistics in float32 (Welford when no token is masked).
    """
    n = logits.shape[0]
    ns = rows(n_sigma, n, logits.device, logits.dtype).view(-1, 1)
    mx = logits.amax(-1, keepdim=True)
    if bool((logits.amin(-1) > NEG_INF).all()):
        var, _ = torch.var_mean(logits, dim=-1, correction=0, keepdim=True)
    else:
        finite = logits > NEG_INF
        cnt = finite.sum(-1, keepdim=True).clamp(min=1)
        x = torch.where(finite, logits, 0.0)
        mean = x.sum(-1, keepdim=True) / cnt
        var = torch.where(finite, x - mean, 0.0).square_().sum(-1, keepdim=True) / cnt
    thr = mx - ns * var.sqrt()  # -inf or nan for n=inf / all -inf rows: nothing removed
    thr = torch.nan_to_num(thr, nan=NEG_INF, posinf=NEG_INF)
    return logits < thr
