"""Pure batched sampling ops (vLLM style): one function per rule, per-row parameters.

Every ``*_mask`` function takes float32 logits ``[N, V]`` (masked tokens at ``-inf``) and per-row
parameters (a Python number, broadcast to all rows, or a tensor ``[N]``) and returns a boolean
``[N, V]`` mask of the tokens to **remove** (``True`` = removed), like the ``indices_to_remove`` of
transformers' warpers; apply it with ``logits.masked_fill(mask, -inf)``. A row whose parameter is
the neutral value (``top_p=1``, ``top_k=0``, ``min_p=0``, ``typical=1``, ``epsilon=0``,
``eta=0``, ``n_sigma=inf``) is left untouched, so one call serves a batch that mixes settings.

Exactness. For temperature, top-k, top-p, min-p, typical, epsilon and eta the kept set equals
transformers' warper on the same tensor (differentially tested on thousands of random batches).
top-p and typical avoid transformers' full-vocabulary sort: they sort only a prefix found with
``topk`` and compute its mass in float64; a row is decided on the prefix only when the prefix
provably reaches the mass and the decision at the boundary is at least ``EXACT_TOL`` away from the
threshold (transformers' own float32 cumulative sums are far more accurate than that). Every other
row is recomputed with transformers' arithmetic (full sort, float32 softmax, cumulative sum), so
the result is the same in all cases, not only in the common one.

Ties. When several tokens share the logit (or, for typical, the |surprise - entropy| score) of the
last kept token, all of them are kept: the kept set is ``{v : score(v) >= score of the boundary
token}``, the rule of transformers' TopK. transformers' TopP, MinP (``min_tokens_to_keep``) and
Typical (``min_tokens_to_keep``) keep an arbitrary subset of such a tied group (whatever order
``torch.sort``/``torch.topk`` returns); entcal keeps the whole group, so its set is the smallest
tie-closed superset of theirs. With continuous logits ties have probability zero and the sets are
identical.

All-``-inf`` rows stay all ``-inf`` (nothing is removed, no NaN is produced); NaN is rejected
earlier by :func:`check_logits`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EXACT_TOL",
    "PREFIX_SIZES",
    "check_logits",
    "edt_temperature",
    "entropy_stats",
    "epsilon_mask",
    "eta_mask",
    "min_p_mask",
    "mirostat_mask",
    "rows",
    "temperature",
    "top_k_mask",
    "top_n_sigma_mask",
    "top_p_mask",
    "typical_mask",
]

#: Margin (in probability mass) by which a prefix decision must clear the top-p / typical
#: threshold; closer rows are recomputed with transformers' exact arithmetic. transformers'
#: float32 cumulative sums are accurate to ~1e-7 at vocab 262144 (measured), so 2e-6 leaves
#: a 20x margin while sending well under 1% of real-model rows to the slow path.
EXACT_TOL = 2e-6

#: Prefix lengths tried, in order, by top-p and typical before the full sort.
PREFIX_SIZES = (256, 4096)

_NEG_INF = float("-inf")


def rows(value: float | int | Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A per-row parameter as a tensor ``[n]`` on ``device`` (a number is broadcast)."""
    if isinstance(value, Tensor):
        t = value.to(device=device, dtype=dtype)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"per-row parameter has shape {tuple(t.shape)}, expected ({n},)")
        return t
    return torch.full((n,), value, device=device, dtype=dtype)


