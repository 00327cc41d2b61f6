"""Pure batched sampling ops (vLLM style): one function per rule, per-row parameters.

Every ``*_mask`` function takes float32 logits ``[N, V]`` (masked tokens at ``-inf``) and per-row
parameters (a Python number, broadcast to all rows, or a tensor ``[N]``) and returns a boolean
``[N, V]`` mask of the tokens to **remove** (``True`` = removed), like the ``indices_to_remove`` of
transformers' warpers; apply it with ``logits.masked_fill(mask, -inf)``. A row whose parameter is
the neutral value (``top_p=1``, ``top_k=0``, ``min_p=0``, ``typical=1``, ``epsilon=0``,
``eta=0``, ``n_sigma=inf``) is left untouched, so one call serves a batch that mixes settings.

Exactness. For temperature, top-k, top-p, min-p, epsilon and eta the kept set equals
transformers' warper on the same tensor (differentially tested on thousands of random batches).
top-p avoids transformers' full-vocabulary sort: it gathers the blocks of tokens near the top of
the row, builds a float64 histogram of their mass over 1/64-nat buckets and sorts only the few
tokens of the bucket where the cumulative mass crosses ``top_p``. A row is decided that way only
when the cumulative mass at the boundary clears the threshold by a margin (``EXACT_TOL``,
``NORM_ERR``) larger than transformers' own float32 error there and entcal's (both measured, at
vocab 49152 and 262144, with a >4x safety factor); every other row, about 1% of real-model rows
at top_p 0.95, is recomputed with transformers' arithmetic (full sort, float32 softmax,
cumulative sum). So the sets agree not only in the common case but
also where the boundary is numerically close. typical uses the same machinery with float64
masses; see :func:`typical_mask` for how (rarely) and why it can differ from transformers'
float32 rounding.

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
    "NORM_ERR",
    "check_logits",
    "dynatemp_temperature",
    "edt_temperature",
    "entropy_stats",
    "entropy_varentropy",
    "epsilon_mask",
    "eta_mask",
    "faulty_rows",
    "keep_dead_rows",
    "min_p_mask",
    "mirostat_mask",
    "mirostat_v1_k",
    "quadratic_smoothing",
    "rows",
    "temperature",
    "top_h_mask",
    "top_k_mask",
    "top_n_sigma_mask",
    "top_p_mask",
    "typical_mask",
    "xtc_mask",
]

#: Relative margin by which a top-p decision on the histogram must clear the threshold:
#: a row is decided there only if ``|mass above the token - top_p| > EXACT_TOL * c`` at the
#: boundary, with ``c`` the ascending cumulative mass transformers computes for that token;
#: closer rows are recomputed with transformers' arithmetic. transformers' float32 ``c`` is
#: within ``6.7e-7 * c`` (+ one float32 rounding of c) of the exact value (measured on flat,
#: peaked and Zipf rows at vocab 49152 and 262144), so 5e-6 is a >5x margin.
EXACT_TOL = 5e-6

#: Bound on the relative error of entcal's own top-p tail masses ``tail / Σp`` (the mass ranked
#: after a token, summed directly, so the error is relative to the tail, not to 1): the float32
#: rounding of the softmax division (<= 1 ulp on a ratio; ``exp(l - max)`` is the same float32
#: value in both) and, for tokens outside the gathered blocks, float32 sums of 32 tokens (<= 31
#: ulp each, the sequential bound) entering both the tail and ``Σp``: 2 * 31 + 1 ulp < 4e-6.
#: A top-p row is decided without the full sort only if it clears ``top_p`` by
#: ``(EXACT_TOL + NORM_ERR) * tail``.
NORM_ERR = 4e-6

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max

#: Tokens per block of the block prefilters (top-k, top-p, typical): a reduction over blocks
#: is cheap, and only the few blocks that can matter are gathered.
BLOCK = 32


def rows(value: float | int | Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A per-row parameter as a tensor ``[n]`` on ``device`` (a number is broadcast)."""
    if isinstance(value, Tensor):
        t = value.to(device=device, dtype=dtype)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"per-row parameter has shape {tuple(t.shape)}, expected ({n},)")
        return t
    if dtype.is_floating_point and abs(value) > torch.finfo(dtype).max:
        value = math.inf if value > 0 else -math.inf  # e.g. top_n_sigma=1e300: inf (off)
    return torch.full((n,), value, device=device, dtype=dtype)


