"""Differential tests: entcal's batched ops against transformers' own warpers, same tensors.

1050 random batches at vocab 49152 (flat, peaked, Zipf-like and heavy-tailed rows, batch sizes
1..8, random ``min_tokens_to_keep``) plus a smaller set at vocab 262144: the kept sets must be
identical. The two documented exceptions are tested as rules, not skipped: ties (entcal keeps a
tied boundary group whole) and typical's float32 rounding (transformers' re-normalized float32
cumulative mass can land on the other side of ``mass`` than the exact one).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from entcal.decoding import ops, parse
from entcal.decoding.ops import nucleus
from entcal.decoding.ops.nucleus import _typical_scores
from entcal.decoding.reference import reference_warpers

NEG = float("-inf")
KINDS = ("flat", "peaked", "zipf", "heavy")


def make_batch(g: torch.Generator, n: int, v: int, kind: str) -> torch.Tensor:
    """Random logits rows of a given shape family."""
    if kind == "flat":
        x = torch.randn(n, v, generator=g) * 0.5
    elif kind == "peaked":
        x = torch.randn(n, v, generator=g) * 2.0
        k = int(torch.randint(1, 6, (1,), generator=g))
        idx = torch.randint(0, v, (n, k), generator=g)
        x.scatter_(1, idx, 12.0 + 6.0 * torch.rand(n, k, generator=g))
    elif kind == "zipf":  # language-model-like: log p ≈ -s log rank + noise
        # -s log(V u) with u uniform has the order statistics of -s log rank, with no sort
        s = 0.6 + 1.2 * torch.rand(n, 1, generator=g)
        u = torch.rand(n, v, generator=g).clamp_(min=1e-9)
        x = -s * torch.log(u * v) + 0.3 * torch.randn(n, v, generator=g)
    else:  # heavy-tailed: 1.5 * Student-t with 3 degrees of freedom
        z = torch.randn(n, v, generator=g)
        chi2 = sum(torch.randn(n, v, generator=g) ** 2 for _ in range(3))
        x = 1.5 * z / torch.sqrt(chi2 / 3)
    return x.float().contiguous()


def removed(warper, x: torch.Tensor) -> torch.Tensor:
    return warper(None, x) == NEG


def assert_same_or_tied(ref: torch.Tensor, ours: torch.Tensor, score: torch.Tensor) -> None:
    """Equal masks, or masks that differ only inside the group of tokens tied (in ``score``)
    with transformers' weakest kept token: the documented tie rule (transformers keeps an
    arbitrary part of such a group, entcal the whole group or, for min-p's
    ``min_tokens_to_keep`` where float32 probabilities tie, the highest logits)."""
    if torch.equal(ref, ours):
        return
    weakest = torch.where(ref, torch.inf, score).amin(-1, keepdim=True).expand_as(score)
    diff = ref != ours
    assert torch.equal(score[diff], weakest[diff]), "masks differ outside a tied group"


# (transformers' warper class, our mask, parameter sampler); every sampler draws from the
# reference's range. The warper is built by entcal.decoding.reference (see `reference`).
def _p(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


METHODS = {
    "top_k": (
        TopKLogitsWarper,
        lambda x, v, mk: ops.top_k_mask(x, v, mk),
        lambda g: int(torch.randint(1, 400, (1,), generator=g)),
    ),
    "top_p": (
        TopPLogitsWarper,
        lambda x, v, mk: ops.top_p_mask(x, v, mk),
        lambda g: _p(g, 0.02, 0.995),
    ),
    "min_p": (
        MinPLogitsWarper,
        lambda x, v, mk: ops.min_p_mask(x, v, mk),
        lambda g: _p(g, 0.0, 0.4),
    ),
    "typical": (
        TypicalLogitsWarper,
        lambda x, v, mk: ops.typical_mask(x, v, mk, reference=True),
        lambda g: _p(g, 0.05, 0.99),
    ),
    "epsilon": (
        EpsilonLogitsWarper,
        lambda x, v, mk: ops.epsilon_mask(x, v, mk),
        lambda g: 10 ** _p(g, -6, -2),
    ),
    "eta": (
        EtaLogitsWarper,
        lambda x, v, mk: ops.eta_mask(x, v, mk),
        lambda g: 10 ** _p(g, -6, -2),
    ),
}


def same_warper(a, b) -> bool:
    """Same transformers class with the same parameters (Eta keeps its epsilon as a tensor)."""
    va, vb = vars(a), vars(b)
    return (
        type(a) is type(b)
        and va.keys() == vb.keys()
        and all(
            torch.equal(va[k], vb[k]) if isinstance(va[k], torch.Tensor) else va[k] == vb[k]
            for k in va
        )
    )


def reference(method: str, value, mk: int):
    """``reference_warpers`` for ``method=value`` (``min_tokens_to_keep=mk``), checked to be
    the class METHODS names, with exactly these parameters."""
    cls = METHODS[method][0]
    warpers = reference_warpers({method: value, "min_tokens_to_keep": mk})
    if not warpers:  # min_p=0.0 is the chain's neutral value: no warper, nothing removed
        assert method == "min_p" and value == 0.0
        return warpers
    (warper,) = warpers
    assert same_warper(warper, cls(value, min_tokens_to_keep=mk)), (method, value, mk)
    return warper


def _cases(seed: int, count: int, v: int, sizes: tuple[int, ...]):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        n = sizes[i % len(sizes)]
        mk = (1, 1, 1, 2, 5, 40)[i % 6]
        yield make_batch(g, n, v, kind), g, mk, kind


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_kept_sets_vocab_49152(method):
    _, ours_fn, sample = METHODS[method]
    batches = 0
    for x, g, mk, _ in _cases(sorted(METHODS).index(method), 150, 49152, (1, 2, 4)):
        value = sample(g)
        ref = removed(reference(method, value, mk), x)
        ours = ours_fn(x, value, mk)
        score = torch.softmax(x, -1) if method == "min_p" else x
        if method == "typical":
            assert torch.equal(ref, ours)
        else:
            assert_same_or_tied(ref, ours, score)
        batches += 1
    assert batches == 150  # 6 methods x 150 + temperature 150 = 1050 batches


def test_temperature_bitwise_vocab_49152():
    for x, g, _, _ in _cases(7, 150, 49152, (1, 3, 8)):
        t = _p(g, 0.05, 3.0)
        assert torch.equal(TemperatureLogitsWarper(t)(None, x), ops.temperature(x, t))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_kept_sets_vocab_262144(method):
    _, ours_fn, sample = METHODS[method]
    for x, g, mk, _ in _cases(11, 4, 262144, (1, 2)):
        value = sample(g)
        ref = removed(reference(method, value, mk), x)
        ours = ours_fn(x, value, mk)
        if method == "typical":
            assert torch.equal(ref, ours)
        else:
            assert_same_or_tied(ref, ours, torch.softmax(x, -1) if method == "min_p" else x)


def test_top_p_decided_on_shallow_blocks_all_blocks_and_exact_paths():
    """The three top-p paths (shallow blocks, every block, exact sort) agree with transformers."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([make_batch(g, 4, 49152, k) for k in KINDS])
    for top_p in (0.3, 0.9, 0.99):
        ref = removed(TopPLogitsWarper(top_p), x)
        assert torch.equal(ops.top_p_mask(x, top_p), ref)
        assert torch.equal(ops.top_p_mask(x, top_p, depth=0.5), ref)  # mostly every block
        assert torch.equal(ops.top_p_mask(x, top_p, depth=math.inf), ref)  # every block
        assert torch.equal(ops.top_p_mask(x, top_p, depth=0), ref)  # exact path only