def check_logits(logits: Tensor) -> Tensor:
    """Validate ``[N, V]`` logits and return their row maxima ``[N]``.

    Raises ``ValueError`` naming the rows that contain NaN or ``+inf`` (a softmax over them is
    undefined). Rows that are entirely ``-inf`` are allowed (every op leaves them unchanged).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    # amax propagates NaN, so one reduction finds both NaN and +inf rows.
    mx = logits.amax(dim=-1)
    bad = torch.isnan(mx) | (mx == float("inf"))
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        nan_rows = [i for i in idx if bool(torch.isnan(logits[i]).any())]
        inf_rows = [i for i in idx if i not in nan_rows]
        parts = []
        if nan_rows:
            parts.append(f"NaN logits in batch row(s) {nan_rows[:10]}")
        if inf_rows:
            parts.append(f"+inf logits in batch row(s) {inf_rows[:10]}")
        raise ValueError(
            "logits: " + "; ".join(parts) + " (logits must be finite or -inf for masked tokens)"
        )
    return mx


def _kth_largest(logits: Tensor, k: Tensor) -> Tensor:
    """Value of the k-th largest logit per row ``[N, 1]`` (k >= 1, clipped to V)."""
    v = logits.shape[-1]
    k = k.clamp(1, v)
    kmax = int(k.max())
    if kmax == 1:
        return logits.amax(dim=-1, keepdim=True)
    vals = logits.topk(kmax, dim=-1, sorted=True).values
    return vals.gather(-1, (k - 1).view(-1, 1))


def _min_keep_guard(logits: Tensor, min_keep: int | Tensor) -> Tensor:
    """``[N, V]`` bool: True for tokens *outside* the top ``min_keep`` (ties at the edge kept)."""
    n = logits.shape[0]
    k = rows(min_keep, n, logits.device, torch.long)
    return logits < _kth_largest(logits, k)


# --------------------------------------------------------------------------------------------
# temperature and the simple thresholds
# --------------------------------------------------------------------------------------------


def temperature(logits: Tensor, t: float | Tensor) -> Tensor:
    """``logits / T`` per row (``T > 0``); bitwise equal to transformers' TemperatureLogitsWarper."""
    n = logits.shape[0]
    tt = rows(t, n, logits.device, logits.dtype)
    return logits / tt.view(-1, 1)


