"""The ``anchored`` decoder: known answers from its rule, its state, mixed batches, the prompt's
log loss, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from entcal.calibrators.anchored import (
    DEFAULT_OFFSET,
    EMA_WINDOW,
    AnchoredDecoder,
    entropy_ema,
    prompt_log_loss,
)
from entcal.decoding import parse


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * lp).sum(-1)


def _expected(logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), -1)
    return torch.log_softmax((1 + alpha.double())[:, None] * lp, -1)


def test_rule_known_answer_over_steps():
    """α_t = base + g·max(0, m_t − ℓ − c) with m_t the bias-corrected EMA of the raw entropies
    seen, the gate closed for the first `warmup` steps; p ∝ p^(1 + α)."""
    g, c, base, target, warm = 0.7, 0.25, 0.05, 1.5, 2
    d = parse(f"anchored:target={target},strength={g},threshold={c},base={base},warmup={warm}")
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 40, generator=gen) * s for s in (0.5, 1.0, 2.0, 0.3, 1.5)]
    decay = 1 - 1 / EMA_WINDOW
    seen: list[torch.Tensor] = []
    d.reset(3)
    for t, x in enumerate(rows):
        seen.append(_entropy(x))
        weights = torch.tensor([decay ** (t - s) for s in range(t + 1)], dtype=torch.float64)
        m = (torch.stack(seen, 1) * weights).sum(1) / weights.sum()
        alpha = base + (g * (m - target - c).clamp_min(0) if t >= warm else torch.zeros(3))
        out = d(x).log_softmax(-1).double()
        assert torch.allclose(out, _expected(x, alpha), atol=1e-5), t
        d.observe(torch.zeros(3, dtype=torch.long))
    # the check discriminates: the gate opened on some row at some step
    assert float(alpha.max()) > base


def test_a_call_before_observe_replaces_the_step():
    """A step processed again before observe (vLLM may re-run a row) counts once, as its last
    call: the state then equals that of a decoder that saw only that call."""
    spec = "anchored:target=0.5,strength=2,threshold=0,warmup=0"
    gen = torch.Generator().manual_seed(2)
    x, y, z = (torch.randn(2, 30, generator=gen) * s for s in (0.2, 3.0, 1.0))
    d, fresh = parse(spec), parse(spec)
    d.reset(2)
    fresh.reset(2)
    d(x)
    assert torch.equal(d(y), fresh(y))  # the second call replaces the first
    tok = torch.zeros(2, dtype=torch.long)
    d.observe(tok)
    fresh.observe(tok)
    assert torch.equal(d(z), fresh(z))
    # the check discriminates: a decoder that counted x as a step sharpens z differently
    other = parse(spec)
    other.reset(2)
    other(x)
    other.observe(tok)
    other(y)
    other.observe(tok)
    assert not torch.allclose(other(z), d(z))


def test_entropy_ema_first_step_is_the_entropy():
    h = torch.tensor([2.0, 3.5])
    m, s = entropy_ema(torch.zeros(2), torch.zeros(2, dtype=torch.long), h)
    assert torch.allclose(m, h) and torch.allclose(s, h)
    m2, _ = entropy_ema(s, torch.ones(2, dtype=torch.long), torch.tensor([4.0, 3.5]))
    d = 1 - 1 / EMA_WINDOW
    assert torch.allclose(m2, torch.tensor([(d * 2 + 4) / (1 + d), 3.5]))


def test_mixed_instances_equal_each_alone():
    """Rows of several instances (vLLM: one per request) in one pass give what each instance
    gives alone, step after step."""
    specs = [
        "anchored:target=1.0,strength=0.5,threshold=0,warmup=1",
        "anchored:target=2.5,strength=2,threshold=-0.5,base=0.1,warmup=0",
        "anchored:target=0.7,strength=1,threshold=0.2,warmup=3",
    ]
    together = [parse(s) for s in specs]
    alone = [parse(s) for s in specs]
    owner = [0, 1, 2, 1, 0, 2, 2]  # interleaved rows
    for d in together:
        d.reset(owner.count(together.index(d)))
    for d in alone:
        d.reset(owner.count(alone.index(d)))
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(len(owner), 64, generator=gen) * 2
        mixed = AnchoredDecoder._apply_group([together[i] for i in owner], x, None)
        for k, d in enumerate(alone):
            rows = [r for r, o in enumerate(owner) if o == k]
            out = d(x[rows])
            assert torch.allclose(mixed[rows], out, atol=1e-6)
            tok = torch.zeros(len(rows), dtype=torch.long)
            d.observe(tok)
            together[k].observe(tok)


SMOLLM2_VOCAB = 49152


def _alpha_of(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """α per row from a sharpened row ``(1 + α)·log p`` (read at the least likely token)."""
    lp = torch.log_softmax(logits, -1)
    j = lp.argmin(-1, keepdim=True)
    return (out.gather(-1, j) / lp.gather(-1, j) - 1)[:, 0]


#: The veto's own gate opened (child strength 2, threshold -0.5, no warm-up) so that its α
#: varies with each row's predicted derailment and crosses the anchor's: the shipped gate
#: (threshold 0.81, warm-up 8) stays shut on random rows, leaving only its base.
OPEN_VETO = {"strength": 2.0, "threshold": -0.5, "warmup": 0}
OPEN_CALIBRATED = "calibrated:strength=2,threshold=-0.5,warmup=0"


def _vetoed(spec: str) -> AnchoredDecoder:
    d = parse(spec)
    assert isinstance(d, AnchoredDecoder) and d._veto is not None
    for key, value in OPEN_VETO.items():
        setattr(d._veto, key, value)
    return d


def test_predictor_veto_takes_the_smaller_alpha():
    """With the predictor's veto (predictor=shipped), α_t = min(α_anchored, α_calibrated): each
    of the two, run alone on the same rows and tokens, gives its own α; the vetoed decoder
    sharpens by the smaller, row by row, step after step (the veto's state advancing with it)."""
    target = "target=3.0,strength=0.5,threshold=0,warmup=2"
    vetoed = _vetoed(f"anchored:predictor=shipped,{target}")  # SmolLM2's, found by vocabulary
    alone = parse(f"anchored:{target}")
    cal = parse(OPEN_CALIBRATED)
    gen = torch.Generator().manual_seed(4)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])[:, None]
    n = len(scales)
    for d in (vetoed, alone, cal):
        d.reset(n)
    smaller = {"anchored": 0, "calibrated": 0}
    seen = []
    for t in range(10):
        x = torch.randn(n, SMOLLM2_VOCAB, generator=gen) * scales
        a_alone, a_cal = _alpha_of(alone(x), x), _alpha_of(cal(x), x)
        seen.append(a_cal)
        expected = torch.minimum(a_alone, a_cal)
        out = vetoed(x)
        assert torch.allclose(_alpha_of(out, x), expected, atol=1e-4), t
        lp = torch.log_softmax(x, -1)
        assert torch.allclose(out, (1 + expected)[:, None] * lp, rtol=1e-5, atol=1e-3), t
        smaller["anchored"] += int((a_alone < a_cal - 1e-3).sum())
        smaller["calibrated"] += int((a_cal < a_alone - 1e-3).sum())
        tok = x.argmax(-1)
        for d in (vetoed, alone, cal):
            d.observe(tok)
    # the check discriminates: the veto's α moves with the rows and the steps (not its base
    # alone), and each of the two was the smaller somewhere
    assert float(torch.stack(seen).std()) > 0.05
    assert smaller["anchored"] > 0 and smaller["calibrated"] > 0, smaller


