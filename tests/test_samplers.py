"""The samplers of the serving ecosystem: top-H against transformers (differential), the others
against their definitions (known answers and scalar transcriptions of the reference rules:
text-generation-webui's DRY and smoothing, llama.cpp's dynamic temperature, XTC and mirostat),
and pipelines that apply stages in the order written."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
)

from entcal.decoding import apply_rows, ops, parse
from entcal.decoding.dry import dry_penalty
from entcal.decoding.rng import sequence_uniforms
from tests.test_decoding_diff import KINDS, make_batch

NEG = float("-inf")


# ---- top-H: identical kept sets to transformers' TopHLogitsWarper ---------------------------


@pytest.mark.parametrize(("vocab", "batches"), [(49152, 400), (262144, 120)])
def test_top_h_masks_equal_transformers(vocab, batches):
    g = torch.Generator().manual_seed(vocab)
    kept_sizes = set()
    for b in range(batches):
        x = make_batch(g, 1 + b % 4, vocab, KINDS[b % len(KINDS)])
        top_h = float(torch.rand(1, generator=g)) * 0.999 + 0.001  # in (0, 1]
        ref_out = TopHLogitsWarper(top_h)(None, x)
        ref = ref_out == NEG
        assert torch.equal(ops.top_h_mask(x, top_h), ref), (b, top_h)
        # the chain's path writes the processed logits directly: transformers' values, bit for bit
        assert torch.equal(ops.top_h_apply(x, top_h), ref_out), (b, top_h)
        kept_sizes.update((~ref).sum(-1).tolist())
    assert len(kept_sizes) > 10  # the sweep reaches many different kept-set sizes


def test_top_h_per_row_values_and_off_rows():
    g = torch.Generator().manual_seed(1)
    x = make_batch(g, 6, 49152, "zipf")
    th = torch.tensor([0.2, 0.0, 0.9, 1.0, 0.0, 0.5])
    remove = ops.top_h_mask(x, th)
    for i in range(6):
        ref = (
            torch.zeros(1, 49152, dtype=torch.bool)
            if th[i] == 0
            else TopHLogitsWarper(float(th[i]))(None, x[i : i + 1]) == NEG
        )
        assert torch.equal(remove[i : i + 1], ref), i
    out = ops.top_h_apply(x, th)  # written directly, per-row values, off rows untouched
    for i in range(6):
        ref = x[i : i + 1] if th[i] == 0 else TopHLogitsWarper(float(th[i]))(None, x[i : i + 1])
        assert torch.equal(out[i : i + 1], ref), i
    assert ops.top_h_apply(x, torch.zeros(6)) is None  # no row on


def test_top_h_chain_equals_transformers_processor_list():
    g = torch.Generator().manual_seed(2)
    for b in range(40):
        x = make_batch(g, 3, 49152, KINDS[b % len(KINDS)])
        ref = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopHLogitsWarper(0.4)])(None, x)
        out = parse("temperature=0.7,top_h=0.4")(x)
        assert torch.equal(out == NEG, ref == NEG)
        assert torch.equal(out[out > NEG], ref[ref > NEG])
        # top-H first (its output a new tensor), then a mask stage on it
        ref = LogitsProcessorList([TopHLogitsWarper(0.4), TopKLogitsWarper(5)])(None, x)
        x0 = x.clone()
        assert torch.equal(parse("top_h=0.4,top_k=5")(x), ref)
        assert torch.equal(x, x0)  # the input is not written


# ---- quadratic smoothing (text-generation-webui) --------------------------------------------


def test_smoothing_known_answers():
    x = torch.tensor([[2.0, 1.0, 0.0, NEG]])
    # curve 1: l' = max - f·d²
    assert torch.equal(ops.quadratic_smoothing(x, 0.5, 1.0), torch.tensor([[2.0, 1.5, 0.0, NEG]]))
    # curve 2: k = s = 1/2: l' = max - f/2·d² + f/2·d³
    out = ops.quadratic_smoothing(x, 0.5, 2.0)
    assert torch.allclose(out[:, :3], torch.tensor([[2.0, 1.5, -1.0]]))
    assert out[0, 3] == NEG
    # through the chain, after temperature; factor 0 is off
    assert torch.equal(parse("smoothing_factor=0.5")(x), ops.quadratic_smoothing(x, 0.5, 1.0))
    assert torch.equal(parse("smoothing_curve=2")(x), x)


def test_smoothing_is_per_row():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, generator=g) * 3 + torch.arange(4.0).view(-1, 1) * 10
    both = ops.quadratic_smoothing(x, 0.3, 1.5)
    for i in range(4):
        assert torch.equal(both[i], ops.quadratic_smoothing(x[i : i + 1], 0.3, 1.5)[0])


# ---- dynamic temperature (llama.cpp temp_ext) -----------------------------------------------


def _llama_dynatemp(logits: list[float], temp: float, spread: float, exponent: float) -> float:
    """llama.cpp's ``llama_sampler_temp_ext_apply`` for one row, as scalar Python."""
    cand = [v for v in logits if v != NEG]
    if len(cand) <= 1:
        return 1.0
    lo, hi = max(0.0, temp - spread), temp + spread
    m = max(cand)
    z = sum(math.exp(v - m) for v in cand)
    p = [math.exp(v - m) / z for v in cand]
    h = -sum(q * math.log(q) for q in p if q > 0)
    return lo + (hi - lo) * (h / math.log(len(cand))) ** exponent


