"""Top-p (nucleus) and locally typical sampling: block prefilter, mass histogram of the
candidates, exact full sort only where the boundary is numerically close."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from entcal.decoding.ops.common import BLOCK, NEG_INF, blocks, kth_largest, rows, sorted_rows

#: Relative margin by which a top-p decision without the full sort must clear the threshold:
#: a row is decided that way only if ``|mass above the token - top_p| > EXACT_TOL * c`` at the
#: boundary (plus ``NORM_ERR``, entcal's own error), with ``c`` the ascending cumulative mass
#: transformers computes for that token; closer rows are recomputed with transformers'
#: arithmetic. transformers' float32 ``c`` is within ``6.7e-7 * c`` of the exact value
#: (measured on flat, peaked, Zipf, heavy-tailed and Gaussian rows of mean entropy 1 to 10
#: nats at vocab 49152 and 262144), so 1.5e-6 is a 2.2x margin; with ``NORM_ERR`` the margin
#: is 4.7x the largest difference measured directly between entcal's tail share and
#: transformers' ``c`` (4.9e-7 * c, 6600 boundary positions of 552 such rows, ties excluded).
EXACT_TOL = 1.5e-6

#: Bound on the relative error of entcal's own top-p tail masses ``tail / Σp`` (the mass ranked
#: after a token, summed directly, so the error is relative to the tail, not to 1). The shares
#: are ratios of float32 terms: ``softmax`` values (rows decided from the histogram) or
#: ``exp(l - max)`` (the sampled bracket, which skips the division: its ``torch.exp`` differs
#: from softmax's internal exp by <= ~1 ulp, measured 1.04, and enters both the tail and the
#: total, <= 2 ulp; the division's rounding, where there is one, is <= 2 ulp relative too). Add
#: the float32 sums of ``BLOCK`` = 32 tokens (torch reduces 32 contiguous floats as a tree of
#: depth 5 on CPU: <= 5 ulp each, measured <= 4.8) entering both the tail and the total;
#: everything beyond a block is summed in float64: 2 * 5 + 2 ulp = 7.2e-7 < 8e-7.
#: A top-p row is decided without the full sort only if it clears ``top_p`` by
#: ``(EXACT_TOL + NORM_ERR) * tail``.
NORM_ERR = 8e-7

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
# more than the whole row. top-p then brackets the boundary from a strided sample instead
# (:func:`_bracket_boundary`: a sort of 2048 sampled tokens, one exact mass pass anchoring the
# estimate, the bracket's few thousand tokens gathered), O(V) whatever the entropy; typical (and
# a top-p row the bracket misses) builds the histogram by dense passes over every token (bucket
# index, float64 mass, one scatter-add) and gathers only the crossing bucket's tokens.

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
    tol: float | Tensor = EXACT_TOL,
) -> tuple[Tensor, Tensor, Tensor]:
    """First position ``i`` with ``cum[i] >= target`` in each row of an inclusive cumsum.

    ``before0`` is the mass before position 0. Returns ``(i, inside, safe)``: ``inside`` if such a
    position exists; ``safe`` if ``cum[i]`` and the mass before ``i`` clear the target by more
    than ``tol * (1 - mass)`` (transformers' error on the complementary, ascending cumulative
    mass ``1 - mass`` is proportional to it, and so is entcal's, see ``NORM_ERR``) plus 1e-15;
    ``tol`` is a number or one per row ``[r]``.
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


def _crossing_bucket(cum: Tensor, raw_cum: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first histogram bucket whose cumulative share ``cum`` ``[r, nbk]`` reaches
    ``target``: ``(bucket [r], reached [r], raw cumulative mass before it [r, 1])``."""
    nbk = cum.shape[-1]
    bstar = (cum < target.view(-1, 1)).sum(-1)
    reached = bstar < nbk
    bstar = bstar.clamp(max=nbk - 1)
    raw_before = torch.where(
        bstar.view(-1, 1) > 0,
        raw_cum.gather(-1, (bstar - 1).clamp(min=0).view(-1, 1)),
        torch.zeros((), dtype=raw_cum.dtype, device=raw_cum.device),
    )
    return bstar, reached, raw_before


def _sort_bucket(
    rows_c: Tensor,
    k_c: Tensor,
    w_c: Tensor,
    usable: Tensor,
    raw_before: Tensor,
    share: Callable[[Tensor], Tensor] | None,
    target: Tensor,
    tol: float | Tensor,
    largest: bool,
    max_count: int | None,
) -> tuple[Tensor, Tensor]:
    """The boundary inside each row's crossing bucket.

    Its tokens (``rows_c`` ascending, keys ``k_c``, float64 masses ``w_c``) are padded to one
    ``[r, kc]`` tensor and sorted; their cumulative mass starts from ``raw_before`` ``[r, 1]``
    and is mapped by ``share`` (top-p: ``1 - tail / Σp``). Returns ``(boundary key [r], ok
    [r])``: ``ok`` for ``usable`` rows whose bucket holds 1 to ``max_count`` tokens and whose
    crossing is one of them, clearing the target by ``tol`` (see :func:`_crossing`).
    """
    r, dev = usable.shape[0], usable.device
    count = torch.bincount(rows_c, minlength=r)
    ok = usable & (count > 0)
    if max_count is not None:
        ok &= count <= max_count
    kc = max(1, int(count[ok].max())) if bool(ok.any()) else 1
    pos = torch.arange(rows_c.numel(), device=dev) - (count.cumsum(0) - count).index_select(
        0, rows_c
    )
    keep = ok.index_select(0, rows_c)
    rows_c, pos, k_c, w_c = rows_c[keep], pos[keep], k_c[keep], w_c[keep]
    worst = NEG_INF if largest else float("inf")
    pad_key = torch.full((r, kc), worst, dtype=k_c.dtype, device=dev)
    pad_key[rows_c, pos] = k_c
    pad_w = torch.zeros((r, kc), dtype=torch.float64, device=dev)
    pad_w[rows_c, pos] = w_c
    vals, order = pad_key.sort(dim=-1, descending=largest)
    cum_in = raw_before + pad_w.gather(-1, order).cumsum(-1)
    before = raw_before
    if share is not None:
        cum_in, before = share(cum_in), share(raw_before)
    i, inside, safe = _crossing(cum_in, target, before.flatten(), tol)
    ok &= inside & (i < count)
    if isinstance(tol, Tensor) or tol > 0:
        ok &= safe
    return vals.gather(-1, i.clamp(max=kc - 1).view(-1, 1)).flatten(), ok


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
    worst = NEG_INF if largest else float("inf")
    kb = blocks(key, worst)
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
            wb = blocks(weight, 0.0)
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
    bstar, reached, raw_before = _crossing_bucket(cum, raw_cum, target)
    # the tokens of each row's crossing bucket: rows ascending, their keys and masses
    if rows_in is None:
        rows_c, cols_c = (bucket == bstar.view(-1, 1)).nonzero(as_tuple=True)
        k_c, w_c = key[rows_c, cols_c], w[rows_c, cols_c]
    else:
        (sel,) = (bucket_t == bstar.index_select(0, rows_in)).nonzero(as_tuple=True)
        rows_c, k_c, w_c = rows_in[sel], k_t[sel], w_t[sel]
    thr, ok = _sort_bucket(
        rows_c, k_c, w_c, reached, raw_before, share if normalize else None, target, tol,
        largest, MAX_BUCKET,
    )  # fmt: skip
    return thr, ok, ~reached


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


#: Tokens in the strided sample that locates a flat row's top-p boundary (fastest of 2048, 4096,
#: 8192 at vocab 49152 and 262144: the bracket widens as 1 / sqrt(SAMPLE), the sample sort less).
SAMPLE = 2048

#: Half-width of the sampled bracket around the boundary, in standard errors of the sample's
#: estimate of the cumulative mass (a row whose boundary falls outside it is found to be so,
#: exactly, and redone on the histogram path: about 1 row in 10^8 at 6 standard errors).
BRACKET_SE = 6.0

#: The sampled bracket is used when the flat rows hold at least this many tokens (16 rows of
#: vocab 262144, 86 of 49152); below it the bracket's fixed cost of a few dozen small ops loses
#: to the histogram of every candidate (entropy sweep: batch 1 and 32 at vocab 49152).
BRACKET_MIN_TOKENS = 1 << 22

#: Equal-width key buckets over a bracket's tokens; the crossing bucket's few tokens are sorted.
BRACKET_BUCKETS = 1024


def _flat_rows(key: Tensor, best: Tensor, depth: float) -> Tensor:
    """``[r]`` bool: rows with more than half their blocks within ``depth`` of ``best`` (their
    boundary lies among tens of thousands of tokens: the sampled bracket finds it for less than
    the histogram of every candidate)."""
    near = (best.view(-1, 1) - blocks(key, NEG_INF).amax(-1)) <= min(depth, MAX_DEPTH)
    return 2 * near.sum(-1) > near.shape[-1]


def _bracket_boundary(
    key: Tensor, best: Tensor, target: Tensor, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-p boundary of flat rows in O(V): a strided sample of ``SAMPLE`` tokens, sorted,
    estimates the key where the cumulative mass crosses ``target``; a bracket of ``BRACKET_SE``
    standard errors around it is checked exactly on the whole row, and only its tokens are
    bucketed (``BRACKET_BUCKETS`` equal-width key buckets) and the crossing bucket sorted.

    ``key`` ``[r, V]`` logits, ``best`` ``[r]`` their row maxima. The masses are the softmax's
    numerators ``exp(key - best)`` in float32, never divided: as in :func:`_block_boundary` the
    cumulative mass of a token is ``1 - tail / Σ`` with the tail summed directly (float32 sums
    of ``BLOCK`` tokens, float64 across blocks and within the bracket), a ratio in which the
    normalizer cancels. (Their error against exact arithmetic is the exp's, <= 1 ulp, where the
    softmax's division rounding was: ``NORM_ERR`` holds.) One float32 ``[r, V]`` buffer serves
    the whole pass, masked in place once the total is read: on a CPU a fresh full-size
    temporary costs more in page faults than its arithmetic. Returns ``(threshold, ok,
    missed)``: ``missed`` rows' boundary lies outside the bracket, the other rows with ``ok``
    False are too close to call (``tol``).
    """
    r, v = key.shape
    dev = key.device
    f64 = torch.float64
    t = target.view(-1, 1)
    ref = best.view(-1, 1).float()
    # 1. the sample: every stride-th token, sorted (descending); its cumulative mass
    stride = max(1, v // SAMPLE)
    vals = key[:, ::stride].sort(dim=-1, descending=True).values
    ws = torch.sub(vals.float(), ref).exp_().double()
    n = vals.shape[-1]
    cw = ws.cumsum(-1)
    cw2 = (ws * ws).cumsum(-1)
    w_all = cw[:, -1:].clamp(min=1e-300)
    # 2. anchor the sample at its estimated crossing j: the exact share E of the tokens at or
    # above key j (block sums of the float32 exp(key - max), float64 across: the only full-row
    # mass pass), then ratio estimates within each stratum (above j, below j), so that the
    # heavy tokens' sampling noise (a few tokens can hold a tenth of the mass) cancels
    j = (cw / w_all < t).sum(-1, keepdim=True).clamp(max=n - 1)
    anchor = vals.gather(-1, j)
    mass = torch.sub(key if key.dtype == torch.float32 else key.float(), ref).exp_()
    total = blocks(mass, 0.0).sum(-1).double().sum(-1, keepdim=True).clamp(min=1e-300)
    inb = key >= anchor  # (the bool buffer the bracket's test reuses)
    # in place (where with out= runs faster than masked_fill_ on a CPU)
    torch.where(inb, torch.zeros((), dtype=mass.dtype), mass, out=mass)
    tail_anchor = blocks(mass, 0.0).sum(-1).double().sum(-1, keepdim=True)
    del mass
    e = 1.0 - tail_anchor / total
    cj, c2j = cw.gather(-1, j), cw2.gather(-1, j)
    lower = torch.arange(n, device=dev).view(1, -1) > j
    # share of the stratum's sampled mass between position k and j, and its standard error
    m_low = (w_all - cj).clamp(min=1e-300)
    f_low = (cw - cj) / m_low
    v_low = ((cw2 - c2j) * (1 - f_low) ** 2 + (cw2[:, -1:] - cw2) * f_low**2) / m_low**2
    m_up = cj.clamp(min=1e-300)
    f_up = (cj - cw) / m_up
    v_up = ((c2j - cw2) * (1 - f_up) ** 2 + cw2 * f_up**2) / m_up**2
    est = torch.where(lower, e + f_low * (1.0 - e), e - f_up * e)
    spread = torch.where(lower, v_low.clamp(min=0).sqrt() * (1.0 - e), v_up.clamp(min=0).sqrt() * e)
    half = BRACKET_SE * spread + ws / w_all  # plus one sampled token's share (the step)
    j_hi = (est + half < t).sum(-1, keepdim=True)  # sample tokens surely above the boundary
    j_lo = (est - half < t).sum(-1, keepdim=True)  # ... and the first one surely below it
    hi = torch.where(j_hi > 0, vals.gather(-1, (j_hi - 1).clamp(min=0)), float("inf"))
    # (below the lowest float32: -inf tokens count as below the bracket, with their mass of 0)
    lo = torch.where(j_lo < n, vals.gather(-1, j_lo.clamp(max=n - 1)), -torch.finfo(key.dtype).max)
    # the anchor is the bracket's end on the side its exact share puts it (so the tail below
    # the bracket follows from the anchor's)
    lo = torch.where(e >= t, anchor, lo)
    hi = torch.where(e < t, anchor, hi)
    # 3. the bracket's tokens; the tail below it is the anchor's minus theirs below the anchor
    torch.ge(key, lo, out=inb)
    inb &= key <= hi
    rows_b, cols_b = inb.nonzero(as_tuple=True)
    del inb
    k_b = key[rows_b, cols_b]
    w_b = torch.sub(k_b.float(), ref.flatten().index_select(0, rows_b)).exp_().double()
    under = torch.zeros(r, dtype=f64, device=dev).index_add_(
        0, rows_b, torch.where(k_b < anchor.flatten().index_select(0, rows_b), w_b, 0.0)
    )
    tail = tail_anchor.flatten() - under
    # tail_anchor's block-sum error (NORM_ERR) is relative to it, not to the smaller tail left
    # after subtracting: widen the margin of those rows by the ratio
    if tol > 0:
        tol = tol + NORM_ERR * (tail_anchor.flatten() / tail.clamp(min=1e-300) - 1.0).clamp(min=0)
    total = total.flatten()
    # 4. equal-width buckets over the bracket's keys (bucket 0 holds the highest)
    k_f = k_b.float()  # (bucket arithmetic in float32 whatever the logits' dtype)
    top = torch.full((r,), NEG_INF, device=dev).scatter_reduce(0, rows_b, k_f, "amax")
    bot = torch.full((r,), float("inf"), device=dev).scatter_reduce(0, rows_b, k_f, "amin")
    width = (top - bot).clamp(min=1e-30)
    frac = (top.index_select(0, rows_b) - k_f) / width.index_select(0, rows_b)
    bucket = (frac * BRACKET_BUCKETS).long().clamp_(0, BRACKET_BUCKETS - 1)
    nbk = BRACKET_BUCKETS
    mass = torch.zeros(r * nbk, dtype=f64, device=dev)
    mass.scatter_add_(0, rows_b * nbk + bucket, w_b)
    cum_b = mass.view(r, nbk).cumsum(-1)  # bracket mass down to each bucket, inclusive
    in_bracket = cum_b[:, -1:]
    denom = total.clamp(min=1e-300).view(-1, 1)

    def cum_share(c: Tensor) -> Tensor:  # 1 - (mass ranked after) / Σp
        return 1.0 - (tail.view(-1, 1) + in_bracket - c) / denom

    bstar, reached, c_before = _crossing_bucket(cum_share(cum_b), cum_b, target)
    before_bracket = cum_share(torch.zeros_like(c_before)).flatten()
    missed = ~reached | (before_bracket >= target)
    # 5. the crossing bucket's tokens, sorted
    (sel,) = (bucket == bstar.index_select(0, rows_b)).nonzero(as_tuple=True)
    thr, ok = _sort_bucket(
        rows_b[sel], k_b[sel], w_b[sel], ~missed, c_before, cum_share, target, tol, True, None
    )
    return thr, ok, missed


def _top_p_boundary(
    x: Tensor, row_max: Tensor, target: Tensor, depth: float, tol: float
) -> tuple[Tensor, Tensor]:
    """Top-p boundary logit per row and whether it was decided: flat rows by the sampled
    bracket, the others (and flat rows it missed) by the block histogram over their softmax
    (computed for those rows only: the bracket needs none)."""
    if x.numel() < BRACKET_MIN_TOKENS:  # too few rows for the bracket, flat or not
        return _decide(x, torch.softmax(x, -1), row_max, target, True, depth, True, tol)
    flat = _flat_rows(x, row_max, depth)
    if int(flat.sum()) * x.shape[-1] < BRACKET_MIN_TOKENS:
        return _decide(x, torch.softmax(x, -1), row_max, target, True, depth, True, tol)
    sub = flat.nonzero().flatten()
    whole = sub.numel() == x.shape[0]
    xs, ms = (x, row_max) if whole else (x.index_select(0, sub), row_max.index_select(0, sub))
    thr_f, ok_f, missed = _bracket_boundary(xs, ms, target.index_select(0, sub), tol)
    if whole:
        thr, ok = thr_f, ok_f
    else:
        thr = torch.full_like(row_max, NEG_INF)
        ok = torch.zeros_like(flat)
        thr.index_copy_(0, sub, thr_f)
        ok.index_copy_(0, sub, ok_f)
    redo = ~flat
    redo.index_copy_(0, sub, missed)
    if bool(redo.any()):
        r = redo.nonzero().flatten()
        xr = x.index_select(0, r)
        thr_r, ok_r = _decide(
            xr, torch.softmax(xr, -1), row_max.index_select(0, r),
            target.index_select(0, r), True, depth, True, tol,
        )  # fmt: skip
        thr.index_copy_(0, r, thr_r)
        ok.index_copy_(0, r, ok_r)
    return thr, ok


def _top_p_exact(x: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' TopP arithmetic on rows ``x``: ``(number of tokens it keeps, the smallest
    kept logit)`` per row (no min_keep)."""
    sorted_logits = sorted_rows(x)
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
    active = (tp < 1.0) & (row_max > NEG_INF)
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
        thr, ok = _top_p_boundary(x, m, target, depth, tol)
        thr = torch.where(ok, thr, NEG_INF)
        pending = ~ok
    else:
        thr = torch.full_like(m, NEG_INF)
        pending = torch.ones_like(m, dtype=torch.bool)
    if bool(pending.any()):  # transformers' arithmetic
        sub = pending.nonzero().flatten()
        _, smallest_kept = _top_p_exact(x.index_select(0, sub), target.index_select(0, sub))
        thr.index_copy_(0, sub, smallest_kept)
    # min_tokens_to_keep: the threshold is at most the min_keep-th largest logit
    mkt = mk.index_select(0, todo)
    if bool((mkt > 1).any()):
        thr = torch.minimum(thr, kth_largest(x, mkt).flatten())
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
    by up to ~1e-5 (vocab 49152) to ~1e-4 (262144), so in a row whose boundary lies that close
    to ``mass`` the two sets differ by the boundary token(s), and entcal's is the exact one.
    Such rows are rare on real logits (none of the entropy sweep's SmolLM2 or Gemma rows) but
    common on flat rows at vocab 262144, whose boundary tokens hold ~1e-6 of the mass (up to
    122 of 256 rows at a mean entropy of 6 nats, ``benchmarks/entropy_sweep.py``).
    ``reference=True`` reproduces transformers' arithmetic bit for bit (a full sort; for
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
    active = (ms < 1.0) & (logits.amax(-1) > NEG_INF)
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