@pytest.mark.parametrize("limit", [0, 1 << 40])
def test_sorted_rows_are_torch_sort_values(limit, monkeypatch):
    """The top-p exact path's sort (one 1-D sort of int64 keys, or ``torch.sort`` beyond the
    limit) gives ``torch.sort``'s values, and so transformers' softmax and cumulative mass,
    bit for bit (up to the sign of zeros): -inf, +inf, ties, signed zeros, the largest floats,
    subnormals, 1 to 5 rows. (NaN is not an input: top-p leaves rows holding one untouched.)"""
    from entcal.decoding.ops import common

    monkeypatch.setattr(common, "SORTED_ROWS_MAX", limit)
    g = torch.Generator().manual_seed(11)
    f32 = torch.finfo(torch.float32)
    for trial in range(60):
        n = 1 + trial % 5
        x = make_batch(g, n, 1 << 15, KINDS[trial % 4])
        if trial % 3 == 0:
            x[:, ::7] = NEG
        if trial % 5 == 0:
            x = x.round()  # many ties
            x[:, ::11], x[:, 1::13] = 0.0, -0.0
        if trial % 6 == 0:
            x[:, ::17], x[:, 3::19] = f32.max, -f32.max
        x[:, 5::23] = f32.tiny * (1 - 2 * (trial % 2))  # smallest normals of either sign
        x[:, 6::29] = f32.tiny / (3 + trial) * (2 * (trial % 2) - 1)  # subnormals
        if trial % 7 == 0:
            x[:, 2::31] = float("inf")
        ours, ref = common.sorted_rows(x), torch.sort(x, dim=-1).values
        # bits, with -0.0 + 0.0 = +0.0: the key sort puts -0.0 first, torch.sort keeps input order
        assert torch.equal((ours + 0.0).view(torch.int32), (ref + 0.0).view(torch.int32))
        cum = ours.softmax(-1).cumsum(-1), ref.softmax(-1).cumsum(-1)  # NaN where +inf
        torch.testing.assert_close(*cum, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("vocab,n", [(49152, 32), (262144, 8)])
def test_top_p_flat_rows_sampled_bracket(vocab, n, monkeypatch):
    """Flat rows (mean entropy ~6 to ~11 nats) take the sampled bracket (here at any batch
    size), which decides most of them itself (the rest: too close to call, transformers'
    arithmetic); the kept sets equal transformers' (tie rule) at every top_p, with masked tokens
    and an all -inf row mixed in."""
    monkeypatch.setattr(nucleus, "BRACKET_MIN_TOKENS", 0)
    g = torch.Generator().manual_seed(vocab)
    decided = total = 0
    for scale in (0.3, 1.0, 1.8):
        x = torch.randn(n, vocab, generator=g) * scale
        x[1, torch.rand(vocab, generator=g) < 0.3] = NEG  # a row after another truncation
        assert bool(nucleus._flat_rows(x, x.amax(-1), nucleus.TOP_P_DEPTH).all())
        for top_p in (0.5, 0.9, 0.95, 0.99):
            ref = removed(TopPLogitsWarper(top_p), x)
            assert_same_or_tied(ref, ops.top_p_mask(x, top_p), x)
            target = torch.full((n,), top_p, dtype=torch.float64)
            tol = nucleus.EXACT_TOL + nucleus.NORM_ERR
            _, ok, missed = nucleus._bracket_boundary(x, x.amax(-1), target, tol)
            assert not bool(missed.any())
            decided += int(ok.sum())
            total += n
        x[2] = NEG
        assert ops.top_p_mask(x, 0.9)[2].sum() == 0  # nothing removed from a dead row
        assert_same_or_tied(
            removed(TopPLogitsWarper(0.9), x[:2]), ops.top_p_mask(x, 0.9)[:2], x[:2]
        )
    assert decided >= 0.6 * total


def test_top_p_bracket_misses_and_mixed_rows_are_redone(monkeypatch):
    """A bracket that misses the boundary (forced here by a negative width) hands its rows to
    the block histogram, and a batch mixing flat and peaked rows routes each row its own way:
    the kept sets are transformers' either way."""
    monkeypatch.setattr(nucleus, "BRACKET_MIN_TOKENS", 0)
    g = torch.Generator().manual_seed(12)
    x = torch.cat([torch.randn(3, 49152, generator=g), make_batch(g, 3, 49152, "peaked")])
    flat = nucleus._flat_rows(x, x.amax(-1), nucleus.TOP_P_DEPTH)
    assert flat.tolist() == [True, True, True, False, False, False]
    target = torch.full((3,), 0.9, dtype=torch.float64)
    for top_p in (0.6, 0.9, 0.97):
        ref = removed(TopPLogitsWarper(top_p), x)
        assert_same_or_tied(ref, ops.top_p_mask(x, top_p), x)
        with monkeypatch.context() as m:
            m.setattr(nucleus, "BRACKET_SE", -50.0)
            _, _, missed = nucleus._bracket_boundary(x[:3], x[:3].amax(-1), target, 0.0)
            assert bool(missed.all())
            assert_same_or_tied(ref, ops.top_p_mask(x, top_p), x)


def test_top_p_bracket_on_half_precision_rows(monkeypatch):
    """ops.top_p_mask on float16/bfloat16 flat rows through the bracket: no dtype error, and the
    kept set is a most-probable prefix holding the top_p mass (the exactness margins concern
    float32, which every decoder converts to first)."""
    monkeypatch.setattr(nucleus, "BRACKET_MIN_TOKENS", 0)
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4, 49152, generator=g) * 0.5).to(dtype)
        removed_ = ops.top_p_mask(x, 0.9)
        x64 = x.double()
        assert bool(
            (
                torch.where(removed_, torch.inf, x64).amin(-1)
                >= torch.where(removed_, x64, -torch.inf).amax(-1)
            ).all()
        )  # a prefix by logit
        kept = torch.where(removed_, 0.0, torch.softmax(x64, -1)).sum(-1)
        assert bool((kept >= 0.9 - 1e-3).all()) and bool((kept <= 0.9 + 1e-2).all())