@pytest.mark.parametrize(("temp", "spread", "exponent"), [(1.0, 0.5, 1.0), (0.8, 0.3, 2.0),
                                                           (0.4, 0.6, 0.5)])  # fmt: skip
def test_dynatemp_known_answers(temp, spread, exponent):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 40, generator=g).double() * torch.tensor([0.1, 1, 3, 10, 1]).view(-1, 1)
    x[4, 10:] = NEG  # fewer candidates: log n is over the unmasked ones
    spec = f"temperature={temp},dynatemp_range={spread},dynatemp_exponent={exponent}"
    out = parse(spec)(x.float())
    for i in range(5):
        t = _llama_dynatemp(x[i].tolist(), temp, spread, exponent)
        expect = torch.softmax(x[i] / t, -1)
        assert torch.allclose(torch.softmax(out[i].double(), -1), expect, atol=1e-5), i


def test_dynatemp_edge_rows():
    one = torch.tensor([[3.0, NEG, NEG]])  # one candidate: left alone (T = 1)
    assert torch.equal(parse("dynatemp_range=0.5")(one), one)
    # T_min = 0 and a near-certain row: T -> 0 is greedy, never NaN
    x = torch.tensor([[50.0, 0.0, -1.0]])
    out = parse("temperature=0.5,dynatemp_range=0.5")(x)
    assert out.isfinite().sum() >= 1 and not out.isnan().any()
    assert out.argmax() == 0
    # range 0 is the plain temperature
    y = torch.randn(2, 30)
    assert torch.equal(parse("temperature=0.7,dynatemp_range=0")(y), parse("temperature=0.7")(y))


# ---- XTC ------------------------------------------------------------------------------------


def test_xtc_removes_the_top_choices_but_the_least_probable_of_them():
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    on = torch.tensor([True])
    kept = lambda thr: (~ops.xtc_mask(x, thr, on)).flatten().tolist()  # noqa: E731
    assert kept(0.25) == [False, True, True, True]  # .4 and .3 reach it: .4 goes
    assert kept(0.15) == [False, False, True, True]  # .4 .3 .2 reach it: .2 stays
    assert kept(0.35) == [True, True, True, True]  # only one token reaches it: nothing
    assert kept(0.6) == [True, True, True, True]
    assert (~ops.xtc_mask(x, 0.15, torch.tensor([False]))).all()  # the coin said no
    assert (~ops.xtc_mask(x, 0.15, on, min_keep=3)).all()  # would leave 2 < min_keep


def test_xtc_coin_is_per_sequence_and_seeded():
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(3, -1).contiguous()

    def fired(spec, steps=400, batch=3):
        d = parse(spec)
        d.reset(batch)
        out = []
        for _ in range(steps):
            out.append((d(x[:batch])[:, 0] == NEG).tolist())
            d.observe(torch.zeros(batch, dtype=torch.long))
        return torch.tensor(out)  # [steps, batch]

    a = fired("xtc:threshold=0.25,probability=0.3,seed=5")
    assert torch.equal(a, fired("xtc:threshold=0.25,probability=0.3,seed=5"))  # seeded
    assert not torch.equal(a, fired("xtc:threshold=0.25,probability=0.3,seed=6"))
    assert not torch.equal(a[:, 0], a[:, 1])  # each sequence its own coin
    # sequence i's t-th coin is u(seed, i, t) < probability, whatever its batch
    keys = torch.tensor([[0, 1]])
    u = torch.stack([sequence_uniforms(5, keys, t) for t in range(400)]).flatten()
    assert torch.equal(a[:, 1], u < 0.3)
    assert torch.equal(fired("xtc:threshold=0.25,probability=0.3,seed=5", batch=2), a[:, :2])
    # the coin's rate is the probability (400 · 3 draws: SE 0.013)
    assert abs(a.float().mean().item() - 0.3) < 0.05