def test_vetoed_step_called_again_counts_once():
    """A step processed again before observe (vLLM may re-run a row) counts once for the veto's
    state as for the anchor's."""
    spec = "anchored:predictor=shipped,target=3.0,strength=0.5,threshold=0,warmup=0"
    gen = torch.Generator().manual_seed(6)
    x, y, z = (torch.randn(3, SMOLLM2_VOCAB, generator=gen) * s for s in (4.0, 1.0, 2.0))
    d, fresh = _vetoed(spec), _vetoed(spec)
    d.reset(3)
    fresh.reset(3)
    d(x)
    assert torch.equal(d(y), fresh(y))
    tok = y.argmax(-1)
    d.observe(tok)
    fresh.observe(tok)
    assert torch.equal(d(z), fresh(z))


def test_vetoed_and_plain_instances_mixed_equal_each_alone():
    """A mixed batch of vetoed and plain instances (vLLM: one per request) gives what each
    instance gives alone, step after step."""
    specs = [
        "anchored:predictor=shipped,target=3.0,strength=0.5,threshold=0,warmup=0",
        "anchored:target=2.0,strength=0.3,threshold=0,warmup=0",
        "anchored:predictor=shipped,target=1.0,strength=1,threshold=-0.5,warmup=1",
    ]

    def make(spec: str) -> AnchoredDecoder:
        return _vetoed(spec) if "predictor" in spec else parse(spec)

    together = [make(s) for s in specs]
    alone = [make(s) for s in specs]
    owner = [2, 0, 1, 0, 2, 1]
    for group in (together, alone):
        for k, d in enumerate(group):
            d.reset(owner.count(k))
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([1.0, 3.0, 0.5, 2.0, 4.0, 1.5])[:, None]
    for _ in range(10):
        x = torch.randn(len(owner), SMOLLM2_VOCAB, generator=gen) * scales
        mixed = AnchoredDecoder._apply_group([together[i] for i in owner], x, None)
        for k, d in enumerate(alone):
            rows = [r for r, o in enumerate(owner) if o == k]
            assert torch.allclose(mixed[rows], d(x[rows]), atol=1e-5)
            tok = x[rows].argmax(-1)
            d.observe(tok)
            together[k].observe(tok)