def test_typical_default_matches_or_differs_only_by_reference_rounding():
    """Default typical uses exact float64 mass; where it differs from transformers, the
    reference's float32 cumulative mass and the exact one lie on opposite sides of ``mass``."""
    g = torch.Generator().manual_seed(5)
    differing = total = 0
    for i in range(24):
        x = make_batch(g, 8, 49152, KINDS[i % 4])
        mass = (0.5, 0.9, 0.95, 0.99)[i % 4]
        ref = removed(TypicalLogitsWarper(mass), x)
        ours = ops.typical_mask(x, mass)
        for depth in (0, 0.5, math.inf):  # full sort, mostly every block, every block
            assert torch.equal(ops.typical_mask(x, mass, depth=depth), ours)
        p32, shifted = _typical_scores(x)
        for r in (ref != ours).any(-1).nonzero().flatten().tolist():
            order = torch.sort(shifted[r]).indices
            c_ref = x[r][order].softmax(-1).cumsum(-1)
            c_exact = p32[r][order].double().cumsum(-1)
            li_ref = int((c_ref < mass).sum())
            li_exact = int((c_exact < mass).sum())
            assert li_ref != li_exact
            lo, hi = min(li_ref, li_exact), max(li_ref, li_exact)
            # every position in between is classified differently by the two sums
            assert torch.equal((c_ref[lo:hi] < mass), ~(c_exact[lo:hi] < mass))
            # and entcal keeps exactly the exact rule's set
            kept = shifted[r] <= shifted[r][order[min(li_exact, 49151)]]
            assert torch.equal(~ours[r], kept)
            differing += 1
        total += x.shape[0]
    assert differing <= 0.1 * total