def test_xtc_instances_in_one_pass_equal_each_alone():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 50, generator=g) * 2
    specs = ["xtc:threshold=0.05,probability=0.5,seed=1", "top_k=5",
             "xtc:threshold=0.1,probability=0.9,seed=2"]  # fmt: skip
    together = [parse(s) for s in specs]
    alone = [parse(s) for s in specs]
    for d in together + alone:
        d.reset(1)
    for _ in range(20):
        out = apply_rows(x, together)
        for i, d in enumerate(alone):
            assert torch.equal(out[i : i + 1], d(x[i : i + 1])), i
            d.observe(torch.tensor([0]))
        for d in together:
            d.observe(torch.tensor([0]))


# ---- DRY ------------------------------------------------------------------------------------


def _tgw_dry(ids, vocab, multiplier, base, allowed, breakers=(), last_n=0):
    """text-generation-webui's DRYLogitsProcessor for one sequence, as scalar Python."""
    if last_n:
        ids = ids[-last_n:]
    out = [0.0] * vocab
    if not ids or ids[-1] in breakers:
        return out
    last = ids[-1]
    lengths: dict[int, int] = {}
    for i in [i for i, v in enumerate(ids[:-1]) if v == last]:
        nxt = ids[i + 1]
        if nxt in breakers:
            continue
        n = 1
        while n < 50:
            j = i - n
            if j < 0:
                break
            prev = ids[-(n + 1)]
            if ids[j] != prev or prev in breakers:
                break
            n += 1
        lengths[nxt] = max(n, lengths.get(nxt, 0))
    for tok, n in lengths.items():
        if n >= allowed:
            out[tok] = multiplier * base ** (n - allowed)
    return out


def _penalty(ids, vocab=10, multiplier=1.0, base=2.0, allowed=2, breakers=()):
    brk = torch.tensor([list(breakers)], dtype=torch.long) if breakers else None
    return dry_penalty(torch.tensor([ids]), vocab, multiplier, base, allowed, brk)[0].tolist()


def test_dry_known_answers():
    # "5 6" occurred before, followed by 7: 7 extends a repeat of 2 -> 1·2^(2-2)
    assert _penalty([5, 6, 7, 1, 5, 6]) == [0, 0, 0, 0, 0, 0, 0, 1.0, 0, 0]
    # "1 2 3" repeats: 4 extends a repeat of 3 -> 1·2^(3-2) = 2 (the multiplier scales it)
    assert _penalty([1, 2, 3, 4, 9, 1, 2, 3])[4] == 2.0
    assert _penalty([1, 2, 3, 4, 9, 1, 2, 3], multiplier=0.8, base=1.75)[4] == pytest.approx(1.4)
    # inside the allowed length: only "6" repeats (n = 1 < 2): no penalty anywhere
    assert _penalty([5, 6, 7, 1, 6]) == [0.0] * 10
    # across a sequence breaker: the repeat cannot reach back over 5 ...
    assert _penalty([5, 6, 7, 1, 5, 6], breakers=(5,)) == [0.0] * 10
    # ... the extending token (7) cannot be a breaker, nor can the last token (6)
    assert _penalty([5, 6, 7, 1, 5, 6], breakers=(7,)) == [0.0] * 10
    assert _penalty([5, 6, 7, 1, 5, 6], breakers=(6,)) == [0.0] * 10
    # a token following several repeats gets the longest one's penalty
    p = _penalty([3, 4, 8, 2, 3, 4, 8, 1, 2, 3, 4], allowed=1)
    assert p[8] == 2.0**2  # "2 3 4" -> 8 (n = 3)