def top_k_mask(logits: Tensor, k: int | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Top-k (Fan et al. 2018): remove tokens below the k-th largest logit; ``k=0`` keeps all.

    Like transformers, ``k`` is raised to ``min_keep`` and ties with the k-th logit are kept.
    """
    n = logits.shape[0]
    kk = rows(k, n, logits.device, torch.long)
    mk = rows(min_keep, n, logits.device, torch.long)
    active = kk > 0
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    kk = torch.where(active, torch.maximum(kk, mk), torch.full_like(kk, logits.shape[-1]))
    return (logits < _kth_largest(logits, kk)) & active.view(-1, 1)


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
        remove &= _min_keep_guard(logits, mk)
    return remove


def epsilon_mask(logits: Tensor, epsilon: float | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Epsilon sampling (Hewitt et al. 2022, arXiv 2210.15191): remove ``p_i < epsilon``."""
    n = logits.shape[0]
    eps = rows(epsilon, n, logits.device, logits.dtype)
    probs = logits.softmax(dim=-1)
    return (probs < eps.view(-1, 1)) & _min_keep_guard(logits, min_keep)


def eta_mask(logits: Tensor, eta: float | Tensor, min_keep: int | Tensor = 1) -> Tensor:
    """Eta sampling (Hewitt et al. 2022): remove ``p_i < min(eta, sqrt(eta) * exp(-H(p)))``.

    ``H`` in nats, computed like ``torch.distributions.Categorical(logits=...).entropy()`` as
    transformers does. ``eta = 0`` rows are untouched.
    """
    n = logits.shape[0]
    e = rows(eta, n, logits.device, logits.dtype).view(-1, 1)
    probs = logits.softmax(dim=-1)
    # Categorical(logits=x): normalized logits, softmax of those, clamp at finfo.min, -(l*p).sum.
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    cprobs = torch.softmax(norm, dim=-1)
    norm = norm.clamp(min=torch.finfo(norm.dtype).min)
    ent = -(norm * cprobs).sum(-1, keepdim=True)
    thr = torch.minimum(e, torch.sqrt(e) * torch.exp(-ent))
    return (probs < thr) & _min_keep_guard(logits, min_keep)


def top_n_sigma_mask(logits: Tensor, n_sigma: float | Tensor) -> Tensor:
    """Top-nσ (Tang et al. 2024, arXiv 2411.07641): keep ``l_i >= max(l) - n * σ(l)``.

    ``σ`` is the population standard deviation of the row's *finite* logits (as in llama.cpp).
    The kept set is invariant to temperature (scaling the logits scales max and σ alike).
    ``n = inf`` rows are untouched.
    """
    n = logits.shape[0]
    ns = rows(n_sigma, n, logits.device, torch.float64).view(-1, 1)
    finite = torch.isfinite(logits)
    cnt = finite.sum(-1, keepdim=True).clamp(min=1).to(torch.float64)
    x = torch.where(finite, logits, 0.0)
    mean = x.sum(-1, keepdim=True, dtype=torch.float64) / cnt
    dev = torch.where(finite, logits.double() - mean, 0.0)
    sigma = (dev.square().sum(-1, keepdim=True) / cnt).sqrt()
    mx = logits.amax(-1, keepdim=True).double()
    thr = mx - ns * sigma  # -inf or nan for n=inf / all -inf rows: nothing removed
    thr = torch.nan_to_num(thr, nan=_NEG_INF)
    return logits.double() < thr


# --------------------------------------------------------------------------------------------
# top-p and typical: prefix + exact fallback
# --------------------------------------------------------------------------------------------


def _top_p_exact(x: Tensor, top_p: Tensor, min_keep: Tensor) -> Tensor:
    """transformers' TopP arithmetic on rows ``x``; returns the kept count per row ``[n]``."""
    v = x.shape[-1]
    sorted_logits = torch.sort(x, dim=-1, descending=False).values
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    thr = (1.0 - top_p).to(torch.float32).view(-1, 1)
    remove = cum <= thr
    pos = torch.arange(v, device=x.device).view(1, -1)
    remove &= pos < (v - min_keep).view(-1, 1)
    return v - remove.sum(-1)


def top_p_mask(
    logits: Tensor,
    top_p: float | Tensor,
    min_keep: int | Tensor = 1,
    prefix_sizes: tuple[int, ...] = PREFIX_SIZES,
) -> Tensor:
    """Top-p / nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751).

    Keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (at least
    ``min_keep``); transformers' rule "remove tokens whose ascending cumulative mass is
    ``<= 1 - top_p``" is equivalent to keeping token ``i`` (in descending order) iff the mass
    strictly above it is ``< top_p``. ``top_p = 1`` rows are untouched.

    Cost: a ``topk`` prefix (256, then 4096) instead of a full sort; see the module docstring for
    why the result equals the full-sort rule in every case.
    """
    n, v = logits.shape
    tp = rows(top_p, n, logits.device, torch.float64)
    mk = rows(min_keep, n, logits.device, torch.long).clamp(1, v)
    active = tp < 1.0
    remove = torch.zeros_like(logits, dtype=torch.bool)
    if not bool(active.any()):
        return remove
    todo = active.nonzero().flatten()
    # Threshold logit per row: tokens strictly below it are removed.
    thr_all = torch.full((n,), _NEG_INF, dtype=logits.dtype, device=logits.device)
    for k in prefix_sizes:
        if todo.numel() == 0:
            break
        if k >= v:
            break
        x = logits.index_select(0, todo)
        p_row = tp.index_select(0, todo).view(-1, 1)
        vals = x.topk(k, dim=-1, sorted=True).values
        m = vals[:, :1]
        # float64 normalizer: exact enough that only transformers' own rounding matters.
        s = torch.exp(x - m).sum(-1, keepdim=True, dtype=torch.float64)
        p = torch.exp((vals - m).double()) / s
        cum = p.cumsum(-1)
        excl = cum - p
        kept = (excl < p_row).sum(-1)  # excl is non-decreasing: a prefix of length kept
        # The decision is safe when the boundary clears the threshold by EXACT_TOL on both sides
        # and the first removed token lies inside the prefix.
        inside = kept < k
        ki = kept.clamp(max=k - 1).view(-1, 1)
        # first removed token (position `kept`) and last kept one (position `kept - 1`)
        first_ok = excl.gather(-1, ki) >= p_row + EXACT_TOL
        last_ok = (excl.gather(-1, (ki - 1).clamp(min=0)) < p_row - EXACT_TOL) | (ki == 0)
        ok = inside & last_ok.flatten() & first_ok.flatten()
        kk = torch.maximum(kept, mk.index_select(0, todo)).clamp(max=k)
        thr = vals.gather(-1, (kk - 1).view(-1, 1)).flatten()
        # rows needing more than k tokens because of min_keep are decided by the exact pass
        ok &= mk.index_select(0, todo) <= k
        thr_all.index_copy_(0, todo[ok], thr[ok])
        todo = todo[~ok]
    if todo.numel():
        x = logits.index_select(0, todo)
        kept = _top_p_exact(x, tp.index_select(0, todo), mk.index_select(0, todo))
        thr = _kth_largest(x, kept).flatten()
        thr_all.index_copy_(0, todo, thr)
    remove = logits < thr_all.view(-1, 1)
    return remove & active.view(-1, 1)


def _typical_scores(logits: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' Typical arithmetic: probabilities and ``|-log p - H|`` (float32)."""
    normalized = torch.nn.functional.log_softmax(logits, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - ent)
    return p, shifted


def typical_mask(
    logits: Tensor,
    mass: float | Tensor,
    min_keep: int | Tensor = 1,
    prefix_sizes: tuple[int, ...] = PREFIX_SIZES,
) -> Tensor:
    """Locally typical sampling (Meister et al. 2023, arXiv 2202.00666).

    With ``H = -Σ p log p``, tokens are ranked by ``|-log p_i - H|`` (most typical first) and the
    shortest ranked prefix whose mass reaches ``mass`` is kept (transformers: index of the first
    cumulative mass ``>= mass``), at least ``min_keep`` tokens. ``mass = 1`` rows are untouched.
    Only a ``topk`` prefix of the ranking is sorted (see the module docstring).
    """
    n, v = logits.shape
    ms = rows(mass, n, logits.device, torch.float64)
    mk = rows(min_keep, n, logits.device, torch.long).clamp(1, v)
    active = ms < 1.0
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    # The scores must be computed on the whole batch exactly as transformers does: its entropy
    # reduction is not bitwise row-independent (a lone row is reduced in parallel chunks).
    p32, shifted = _typical_scores(logits)
    todo = active.nonzero().flatten()
    thr_all = torch.full((n,), float("inf"), dtype=shifted.dtype, device=logits.device)
    for k in prefix_sizes:
        if todo.numel() == 0 or k >= v:
            break
        sh = shifted.index_select(0, todo)
        m_row = ms.index_select(0, todo).view(-1, 1)
        neg, idx = (-sh).topk(k, dim=-1, sorted=True)
        pk = p32.index_select(0, todo).gather(-1, idx).double()
        cum = pk.cumsum(-1)
        last = (cum < m_row).sum(-1)  # first position whose cumulative mass reaches `mass`
        inside = last < k
        li = last.clamp(max=k - 1).view(-1, 1)
        at_ok = cum.gather(-1, li) >= m_row + EXACT_TOL
        before_ok = (cum.gather(-1, (li - 1).clamp(min=0)) < m_row - EXACT_TOL) | (li == 0)
        ok = inside & at_ok.flatten() & before_ok.flatten()
        mkr = mk.index_select(0, todo)
        ok &= mkr <= k
        pos = torch.maximum(last, mkr - 1).clamp(max=k - 1)
        thr = (-neg).gather(-1, pos.view(-1, 1)).flatten()
        thr_all.index_copy_(0, todo[ok], thr[ok])
        todo = todo[~ok]
    if todo.numel():
        sh = shifted.index_select(0, todo)
        sorted_scores, sorted_idx = torch.sort(sh, dim=-1, descending=False)
        sorted_logits = logits.index_select(0, todo).gather(-1, sorted_idx)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        m32 = ms.index_select(0, todo).to(torch.float32).view(-1, 1)
        last = (cum < m32).sum(-1).clamp(max=v - 1)
        pos = torch.maximum(last, mk.index_select(0, todo) - 1)
        thr_all.index_copy_(0, todo, sorted_scores.gather(-1, pos.view(-1, 1)).flatten())
    remove = shifted > thr_all.view(-1, 1)
    return remove & active.view(-1, 1)


# --------------------------------------------------------------------------------------------
# adaptive rules
# --------------------------------------------------------------------------------------------


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
    _, h, _ = entropy_stats(logits)
    h = h.double()
    expo = theta.double() / h.clamp(min=1e-12)
    t = t0.double() * torch.exp(expo * torch.log(base.double()))
    t = torch.nan_to_num(t, nan=1.0)  # all -inf rows: any temperature leaves them unchanged
    return t.clamp(min=1e-6).to(logits.dtype)


def entropy_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs [N, V], entropy [N], varentropy [N])`` of ``softmax(logits)``, in nats.

    ``varentropy = Var[-log p] = Σ p (log p + H)^2``; masked (``-inf``) tokens contribute 0.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    finite = p > 0
    lp0 = torch.where(finite, logp, 0.0)
    h = -(p * lp0).sum(-1)
    dev = torch.where(finite, lp0 + h.view(-1, 1), 0.0)
    var = (p * dev.square()).sum(-1)
    return logp, h, var