def test_chain_equals_transformers_processor_list():
    """temperature -> top_k -> top_p -> min_p -> typical -> epsilon -> eta, as generate does."""
    g = torch.Generator().manual_seed(9)
    specs = [
        ("temperature=0.7,top_k=200,top_p=0.9", [TemperatureLogitsWarper(0.7),
         TopKLogitsWarper(200), TopPLogitsWarper(0.9)]),
        ("temperature=1.3,top_p=0.95,min_p=0.02", [TemperatureLogitsWarper(1.3),
         TopPLogitsWarper(0.95), MinPLogitsWarper(0.02)]),
        ("top_k=500,eta=0.0009", [TopKLogitsWarper(500), EtaLogitsWarper(0.0009)]),
        ("temperature=0.9,epsilon=0.0003,min_tokens_to_keep=3",
         [TemperatureLogitsWarper(0.9), EpsilonLogitsWarper(3e-4, min_tokens_to_keep=3)]),
    ]  # fmt: skip
    for spec, warpers in specs:
        reference_list = reference_warpers(spec)  # the same warpers, in the same order
        assert len(reference_list) == len(warpers), spec
        assert all(same_warper(a, b) for a, b in zip(reference_list, warpers)), spec
        for kind in KINDS:
            x = make_batch(g, 4, 49152, kind)
            ref = reference_list(None, x)
            ours = parse(spec)(x)
            assert torch.equal(ref == NEG, ours == NEG), spec
            assert torch.equal(ref[ref > NEG], ours[ours > NEG]), spec


def test_reference_warpers_table():
    """Aliases and mappings give the same list; keys and methods transformers lacks raise."""
    from transformers.generation.logits_process import TopHLogitsWarper

    by_alias = reference_warpers("typical_p=0.9,eta_cutoff=0.0009,top_h=0.4")
    by_map = reference_warpers({"top_h": 0.4, "typical": 0.9, "eta": 9e-4})
    assert [type(w) for w in by_alias] == [TopHLogitsWarper, TypicalLogitsWarper, EtaLogitsWarper]
    assert all(same_warper(a, b) for a, b in zip(by_alias, by_map))
    assert len(reference_warpers("ancestral")) == 0
    for spec in ("top_n_sigma=1.0", "smoothing_factor=0.3", "temperature=0.9,dynatemp_range=0.4",
                 "mirostat:tau=3.0", "min_p=0.1 | top_p=0.9"):  # fmt: skip
        with pytest.raises(ValueError, match="transformers has"):
            reference_warpers(spec)
    with pytest.raises(ValueError, match="top_p"):
        reference_warpers({"top_p": 1.5})