def faulty_rows(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(row maxima [N], rows holding NaN or +inf [N] bool)`` of ``[N, V]`` logits.

    Raises ``ValueError`` if the tensor is not 2-D floating point (a fault of the whole batch).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    # amax propagates NaN, so one reduction finds both NaN and +inf rows.
    mx = logits.amax(dim=-1)
    return mx, torch.isnan(mx) | (mx == float("inf"))


def keep_dead_rows(out: Tensor, row_max: Tensor) -> Tensor:
    """Rows whose input was all ``-inf`` (``row_max`` ``-inf``) come back all ``-inf``, whatever
    a decoder computed for them (a softmax over such a row is NaN): the contract every decoder
    keeps, enforced by :meth:`Decoder.__call__` and :func:`entcal.decoding.apply_rows`."""
    dead = row_max == float("-inf")
    if bool(dead.any()):
        out = out.masked_fill(dead.to(out.device)[:, None], float("-inf"))
    return out


def check_logits(logits: Tensor) -> Tensor:
    """Validate ``[N, V]`` logits and return their row maxima ``[N]``.

    Raises ``ValueError`` naming the rows that contain NaN or ``+inf`` (a softmax over them is
    undefined). Rows that are entirely ``-inf`` are allowed (every op leaves them unchanged).
    """
    mx, bad = faulty_rows(logits)
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


def _blocks(t: Tensor, fill: float) -> Tensor:
    """``t [r, V]`` as ``[r, ceil(V / BLOCK), BLOCK]`` (a view unless ``V % BLOCK``: then padded)."""
    r, v = t.shape
    pad = (-v) % BLOCK
    if pad:
        t = torch.nn.functional.pad(t, (0, pad), value=fill)
    return t.reshape(r, -1, BLOCK)


def _kth_largest(logits: Tensor, k: Tensor) -> Tensor:
    """Value of the k-th largest logit per row ``[N, 1]`` (k >= 1, clipped to V).

    For small k, ``topk`` runs on the k blocks (of ``BLOCK`` tokens) with the largest maxima
    only: any token among the row's k largest lies in such a block, and those blocks hold k
    values at least as large as the k-th, so the k largest *values* are unchanged.
    """
    v = logits.shape[-1]
    k = k.clamp(1, v)
    kmax = int(k.max())
    if kmax == 1:
        return logits.amax(dim=-1, keepdim=True)
    x = logits
    if 4 * kmax * BLOCK <= v:
        kb = _blocks(logits, _NEG_INF)
        ids = kb.amax(-1).topk(kmax, dim=-1, sorted=False).indices
        x = kb.gather(1, ids.unsqueeze(-1).expand(-1, -1, BLOCK)).flatten(1)
    if bool((k == kmax).all()):
        return x.topk(kmax, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    vals = x.topk(kmax, dim=-1, sorted=True).values
    return vals.gather(-1, (k - 1).view(-1, 1))


def _largest(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(logits, k, sorted=True)`` by way of the k blocks with the largest maxima
    (those hold the k largest values; one reduction over blocks replaces a full-row top-k)."""
    v = logits.shape[-1]
    if v % BLOCK or 4 * k * BLOCK > v:
        return torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    kb = logits.view(logits.shape[0], -1, BLOCK)
    blocks = kb.amax(-1).topk(k, dim=-1, sorted=False).indices  # [N, k]
    gathered = kb.gather(1, blocks.unsqueeze(-1).expand(-1, -1, BLOCK)).flatten(1)
    values, pos = gathered.topk(k, dim=-1, largest=True, sorted=True)
    return values, blocks.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK


def _min_keep_guard(logits: Tensor, min_keep: int | Tensor) -> Tensor:
    """``[N, V]`` bool: True for tokens *outside* the top ``min_keep`` (ties at the edge kept)."""
    n = logits.shape[0]
    k = rows(min_keep, n, logits.device, torch.long)
    return logits < _kth_largest(logits, k)


# --------------------------------------------------------------------------------------------
# temperature and the simple thresholds
# --------------------------------------------------------------------------------------------


def temperature(logits: Tensor, t: float | Tensor, row_max: Tensor | None = None) -> Tensor:
    """``logits / T`` per row (``T > 0``); bitwise equal to transformers' TemperatureLogitsWarper.

    Where that division would overflow (``|max logit| / T`` beyond the dtype's range, or ``T``
    itself not representable, e.g. ``T = 1e-300``), the row is computed as
    ``(logits - max) * min(1/T, float32 max)`` instead (in float32 at least), with tokens whose
    probability is then exactly 0 in the dtype written as ``-inf``: the same distribution as the
    exact ``softmax(x / T)``, so in the limit ``T -> 0`` the argmax (and its ties) at 0 and every
    other token at ``-inf``, never NaN or ``+inf``. All-``-inf`` rows stay all ``-inf``.
    ``row_max`` ``[N]``: the rows' maxima if the caller has them (:func:`check_logits` returns
    them), which saves the pass that finds them.

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
        top_abs = (logits.amax(-1) if row_max is None else row_max).nan_to_num(neginf=0.0).abs()
        if t >= torch.finfo(acc).tiny and float(top_abs.max()) / t <= out_max:
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
    n = logits.shape[0]
    kk = rows(k, n, logits.device, torch.long)
    mk = rows(min_keep, n, logits.device, torch.long)
    active = kk > 0
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    kk = torch.where(active, torch.maximum(kk, mk), torch.full_like(kk, logits.shape[-1]))
    remove = logits < _kth_largest(logits, kk)
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
    remove = probs < thr
    if isinstance(min_keep, int) and min_keep == 1:
        # In exact arithmetic max p >= exp(-H) > threshold; in float32 a tie at the top can
        # round H below log 2 and remove both, so the top token is kept explicitly (as the
        # transformers warper's min_tokens_to_keep guard does).
        return remove & (logits < logits.amax(-1, keepdim=True))
    return remove & _min_keep_guard(logits, min_keep)


def top_n_sigma_mask(logits: Tensor, n_sigma: float | Tensor) -> Tensor:
    """Top-nσ (Tang et al. 2024, arXiv 2411.07641): keep ``l_i >= max(l) - n * σ(l)``.

    ``σ`` is the population standard deviation of the row's *finite* logits (as in llama.cpp).
    The kept set is invariant to temperature (scaling the logits scales max and σ alike).
    ``n = inf`` rows are untouched. Statistics in float32 (Welford when no token is masked).
    """
    n = logits.shape[0]
    ns = rows(n_sigma, n, logits.device, logits.dtype).view(-1, 1)
    mx = logits.amax(-1, keepdim=True)
    if bool((logits.amin(-1) > _NEG_INF).all()):
        var, _ = torch.var_mean(logits, dim=-1, correction=0, keepdim=True)
    else:
        finite = logits > _NEG_INF
        cnt = finite.sum(-1, keepdim=True).clamp(min=1)
        x = torch.where(finite, logits, 0.0)
        mean = x.sum(-1, keepdim=True) / cnt
        var = torch.where(finite, x - mean, 0.0).square_().sum(-1, keepdim=True) / cnt
    thr = mx - ns * var.sqrt()  # -inf or nan for n=inf / all -inf rows: nothing removed
    thr = torch.nan_to_num(thr, nan=_NEG_INF, posinf=_NEG_INF)
    return logits < thr


# --------------------------------------------------------------------------------------------
# top-p and typical: block prefilter, mass histogram of the candidates, exact full sort
# --------------------------------------------------------------------------------------------
#
# Both rules rank the tokens by a key (top-p: logit, descending; typical: |-log p - H|,
# ascending) and keep the ranked prefix up to and including the first token at which the
# cumulative probability reaches the target (top-p: transformers keeps token i iff the mass
# strictly before it is < top_p, i.e. up to the first inclusive cumulative mass >= top_p;
# typical: ``last_ind`` = number of cumulative masses < mass). So one routine finds, per row,
# that boundary token; the kept set is everything ranked no worse than it (tie-closed).
#
# Sorting is what makes transformers' warpers slow (a full-vocabulary sort per row), and on a CPU
# so are fresh full-size temporaries (page faults) and int64/float64 copies of whole rows. So:
# 1. the row is cut into blocks of BLOCK tokens; a reduction gives each block's best key, and
#    only the blocks within ``depth`` nats of the row's best key are gathered (the boundary of a
#    real model's row lies a few nats deep: a few hundred blocks out of 1536);
# 2. a float64 histogram of the gathered tokens' mass over 1/64-nat buckets of the key finds the
#    bucket where the cumulative mass crosses the target; only that bucket's tokens (a handful)
#    are sorted;
# 3. rows whose crossing lies deeper than ``depth`` are redone with every block; rows within
#    the numerical margin of the target (top-p: EXACT_TOL, NORM_ERR), or whose crossing bucket
#    is crowded (> MAX_BUCKET tokens), get the exact full sort.
# When most blocks are candidates (flat rows: high entropy), gathering them token by token costs
# more than the whole row; the histogram is then built by dense passes over every token (bucket
# index, float64 mass, one scatter-add) and only the crossing bucket's tokens are gathered.

#: Histogram buckets per nat of key distance from the row's best token.
BUCKETS_PER_NAT = 64

#: Keys deeper than this many nats below the best go to an overflow bucket that decides nothing
#: (their total mass is below ``V * e^-48``).
MAX_DEPTH = 48.0

#: First candidate depth (nats) for top-p and typical: covers the boundary of >95% of real-model
#: rows at top_p 0.95 / typical 0.9 (SmolLM2-135M on the embedded corpus); deeper rows use every
#: block.
TOP_P_DEPTH = 9.0
TYPICAL_DEPTH = 5.0

#: A crossing bucket with more tokens than this (near-uniform rows) is left to the exact sort.
MAX_BUCKET = 4096


def _crossing(
    cum: Tensor,
    target: Tensor,
    before0: Tensor,
    tol: float = EXACT_TOL,
) -> tuple[Tensor, Tensor, Tensor]:
    """First position ``i`` with ``cum[i] >= target`` in each row of an inclusive cumsum.

    ``before0`` is the mass before position 0. Returns ``(i, inside, safe)``: ``inside`` if such a
    position exists; ``safe`` if ``cum[i]`` and the mass before ``i`` clear the target by more
    than ``tol * (1 - mass)`` (transformers' error on the complementary, ascending cumulative
    mass ``1 - mass`` is proportional to it, and so is entcal's, see ``NORM_ERR``) plus 1e-15.
    """
    k = cum.shape[-1]
    t = target.view(-1, 1)
    i = (cum < t).sum(-1)
    inside = i < k
    ii = i.clamp(max=k - 1).view(-1, 1)
    at = cum.gather(-1, ii).flatten()
    prev = torch.where(
        ii.flatten() > 0, cum.gather(-1, (ii - 1).clamp(min=0)).flatten(), before0.flatten()
    )
    safe = (at - target > tol * (1.0 - at).clamp(min=0.0) + 1e-15) & (
        target - prev > tol * (1.0 - prev).clamp(min=0.0) + 1e-15
    )
    return i, inside, safe


def _block_boundary(
    key: Tensor,
    weight: Tensor,
    best: Tensor,
    target: Tensor,
    largest: bool,
    depth: float,
    normalize: bool,
    tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Boundary key per row of the rule "rank by ``key``, keep up to cumulative ``target``".

    ``key``, ``weight`` ``[r, V]`` float32 (weights: probabilities, masked tokens 0); ``best``
    ``[r]`` the reference the key distance is measured from (top-p: the row max; typical: 0).
    Candidates are the tokens within ``depth`` of ``best`` (found block-wise). With
    ``normalize`` (top-p), the cumulative mass of a token is ``1 - tail / Σp``, with the tail
    (the mass ranked after it) summed directly: float64 over candidates, float64 over the
    gathered blocks' other tokens, float32 block sums elsewhere. Its error is then relative to
    the tail (``NORM_ERR``), not to 1, which matters at high ``top_p``; dividing by ``Σp`` also
    cancels the softmax's own normalizer. A row is decided only if it clears the target by
    ``tol * tail`` (``tol > 0``: transformers' and entcal's errors). Returns
    ``(threshold, ok, deeper)``: rows with ``ok`` False are undecided, those with ``deeper``
    because the crossing lies deeper than ``depth``, the others because their crossing bucket
    is crowded or the row is too close to call.
    """
    r, v = key.shape
    dev = key.device
    f64 = torch.float64
    worst = _NEG_INF if largest else float("inf")
    kb = _blocks(key, worst)
    ref = best.view(-1, 1)
    cap = min(depth, MAX_DEPTH)
    nbk = int(cap * BUCKETS_PER_NAT) + 1
    block_dist = (ref - kb.amax(-1)) if largest else (kb.amin(-1) - ref)
    near = block_dist <= cap
    if 2 * int(near.sum()) > near.numel():
        # Flat rows: most blocks are candidates, so gathering them token by token (nonzero,
        # index_select over nearly the whole batch) costs more than dense passes over it. Every
        # token enters the histogram; those deeper than MAX_DEPTH (and masked ones) share the
        # last bucket, which decides only if it is small enough to sort.
        nbk = int(MAX_DEPTH * BUCKETS_PER_NAT) + 1
        dist = ((ref - key) if largest else (key - ref)).clamp(max=MAX_DEPTH)
        bucket = (dist * BUCKETS_PER_NAT).long().clamp_(max=nbk - 1)
        w = weight.double()
        mass = torch.zeros(r, nbk, dtype=f64, device=dev).scatter_add_(1, bucket, w)
        raw_cum = mass.cumsum(-1)
        base = raw_cum[:, -1:]
        rows_in = None
    else:
        rb, bi = near.nonzero(as_tuple=True)  # rows ascending
        kg = kb[rb, bi]  # [n_blocks, BLOCK]
        # the candidate tokens (rows ascending); the same test as the blocks', on the keys
        ref_g = ref.index_select(0, rb)
        cand = (ref_g - kg <= cap) if largest else (kg - ref_g <= cap)
        gi, gj = cand.nonzero(as_tuple=True)
        rows_t = rb.index_select(0, gi)
        cols_t = bi.index_select(0, gi) * BLOCK + gj
        k_t = kg[gi, gj]
        ref_t = best.index_select(0, rows_t)
        d_t = (ref_t - k_t) if largest else (k_t - ref_t)
        w_t = weight.reshape(-1).index_select(0, rows_t * v + cols_t).double()
        # float64 histogram over 1/64-nat buckets of the distance; sort the crossing bucket
        bucket_t = (d_t * BUCKETS_PER_NAT).long()
        mass = torch.zeros(r * nbk, dtype=f64, device=dev)
        mass.scatter_add_(0, rows_t * nbk + bucket_t, w_t)
        raw_cum = mass.view(r, nbk).cumsum(-1)
        base = raw_cum[:, -1:]
        if normalize:
            wb = _blocks(weight, 0.0)
            block_sum = wb.sum(-1)
            block_sum[rb, bi] = 0.0
            rest = block_sum.double().sum(-1)  # blocks not gathered (float32 sums of 32)
            rest.index_add_(0, rb, torch.where(cand, 0.0, wb[rb, bi]).double().sum(-1))
            base = (rest + raw_cum[:, -1]).view(-1, 1)
        rows_in = rows_t
    cum = raw_cum
    if normalize:
        total = base.clamp(min=1e-300)

        def share(c: Tensor) -> Tensor:  # 1 - tail / Σp, the tail summed directly
            return 1.0 - (base - c) / total

        cum = share(raw_cum)
    bstar = (cum < target.view(-1, 1)).sum(-1)
    reached = bstar < nbk
    bstar = bstar.clamp(max=nbk - 1)
    raw_before = torch.where(
        bstar.view(-1, 1) > 0,
        raw_cum.gather(-1, (bstar - 1).clamp(min=0).view(-1, 1)),
        torch.zeros((), dtype=f64, device=dev),
    )  # [r, 1]
    before = (share(raw_before) if normalize else raw_before).flatten()
    # the tokens of each row's crossing bucket: rows ascending, their keys and masses
    if rows_in is None:
        rows_c, cols_c = (bucket == bstar.view(-1, 1)).nonzero(as_tuple=True)
        k_c, w_c = key[rows_c, cols_c], w[rows_c, cols_c]
    else:
        (sel,) = (bucket_t == bstar.index_select(0, rows_in)).nonzero(as_tuple=True)
        rows_c, k_c, w_c = rows_in[sel], k_t[sel], w_t[sel]
    count = torch.bincount(rows_c, minlength=r)
    ok = reached & (count > 0) & (count <= MAX_BUCKET)
    kc = max(1, int(count[ok].max())) if bool(ok.any()) else 1
    pos = torch.arange(rows_c.numel(), device=dev) - (count.cumsum(0) - count).index_select(
        0, rows_c
    )
    keep = ok.index_select(0, rows_c)
    rows_c, pos, k_c, w_c = rows_c[keep], pos[keep], k_c[keep], w_c[keep]
    pad_key = torch.full((r, kc), worst, dtype=key.dtype, device=dev)
    pad_key[rows_c, pos] = k_c
    pad_w = torch.zeros((r, kc), dtype=f64, device=dev)
    pad_w[rows_c, pos] = w_c
    vals, order = pad_key.sort(dim=-1, descending=largest)
    cum_in = raw_before + pad_w.gather(-1, order).cumsum(-1)
    if normalize:
        cum_in = share(cum_in)
    i, inside, safe = _crossing(cum_in, target, before, tol)
    ok &= inside & (i < count)
    if tol > 0:
        ok &= safe
    return vals.gather(-1, i.clamp(max=kc - 1).view(-1, 1)).flatten(), ok, ~reached


def _decide(
    key: Tensor,
    weight: Tensor,
    best: Tensor,
    target: Tensor,
    largest: bool,
    depth: float,
    normalize: bool,
    tol: float,
) -> tuple[Tensor, Tensor]:
    """:func:`_block_boundary` at ``depth``, then deeper for the rows whose crossing lies
    beyond it (every block at the last step)."""
    thr, ok, deeper = _block_boundary(key, weight, best, target, largest, depth, normalize, tol)
    while depth < MAX_DEPTH and bool(deeper.any()):
        depth = min(2 * depth, MAX_DEPTH)
        sub = deeper.nonzero().flatten()
        thr2, ok2, deeper2 = _block_boundary(
            key.index_select(0, sub),
            weight.index_select(0, sub),
            best.index_select(0, sub),
            target.index_select(0, sub),
            largest,
            depth,
            normalize,
            tol,
        )
        thr.index_copy_(0, sub, torch.where(ok2, thr2, thr.index_select(0, sub)))
        ok.index_copy_(0, sub, ok2)
        deeper = torch.zeros_like(deeper).index_copy_(0, sub, deeper2)
    return thr, ok


def _top_p_exact(x: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' TopP arithmetic on rows ``x``: ``(number of tokens it keeps, the smallest
    kept logit)`` per row (no min_keep)."""
    sorted_logits = torch.sort(x, dim=-1, descending=False).values
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p).to(torch.float32).view(-1, 1)
    dropped = remove.sum(-1).clamp(max=x.shape[-1] - 1)
    return x.shape[-1] - dropped, sorted_logits.gather(-1, dropped.view(-1, 1)).flatten()


def top_p_mask(
    logits: Tensor,
    top_p: float | Tensor,
    min_keep: int | Tensor = 1,
    depth: float | None = None,
    exact: bool = True,
) -> Tensor:
    """Top-p / nucleus sampling (Holtzman et al. 2020, arXiv 1904.09751).

    Keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (at least
    ``min_keep``). transformers' rule, "remove the tokens whose ascending cumulative mass is
    ``<= 1 - top_p``", is the same as keeping token ``i`` (in descending order) iff the mass
    strictly above it is ``< top_p``. ``top_p = 1`` rows are untouched (transformers' warper is
    not used at 1; if called, it would also drop tokens whose float32 probability is 0).

    No full-vocabulary sort: blocks within ``depth`` nats of the row max (default
    ``TOP_P_DEPTH``; ``math.inf``: every block), a mass histogram of their tokens, a sort of one
    bucket (see above); the exact full-sort arithmetic only for rows within ``EXACT_TOL`` of the
    threshold. ``depth=0`` sends every row to that exact path. ``exact=False`` decides every
    row from entcal's float64 masses alone (no margin, no transformers fallback): the kept set
    is then the exact float64 nucleus of ``softmax(logits)`` up to a relative error of about
    ``NORM_ERR`` of the tail mass, which is what a caller that needs "the tokens covering
    ``top_p``" rather than transformers' bit-for-bit set wants (e.g. ``top_p = 1 - 1e-4``, where
    the boundary tokens' masses are far below float32 resolution of the cumulative sum).

    Example::

        >>> x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])   # p = 0.64, 0.24, 0.09, 0.03
        >>> top_p_mask(x, 0.8)
        tensor([[False, False,  True,  True]])
    """
    n, v = logits.shape
    depth = TOP_P_DEPTH if depth is None else depth
    tp = rows(top_p, n, logits.device, torch.float64)
    mk = rows(min_keep, n, logits.device, torch.long).clamp(1, v)
    row_max = logits.amax(-1)
    # all -inf rows: nothing to keep or remove
    active = (tp < 1.0) & (row_max > _NEG_INF)
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    todo = active.nonzero().flatten()
    if todo.numel() < n:
        x, m = logits.index_select(0, todo), row_max.index_select(0, todo)
    else:
        x, m = logits, row_max
    target = tp.index_select(0, todo)
    if depth > 0:
        tol = EXACT_TOL + NORM_ERR if exact else 0.0
        thr, ok = _decide(x, torch.softmax(x, dim=-1), m, target, True, depth, True, tol)
        thr = torch.where(ok, thr, _NEG_INF)
        pending = ~ok
    else:
        thr = torch.full_like(m, _NEG_INF)
        pending = torch.ones_like(m, dtype=torch.bool)
    if bool(pending.any()):  # transformers' arithmetic
        sub = pending.nonzero().flatten()
        _, smallest_kept = _top_p_exact(x.index_select(0, sub), target.index_select(0, sub))
        thr.index_copy_(0, sub, smallest_kept)
    # min_tokens_to_keep: the threshold is at most the min_keep-th largest logit
    mkt = mk.index_select(0, todo)
    if bool((mkt > 1).any()):
        thr = torch.minimum(thr, _kth_largest(x, mkt).flatten())
    remove = x < thr.view(-1, 1)
    if todo.numel() == n:
        return remove
    out = torch.zeros_like(logits, dtype=torch.bool)
    out.index_copy_(0, todo, remove)
    return out


def _typical_scores(logits: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' Typical arithmetic: probabilities and ``|-log p - H|`` (float32).

    ``|(-a) - H|`` is computed as ``|a + H|``: IEEE rounding is symmetric, so the two are bitwise
    equal, and the rewrite saves a pass.
    """
    normalized = torch.nn.functional.log_softmax(logits, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted = normalized.add_(ent).abs_()
    return p, shifted


def typical_mask(
    logits: Tensor,
    mass: float | Tensor,
    min_keep: int | Tensor = 1,
    depth: float | None = None,
    reference: bool = False,
) -> Tensor:
    """Locally typical sampling (Meister et al. 2023, arXiv 2202.00666).

    With ``H = -Σ p log p``, tokens are ranked by ``|-log p_i - H|`` (most typical first) and the
    ranked prefix up to the first position whose cumulative mass reaches ``mass`` is kept
    (transformers' ``last_ind``), at least ``min_keep`` tokens. ``mass = 1`` rows are untouched.

    The scores ``p`` and ``|-log p - H|`` are transformers' own float32 values (computed on the
    whole batch with its arithmetic); the cumulative mass is summed in float64 over the blocks
    within ``depth`` nats of score 0 (default ``TYPICAL_DEPTH``), never a full sort.
    transformers instead re-normalizes the sorted logits with a float32 softmax whose sum is off
    by up to ~1e-5 (vocab 49152) to ~1e-4 (262144), so in the rare row whose boundary lies that
    close to ``mass`` the two sets differ by the boundary token(s), and entcal's is the exact
    one. ``reference=True`` reproduces transformers' arithmetic bit for bit (a full sort; for
    differential tests); ``depth=0`` uses the full sort with float64 masses.

    Example::

        >>> x = torch.tensor([[3.0, 1.0, 1.0, 0.0, -2.0]])   # H = 0.83 nats
        >>> typical_mask(x, 0.5)   # token 0 (-log p = 0.28) is closest to H and holds 0.75
        tensor([[False,  True,  True,  True,  True]])
        >>> typical_mask(x, 0.9)   # then the tied pair at -log p = 2.28
        tensor([[False, False, False,  True,  True]])
    """
    n, v = logits.shape
    depth = TYPICAL_DEPTH if depth is None else depth
    ms = rows(mass, n, logits.device, torch.float64)
    mk = rows(min_keep, n, logits.device, torch.long).clamp(1, v)
    active = (ms < 1.0) & (logits.amax(-1) > _NEG_INF)
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    p32, shifted = _typical_scores(logits)
    todo = active.nonzero().flatten()
    if todo.numel() < n:
        p32, shifted = p32.index_select(0, todo), shifted.index_select(0, todo)
    target = ms.index_select(0, todo)
    r = todo.numel()
    if depth > 0 and not reference:
        zero = torch.zeros(r, dtype=shifted.dtype, device=logits.device)
        thr, ok = _decide(shifted, p32, zero, target, False, depth, False, 0.0)
        thr = torch.where(ok, thr, float("inf"))
        pending = ~ok
    else:
        thr = torch.full((r,), float("inf"), dtype=shifted.dtype, device=logits.device)
        pending = torch.ones(r, dtype=torch.bool, device=logits.device)
    if bool(pending.any()):
        sub = pending.nonzero().flatten()
        ss = shifted.index_select(0, sub)
        sorted_scores, sorted_idx = torch.sort(ss, dim=-1, descending=False)
        if reference:
            lg = logits.index_select(0, todo.index_select(0, sub)).gather(-1, sorted_idx)
            cum = lg.softmax(dim=-1).cumsum(dim=-1)
            tgt = target.index_select(0, sub).to(torch.float32).view(-1, 1)
        else:
            cum = p32.index_select(0, sub).gather(-1, sorted_idx).double().cumsum(-1)
            tgt = target.index_select(0, sub).view(-1, 1)
        last = (cum < tgt).sum(-1).clamp(max=v - 1)
        thr.index_copy_(0, sub, sorted_scores.gather(-1, last.view(-1, 1)).flatten())
    mkt = mk.index_select(0, todo)
    if bool((mkt > 1).any()):
        kth = shifted.topk(int(mkt.max()), dim=-1, largest=False, sorted=True).values
        thr = torch.maximum(thr, kth.gather(-1, (mkt - 1).view(-1, 1)).flatten())
    remove = shifted > thr.view(-1, 1)
    if r == n:
        return remove
    out = torch.zeros_like(logits, dtype=torch.bool)
    out.index_copy_(0, todo, remove)
    return out


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
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).nansum(-1).double()  # masked tokens: 0 * -inf = nan, skipped
    expo = theta.double() / h.clamp(min=1e-12)
    t = t0.double() * torch.exp(expo * torch.log(base.double()))
    t = torch.nan_to_num(t, nan=1.0)  # all -inf rows: any temperature leaves them unchanged
    return t.clamp(min=1e-6, max=torch.finfo(logits.dtype).max).to(logits.dtype)


def entropy_varentropy(logprobs: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Entropy and varentropy (nats) of each row of normalized log-probabilities ``[N, V]``.

    ``H = −Σ p log p`` and ``varentropy = Var[−log p] = Σ p (log p + H)²`` (centered, so it never
    goes negative by cancellation); tokens with ``p = 0`` (``-inf``, or underflow) contribute 0.
    Returns ``(entropy [N], varentropy [N])``. Peak memory is three ``[N, V]`` temporaries, two
    with ``overwrite=True`` (``logprobs`` is then used as scratch space and destroyed). This is
    the one definition entcal uses: sampling statistics, teacher-forced scoring and the
    calibrators all call it.
    """
    p = logprobs.exp()
    lp0 = logprobs if overwrite else logprobs.clone()
    lp0.masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0
    h = -(p * lp0).sum(-1)
    dev2 = lp0.add_(h.unsqueeze(-1)).square_()  # where p = 0 the product below is 0 anyway
    var = p.mul_(dev2).sum(-1)
    return h, var


def entropy_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs [N, V], entropy [N], varentropy [N])`` of ``softmax(logits)``, in nats
    (see :func:`entropy_varentropy`)."""
    logp = torch.log_softmax(logits, dim=-1)
    h, var = entropy_varentropy(logp)
    return logp, h, var


# --------------------------------------------------------------------------------------------
# samplers from the serving ecosystem (top-H, quadratic smoothing, dynamic temperature, XTC,
# mirostat v1)
# --------------------------------------------------------------------------------------------

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
    (transformers ignores it as well).
    """
    n, v = logits.shape
    th = rows(top_h, n, logits.device, logits.dtype)
    active = th > 0
    if not bool(active.any()):
        return torch.zeros_like(logits, dtype=torch.bool)
    top, idx = _largest(logits, min(TOP_H_CANDIDATES, v))
    # torch.distributions.Categorical(logits=top): normalized logits, softmax, clamped entropy
    norm = top - top.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    entropy = -(norm.clamp(min=torch.finfo(norm.dtype).min) * probs).sum(-1)
    cumulative = torch.cumsum(-probs * torch.log(probs), dim=-1)
    keep = cumulative <= (entropy * th).unsqueeze(-1)
    keep[:, 0] = True
    remove = torch.ones_like(logits, dtype=torch.bool).scatter_(1, idx, ~keep)
    return remove if bool(active.all()) else remove & active.view(-1, 1)


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
    a = ((c - 3.0) / 2.0).clamp(-_F32_MAX, _F32_MAX).to(dtype)
    b = ((c - 1.0) / 2.0).clamp(max=_F32_MAX).to(dtype)
    shape = d.square().mul_(d * b + a).mul_(f.clamp(max=_F32_MAX).to(dtype))
    out = shape.add_(top).nan_to_num_(nan=_NEG_INF).clamp_(max=torch.finfo(dtype).max)
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
    left = (logits <= lowest).sum(-1) - (logits == _NEG_INF).sum(-1)
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
    top = _largest(logits, width)[0].double()
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