def test_copies_hold_their_own_veto():
    """vLLM serves each request with a shallow copy of one parsed prototype: each copy's veto
    holds its own sequences' state, so one request ending leaves the others' steps as they were
    alone."""
    import copy

    spec = "anchored:predictor=shipped,target=3.0,strength=0.5,threshold=0,warmup=0"
    proto = _vetoed(spec)
    a, b = copy.copy(proto), copy.copy(proto)
    assert a._veto is not b._veto and a._veto is not proto._veto
    ref = _vetoed(spec)
    for d in (a, b, ref):
        d.reset(1)
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        x = torch.randn(2, SMOLLM2_VOCAB, generator=gen) * torch.tensor([[2.0], [1.0]])
        out_b = b(x[1:])
        assert torch.equal(out_b, ref(x[1:])), step
        if step < 2:  # request a ends after two steps
            a(x[:1])
            a.observe(x[:1].argmax(-1))
        b.observe(x[1:].argmax(-1))
        ref.observe(x[1:].argmax(-1))


def test_predictor_option():
    """predictor=none (default), shipped or a folder; each has its fitted gate; the spec and the
    cache key tell them apart; a model with no shipped predictor says what to pass."""
    plain, vetoed = parse("anchored"), parse("anchored:predictor=shipped")
    assert vetoed.predictor == "shipped" and plain.predictor is None
    assert (vetoed.strength, vetoed.threshold) != (plain.strength, plain.threshold)
    assert plain.spec == "anchored" and vetoed.spec == "anchored:predictor=shipped"
    assert parse("anchored:predictor=none").spec == "anchored"
    assert plain.cache_key() != vetoed.cache_key()
    with pytest.raises(FileNotFoundError, match="predictor"):
        parse("anchored:predictor=/nonexistent/folder")