def test_dry_matches_the_reference_loop_on_random_sequences():
    g = torch.Generator().manual_seed(8)
    for case in range(300):
        length = int(torch.randint(1, 60, (1,), generator=g))
        alphabet = int(torch.randint(2, 6, (1,), generator=g))  # small: many repeats
        ids = torch.randint(0, alphabet, (length,), generator=g).tolist()
        allowed = int(torch.randint(1, 4, (1,), generator=g))
        breakers = tuple(torch.randint(0, 6, (case % 3,), generator=g).tolist())
        last_n = [0, 7, 30][case % 3]
        spec = f"dry:multiplier=0.8,base=1.75,allowed_length={allowed}"
        if last_n:
            spec += f",penalty_last_n={last_n}"
        if breakers:
            spec += ",breakers=" + "+".join(map(str, breakers))
        out = parse(spec)(torch.zeros(1, 8), torch.tensor([ids]))
        expect = _tgw_dry(ids, 8, 0.8, 1.75, allowed, breakers, last_n)
        assert torch.allclose(-out[0].double(), torch.tensor(expect, dtype=torch.float64),
                              rtol=1e-6), (ids, allowed, breakers, last_n)  # fmt: skip


def test_dry_without_input_ids_reads_the_primed_prompt_and_observed_tokens():
    """vLLM passes no input_ids: the prompt comes through prime(), the rest through observe()."""
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, 4, (2, 12), generator=g)
    spec = "dry:multiplier=1,base=2,allowed_length=2,breakers=3"
    given, told = parse(spec), parse(spec)
    told.reset(2)
    told.prime(prompt.tolist())
    ids = prompt
    for _ in range(10):
        x = torch.randn(2, 4, generator=g)
        a = given(x, ids)
        assert torch.equal(told(x), a)
        tok = torch.multinomial(a.softmax(-1), 1, generator=g)
        told.observe(tok.flatten())
        ids = torch.cat([ids, tok], 1)


def test_dry_instances_in_one_pass_equal_each_alone():
    g = torch.Generator().manual_seed(10)
    specs = ["dry:multiplier=1,base=2,allowed_length=1", "dry:multiplier=0.5,breakers=1+2"]
    together, alone = [parse(s) for s in specs], [parse(s) for s in specs]
    histories = [torch.randint(0, 5, (1, 9 + 5 * i), generator=g) for i in range(2)]
    for d_t, d_a, h in zip(together, alone, histories, strict=True):
        for d in (d_t, d_a):
            d.reset(1)
            d.prime(h.tolist())
    for _ in range(6):
        x = torch.randn(2, 5, generator=g)
        out = apply_rows(x, together)
        tokens = torch.randint(0, 5, (2,), generator=g)
        for i, d in enumerate(alone):
            assert torch.allclose(out[i : i + 1], d(x[i : i + 1])), i
            d.observe(tokens[i : i + 1])
        for i, d in enumerate(together):
            d.observe(tokens[i : i + 1])


# ---- mirostat v1 and v2, several steps against llama.cpp's rules ----------------------------


def _llama_mirostat(rows, tokens, tau, eta, version, m=100):
    """llama.cpp's mirostat (v1) / mirostat_v2 samplers as scalar Python: the kept sets and mu
    after each step, given the sampled tokens."""
    mu = 2.0 * tau
    kept_sets, mus = [], []
    for row, tok in zip(rows, tokens, strict=True):
        mx = max(row)
        z = sum(math.exp(v - mx) for v in row)
        p = sorted(((math.exp(v - mx) / z, i) for i, v in enumerate(row)), reverse=True)
        if version == 1:
            num = den = 0.0
            for i in range(min(m - 1, len(p) - 1)):
                t_i = math.log((i + 2) / (i + 1))
                b_i = math.log(p[i][0] / p[i + 1][0])
                num += t_i * b_i
                den += t_i * t_i
            s_hat = num / den
            e = s_hat - 1
            k = (e * 2**mu / (1 - len(row) ** (-e))) ** (1 / s_hat)
            kept = p[: max(int(k), 1)]
        else:
            kept = [c for c in p if -math.log2(c[0]) <= mu] or p[:1]
        total = sum(c[0] for c in kept)
        q = {i: c / total for c, i in kept}
        mu -= eta * (-math.log2(q[tok]) - tau)
        kept_sets.append(sorted(q))
        mus.append(mu)
    return kept_sets, mus


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_follows_llama_cpp_over_several_steps(version):
    g = torch.Generator().manual_seed(11 + version)
    v = 300
    # Zipf-like rows with noise, so the estimated exponent varies from step to step
    rank = torch.arange(1, v + 1, dtype=torch.float64)
    rows = [(-(1.0 + 0.3 * float(torch.rand(1, generator=g))) * rank.log()
             + 0.05 * torch.randn(v, generator=g, dtype=torch.float64))[torch.randperm(v, generator=g)]
            for _ in range(12)]  # fmt: skip
    d = parse(f"mirostat:version={version},tau=4.0,eta=0.2")
    d.reset(1)
    tokens, kept_sets = [], []
    for row in rows:
        out = d(row.float().view(1, -1))
        kept = (out[0] > NEG).nonzero().flatten()
        # sample: the least probable kept token (its surprise moves mu the most)
        tok = int(kept[out[0, kept].argmin()])
        tokens.append(tok)
        kept_sets.append(sorted(kept.tolist()))
        d.observe(torch.tensor([tok]))
    ref_sets, ref_mus = _llama_mirostat([r.tolist() for r in rows], tokens, 4.0, 0.2, version)
    assert kept_sets == ref_sets
    assert d.mu_.item() == pytest.approx(ref_mus[-1], abs=1e-4)
    assert len({len(s) for s in kept_sets}) > 2  # mu moved the cut-off