# ---- ties: the documented rule ----------------------------------------------------------------


def test_ties_top_k_same_rule_as_transformers():
    x = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    assert torch.equal(ops.top_k_mask(x, 2), removed(TopKLogitsWarper(2), x))
    assert ops.top_k_mask(x, 2).tolist() == [[False, False, False, False, True, True]]


def test_ties_top_p_keep_the_whole_boundary_group():
    # p ∝ e^5, e^3 x3, ...: mass of the top token ≈ 0.70; top_p = 0.8 crosses inside the tie
    x = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    ours = ops.top_p_mask(x, 0.8)
    assert ours.tolist() == [[False, False, False, False, True, True]]
    ref = removed(TopPLogitsWarper(0.8), x)
    assert not (ours & ~ref).any()  # transformers keeps a subset of entcal's set
    assert (ref & ~ours).sum() <= 2  # ... differing only inside the tied group
    for depth in (0, 0.5, math.inf):  # same on every path
        assert torch.equal(ops.top_p_mask(x, 0.8, depth=depth), ours)


def test_ties_typical_and_min_p_keep_the_whole_group():
    x = torch.tensor([[4.0, 2.0, 2.0, 2.0, 0.0, -1.0]])
    # min_tokens_to_keep=2 with a tie at the 2nd place: all tied tokens kept
    assert ops.min_p_mask(x, 0.9, min_keep=2).tolist() == [[False, False, False, False, True, True]]
    assert ops.epsilon_mask(x, 0.5, min_keep=2).tolist() == [
        [False, False, False, False, True, True]
    ]
    # typical: tokens with equal |-log p - H| are kept or removed together
    kept = ~ops.typical_mask(x, 0.5)
    assert kept[0, 1] == kept[0, 2] == kept[0, 3]


def test_eta_keeps_a_tied_top_that_float32_rounding_removes():
    """eta close to 1 on rows whose tokens all tie: float32 rounds H a hair below log n in some
    rows, every probability falls under the threshold, and only the min_tokens_to_keep guard
    keeps the (tied) top tokens. entcal reads that guard on the emptied rows alone; the masks
    equal transformers' on every row, and the emptied case does occur."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 1, generator=g).mul(3).expand(-1, 5).clone()
    x[1::2, 3:] = float("-inf")  # two or five tokens tie at the top
    eta = 0.99999994  # the largest float32 below 1
    probs = torch.softmax(x, -1)
    norm = x - x.logsumexp(-1, keepdim=True)
    ent = -(norm * torch.softmax(norm, -1)).sum(-1, keepdim=True)
    e = torch.tensor(eta)
    emptied = (probs < torch.minimum(e, e.sqrt() * torch.exp(-ent))).all(-1)
    assert 0 < int(emptied.sum()) < len(x)
    assert torch.equal(ops.eta_mask(x, eta), removed(EtaLogitsWarper(eta), x))


def test_min_tokens_to_keep_beyond_the_rule():
    g = torch.Generator().manual_seed(1)
    x = make_batch(g, 3, 49152, "peaked")
    for mk in (1, 10, 300):
        for ours, warper in (
            (ops.top_p_mask(x, 0.01, mk), TopPLogitsWarper(0.01, min_tokens_to_keep=mk)),
            (ops.typical_mask(x, 0.01, mk, reference=True), TypicalLogitsWarper(0.01, min_tokens_to_keep=mk)),
            (ops.min_p_mask(x, 1.0, mk), MinPLogitsWarper(1.0, min_tokens_to_keep=mk)),
        ):  # fmt: skip
            assert torch.equal(ours, removed(warper, x))
            assert bool(((~ours).sum(-1) >= mk).all())


def test_top_p_inexact_mode_is_the_float64_nucleus_even_at_one_minus_1e_4():
    """exact=False decides from entcal's float64 masses alone: the kept set is the float64
    nucleus of softmax(logits), also where float32 cumulative sums cannot resolve it."""
    g = torch.Generator().manual_seed(12)
    x = torch.cat([make_batch(g, 3, 49152, k) for k in KINDS])
    for top_p in (0.9, 0.999, 1 - 1e-4):
        ours = ops.top_p_mask(x, top_p, exact=False)
        p = torch.softmax(x.double(), -1)
        srt = p.sort(-1, descending=True)
        before = srt.values.cumsum(-1) - srt.values
        kept_n = (before < top_p).sum(-1)
        thr = x.gather(-1, srt.indices.gather(-1, (kept_n - 1).view(-1, 1)))
        assert torch.equal(ours, x < thr), top_p