def test_no_shipped_predictor_names_the_way_out(tiny_llama):
    model = tiny_llama(vocab=48, hidden=32)
    with pytest.raises(ValueError, match="predictor=none"):
        parse("anchored:predictor=shipped").bind(model)
    parse("anchored").bind(model)  # the prompt anchor alone (the default) needs no predictor


def test_dead_row_stays_dead_and_flat_row_stays_flat():
    d = parse("anchored:target=0.1,strength=5,threshold=0,warmup=0")
    x = torch.zeros(2, 10)
    x[1] = float("-inf")
    d.reset(2)
    out = d(x)
    assert torch.isinf(out[1]).all() and (out[1] < 0).all()
    assert torch.allclose(out[0].log_softmax(-1), torch.full((10,), -math.log(10)))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("anchored:target=0", "target"),
        ("anchored:target=nan", "target"),
        ("anchored:strength=-1", "strength"),
        ("anchored:base=-0.1", "base"),
        ("anchored:warmup=-1", "warmup"),
        ("anchored:threshold=inf", "threshold"),
        ("anchored:offset=x", "offset"),
        ("anchored:tau=1", "unknown option 'tau'"),
        ("anchored:target=2,offset=-0.1", "offset applies to target=prompt only"),
    ],
)
def test_bad_options_name_the_key(spec, words):
    with pytest.raises(ValueError, match=words):
        parse(spec)


def test_prompt_target_needs_the_model():
    d = parse("anchored")
    assert d.requires_input_ids  # vLLM's admission rejects it (a number is accepted)
    assert not parse("anchored:target=2").requires_input_ids
    d.reset(1)
    with pytest.raises(ValueError, match=r"target=prompt.*model"):
        d(torch.randn(1, 8), torch.tensor([[1, 2, 3]]))


def test_spec_round_trips():
    for spec in (
        "anchored",
        "anchored:predictor=shipped,strength=0.2,threshold=0.15",
        "anchored:strength=0.4,threshold=0",
        "anchored:predictor=shipped,target=2.5",
        "anchored:offset=-0.1,strength=0.5",
        "anchored:target=2.5,warmup=0",
    ):
        assert parse(parse(spec).spec).spec == parse(spec).spec
    assert parse("anchored:target=prompt").spec == "anchored"