# ---- pipelines --------------------------------------------------------------------------------


def test_pipeline_order_reproduces_vllm_and_transformers():
    row = torch.tensor([[0.45, 0.35, 0.12, 0.08]]).log()
    chain = parse("top_p=0.85,min_p=0.25")  # transformers: top-p then min-p
    vllm_order = parse("min_p=0.25 | top_p=0.85")  # vLLM: min-p then top-p
    assert int(chain(row).isfinite().sum()) == 3
    assert int(vllm_order(row).isfinite().sum()) == 2
    assert str(vllm_order) == "min_p=0.25 | top_p=0.85"
    assert parse(str(vllm_order)) == vllm_order


def test_pipeline_errors_name_the_stage():
    with pytest.raises(ValueError, match="stage 2 is empty"):
        parse("top_p=0.9 | ")
    with pytest.raises(ValueError, match="top_p"):
        parse("min_p=0.1 | top_p=2")
    with pytest.raises(ValueError, match="unknown decoder"):
        parse("min_p=0.1 | nucleus")


def test_pipeline_state_is_per_copy_and_mixed_batches_match():
    import copy

    spec = "dry:multiplier=1,allowed_length=1 | mirostat:tau=2 | xtc:threshold=0.1,probability=1"
    proto = parse(spec)
    a, b = copy.copy(proto), copy.copy(proto)
    assert all(sa is not sb for sa, sb in zip(a.stages, b.stages, strict=True))
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 40, generator=g) * 2
    decs = [a, parse("top_k=4 | temperature=0.5"), b]
    alone = [copy.copy(proto), parse("top_k=4 | temperature=0.5"), copy.copy(proto)]
    for d in decs + alone:
        d.reset(1)
    for _ in range(5):
        out = apply_rows(x, decs)
        toks = out.argmax(-1)
        for i, d in enumerate(alone):
            assert torch.allclose(out[i : i + 1], d(x[i : i + 1])), i
            d.observe(toks[i : i + 1])
        for i, d in enumerate(decs):
            d.observe(toks[i : i + 1])
    assert a.stages[1].mu_.item() != 4.0  # the mirostat stage moved


def test_one_sequence_on_several_rows_keeps_its_state():
    """vLLM's speculative decoding scores one request on several rows: the state of its one
    sequence applies to each of them and is not reset."""
    d = parse("dry:multiplier=1,base=2,allowed_length=2")
    d.reset(1)
    d.prime([[5, 6, 7, 1, 5, 6]])
    out = apply_rows(torch.zeros(2, 8), [d, d])
    assert out[:, 7].tolist() == [-1.0, -1.0]
    assert d.history_.shape == (1, 6)
    x = parse("xtc:threshold=0.2,probability=0.5,seed=1")
    x.reset(1)
    row = torch.tensor([[3.0, 2.5, 2.0, -1.0]]).expand(3, -1)
    for _ in range(10):
        out = apply_rows(row, [x, x, x])
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # one coin
        x.observe(torch.tensor([1]))
    assert x.steps_.tolist() == [10]