def test_prompt_log_loss_known_answer_and_left_padding(tiny_llama):
    model = tiny_llama(vocab=48, hidden=32, pad_token_id=0)
    ids = torch.tensor([[5, 9, 13, 7, 22, 31, 4, 8, 17, 3]])
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    nll = -lp.gather(-1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(prompt_log_loss(model, ids, window=4), nll[-4:].mean()[None], atol=1e-6)
    assert torch.allclose(prompt_log_loss(model, ids, window=64), nll.mean()[None], atol=1e-6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    both = prompt_log_loss(model, torch.cat([padded, torch.cat([ids, ids[:, :3]], 1)]), window=4)
    assert torch.allclose(both[0], nll[-4:].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="fewer than 2"):
        prompt_log_loss(model, torch.tensor([[0, 0, 5]]))
    # token lists need no pad id: exact whatever the model config says
    lists = prompt_log_loss(tiny_llama(vocab=48, hidden=32), [ids[0].tolist(), [9, 13, 7]], 4)
    assert torch.allclose(lists[0], nll[-4:].mean(), atol=1e-5)
    with torch.inference_mode():
        short = torch.tensor([[9, 13, 7]])
        lp3 = torch.log_softmax(model(short).logits[0, :-1].float(), -1)
    assert torch.allclose(lists[1], -lp3.gather(-1, short[0, 1:, None]).mean(), atol=1e-5)


def test_prompt_target_equals_the_same_number_given(tiny_llama):
    """target=prompt reads ℓ = L_prompt + offset from the bound model; the spec with that number
    as its target (what a vLLM request would carry) gives the same distribution."""
    model = tiny_llama(vocab=48, hidden=32, lm_head_scale=0.3)
    prompt = torch.tensor([[1, 5, 9, 13, 7, 22, 31, 4, 8, 17]])
    level = float(prompt_log_loss(model, prompt)[0]) + DEFAULT_OFFSET
    a = parse("anchored:strength=3,threshold=-1,warmup=0").bind(model)
    b = parse(f"anchored:target={level},strength=3,threshold=-1,warmup=0")
    a.reset(1)
    b.reset(1)
    ids = prompt
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(1, 48, generator=gen)
        out_a, out_b = a(x, ids), b(x, ids)
        assert torch.equal(out_a, out_b)
        assert not torch.allclose(out_a.log_softmax(-1), x.log_softmax(-1))  # the gate acts
        tok = out_a.argmax(-1)
        a.observe(tok)
        b.observe(tok)
        ids = torch.cat([ids, tok[:, None]], 1)


def test_generate_and_scoring_read_the_unpadded_prompts(tiny_llama):
    """Prompts of different lengths are left padded in a batch; generate and teacher-forced
    scoring pass the decoder the prompts themselves, so each row's level is its prompt's alone,
    whatever the pad token (this model's config names none)."""
    from transformers import PreTrainedTokenizerFast

    from entcal.eval import scoring
    from entcal.generation import generate

    model = tiny_llama(vocab=48, hidden=32, lm_head_scale=0.3)
    assert model.config.pad_token_id is None
    tok = _tiny_tokenizer(48)
    prompts = [[1, 5, 9, 13, 7, 22, 31, 4, 8, 17], [1, 30, 12]]
    spec = "anchored:strength=3,threshold=-2,warmup=0"
    gens = generate(model, tok, prompts, spec, max_new_tokens=6, seed=1)
    for p, g in zip(prompts, gens):
        level = float(prompt_log_loss(model, [p])[0]) + DEFAULT_OFFSET
        alone = scoring.score(model, [p], [g.token_ids], {"a": parse(f"{spec},target={level!r}")})
        assert torch.allclose(alone.processed["a"].logprob[0], g.logprob, atol=1e-4)
    both = scoring.score(
        model, prompts, [g.token_ids for g in gens], {"a": parse(spec).bind(model)}
    )
    for i, g in enumerate(gens):
        assert torch.allclose(both.processed["a"].logprob[i], g.logprob, atol=1e-4)
    assert isinstance(tok, PreTrainedTokenizerFast)


def test_generate_hands_the_prefill_log_loss_over(tiny_llama):
    """entcal.generate keeps the prefill's logits of the prompts' last 65 positions and hands
    the decoder their log loss: one forward per step and no second pass over the prompts, the
    same levels as prompt_log_loss (left padding, a prompt shorter than the window, n > 1) and
    the same tokens as when the decoder runs its own pass."""
    from entcal.generation import generate

    model = tiny_llama(vocab=48, hidden=32, lm_head_scale=0.3)
    tok = _tiny_tokenizer(48)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 48, (n,), generator=g).tolist() for n in (80, 7, 2)]
    spec = "anchored:strength=3,threshold=-2,warmup=0"

    widths: list[int] = []
    hook = model.register_forward_hook(
        lambda m, a, kw, o: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    dec = parse(spec).bind(model)
    try:
        handed = generate(model, tok, prompts, dec, max_new_tokens=5, seed=2, n=2)
    finally:
        hook.remove()
    assert widths == [80, 1, 1, 1, 1]  # the prefill, then one token per step
    expected = prompt_log_loss(model, [p for p in prompts for _ in range(2)]) + DEFAULT_OFFSET
    assert torch.allclose(dec._levels, expected, atol=1e-6)

    class OwnPass(AnchoredDecoder):
        prompt_nll_window = 0  # asks for nothing: reads the prompts through its own pass

    own = OwnPass(strength=3, threshold=-2, warmup=0).bind(model)
    alone = generate(model, tok, prompts, own, max_new_tokens=5, seed=2, n=2)
    assert [a.token_ids for a in alone] == [h.token_ids for h in handed]
    for a, h in zip(alone, handed):
        assert torch.allclose(a.logprob, h.logprob, atol=1e-5)


def test_prefill_handover_in_a_pipeline_and_its_fallback(tiny_llama):
    """A pipeline hands the prompts' log loss to its anchored stage (no second pass), and a
    prompt with no predicted token (1 token) is left to the decoder's own pass, which raises
    its error naming the row."""
    from entcal.generation import generate

    model = tiny_llama(vocab=48, hidden=32, lm_head_scale=0.3)
    tok = _tiny_tokenizer(48)
    prompts = [[5, 9, 13, 7, 22, 31, 4, 8, 17, 3], [6, 12, 30]]
    spec = "anchored:strength=3,threshold=-2,warmup=0"
    widths: list[int] = []
    hook = model.register_forward_hook(
        lambda m, a, kw, o: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        piped = generate(model, tok, prompts, f"{spec} | top_k=48", max_new_tokens=3, seed=1)
    finally:
        hook.remove()
    assert widths == [10, 1, 1]
    alone = generate(model, tok, prompts, spec, max_new_tokens=3, seed=1)
    assert [p.token_ids for p in piped] == [a.token_ids for a in alone]
    with pytest.raises(ValueError, match="fewer than 2"):
        generate(model, tok, [[5], [6, 12, 30]], spec, max_new_tokens=2, seed=1)


def test_scoring_hands_the_prompt_pass_log_loss_over(tiny_llama, monkeypatch):
    """Teacher-forced scoring takes the level from its own prompt pass (the decoder's own pass,
    prompt_log_loss, is never called) and scores as the decoder's own pass does."""
    from entcal.calibrators import anchored as anchored_module
    from entcal.eval import scoring

    model = tiny_llama(vocab=48, hidden=32, lm_head_scale=0.3)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 48, (n,), generator=g).tolist() for n in (70, 9, 3)]
    conts = [torch.randint(4, 48, (6,), generator=g).tolist() for _ in prompts]
    spec = "anchored:strength=3,threshold=-2,warmup=0"
    with monkeypatch.context() as m:  # a decoder that asks for nothing: its own pass
        m.setattr(AnchoredDecoder, "prompt_nll_window", property(lambda self: 0))
        own = scoring.score(model, prompts, conts, {"a": parse(spec).bind(model)}, batch_size=2)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the decoder ran its own pass over the prompts")

    monkeypatch.setattr(anchored_module, "prompt_log_loss", no_second_pass)
    handed = scoring.score(model, prompts, conts, {"a": parse(spec).bind(model)}, batch_size=2)
    assert torch.allclose(handed.processed["a"].logprob, own.processed["a"].logprob, atol=1e-5)
    assert torch.equal(handed.raw.logprob, own.raw.logprob)


def _tiny_tokenizer(vocab: int):
    """A word-level fast tokenizer over ids 0 … vocab-1 (pad 0, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    core = Tokenizer(models.WordLevel(words, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="w0", eos_token="w2", unk_token="w3"
    )


def test_generate_and_scoring_agree(smollm2):
    """entcal.generate with target=prompt samples from the distribution that teacher-forced
    scoring assigns the same tokens (both read the same prompt level)."""
    from entcal.eval import scoring
    from entcal.generation import generate

    model, tok = smollm2
    prompt = tok("The quick brown fox jumps over the lazy dog. It was a sunny day and")["input_ids"]
    spec = "anchored:strength=2,threshold=-2"  # the gate held open: every step depends on ℓ
    g = generate(model, tok, [prompt], spec, max_new_tokens=12, seed=3)[0]
    s = scoring.score(model, [prompt], [g.token_ids], {"a": parse(spec).bind(model)})
    assert torch.allclose(s.processed["a"].logprob[0], g.logprob, atol=1e-4)
    assert float((g.logprob - g.raw_logprob).abs().max()) > 0.05
