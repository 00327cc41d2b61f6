"""The decoder contract, over every registered decoder at the ends of its parameter ranges.

For any finite input (float32, float16, bfloat16; rows with ties, one finite token, huge
magnitudes) every decoder returns float32 logits that are finite or ``-inf`` — never NaN, never
``+inf`` — and never an all-``-inf`` row unless the input row was; an all-``-inf`` row stays all
``-inf``; the argmax of a peaked row is kept; NaN or ``+inf`` input is a ``ValueError`` naming
the rows; ``str(parse(s))`` round-trips; and a mixed batch (``apply_rows``) gives every row what
its decoder gives it alone. Inputs come from ``hypothesis`` (seeded: the ``ci`` profile).

A newly registered method fails :func:`test_every_registered_method_is_covered` until its
extreme specs are added to ``EXTREMES``.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from entcal.decoding import apply_rows, parse  # noqa: E402
from entcal.decoding.spec import methods  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

TINY, HUGE = "1e-300", "1e300"
F32_TINY = repr(2.0**-126)

#: Specs at and near the ends of every parameter's range, per registered method. Methods that
#: need a model to run (``lookahead`` runs it on every candidate; ``calibrated`` reads the
#: model's vocabulary) are listed in ``MODEL_BOUND`` and exercised at the model's vocabulary.
EXTREMES: dict[str, list[str]] = {
    "ancestral": ["ancestral"],
    "greedy": ["greedy"],
    # the chain: each key at its ends, then combinations
    "chain": [
        f"temperature={TINY}",
        f"temperature={F32_TINY}",
        "temperature=1e-6",
        "temperature=0.5",
        f"temperature={HUGE}",
        "top_k=1",
        "top_k=1000000000",
        "top_p=0",
        "top_p=1e-12",
        "top_p=0.999999",
        "min_p=1",
        "min_p=1e-12",
        "typical=1e-12",
        "typical=0.999999",
        "epsilon=0.999999",
        "epsilon=1e-12",
        "eta=0.999999",
        "eta=1e-12",
        "top_n_sigma=1e-12",
        f"top_n_sigma={HUGE}",
        "min_tokens_to_keep=1000000000",
        f"temperature={TINY},top_p=0.9,min_p=0.5",
        f"temperature={HUGE},top_k=2,typical=0.5",
        "temperature=1e-6,eta=0.999999,epsilon=0.999999,min_tokens_to_keep=2",
        "top_n_sigma=1e-12,top_k=3,top_p=1e-12",
        "top_h=1e-12",
        "top_h=1",
        f"smoothing_factor={TINY}",
        f"smoothing_factor={HUGE}",
        f"smoothing_factor=0.5,smoothing_curve={HUGE}",
        "dynatemp_range=1e-12",
        f"dynatemp_range={HUGE}",
        f"temperature=0.5,dynatemp_range=0.5,dynatemp_exponent={TINY}",
        f"temperature=0.5,dynatemp_range=0.5,dynatemp_exponent={HUGE}",
        f"temperature={TINY},dynatemp_range={TINY},smoothing_factor=1,top_h=0.5",
    ],
    "mirostat": [
        "mirostat",
        f"mirostat:tau={TINY}",
        f"mirostat:tau={HUGE}",
        f"mirostat:eta={HUGE}",
        f"mirostat:tau={TINY},eta={HUGE}",
        "mirostat:mu=0",
        f"mirostat:mu={HUGE}",
        f"mirostat:temperature={TINY}",
        f"mirostat:temperature={F32_TINY}",
        f"mirostat:temperature={HUGE}",
        "mirostat:version=1",
        f"mirostat:version=1,tau={TINY},m=2",
        f"mirostat:version=1,tau={HUGE},m=1000000000",
        f"mirostat:version=1,mu={HUGE},eta={HUGE}",
        "mirostat:surprise=model",
    ],
    "xtc": [
        "xtc",
        "xtc:threshold=0,probability=1",
        "xtc:threshold=1,probability=1",
        "xtc:threshold=0.5,probability=1,min_keep=1000000000",
        "xtc:threshold=1e-12,probability=1e-12,seed=18446744073709551615",
    ],
    "dry": [
        "dry",
        f"dry:multiplier={HUGE},base={HUGE},allowed_length=1",
        "dry:multiplier=0,allowed_length=1000000000",
        "dry:multiplier=1,base=1,penalty_last_n=1,breakers=7+8",
        f"dry:multiplier={HUGE} | xtc:threshold=0,probability=1 | temperature={TINY}",
        f"min_p=1 | top_p=1e-12 | mirostat:version=1,tau={TINY} | top_h=1e-12",
    ],
    "edt": [
        "edt",
        f"edt:t0={TINY}",
        f"edt:t0={HUGE}",
        "edt:theta=0",
        f"edt:theta={HUGE}",
        f"edt:n={TINY}",
        "edt:n=0.9999999999",
        f"edt:t0={HUGE},theta={HUGE},n=0.9999999999",
    ],
    "calibrated": [
        "calibrated",
        "calibrated:scale=0",
        f"calibrated:scale={HUGE}",
        f"calibrated:strength={HUGE},threshold=-{HUGE}",
        f"calibrated:threshold={HUGE}",
        "calibrated:strength=0",
        "calibrated:base=0",
        f"calibrated:base={HUGE}",
        f"calibrated:strength={HUGE},base=0.5",
        "calibrated:warmup=8",
        f"calibrated:warmup=1000000,strength={HUGE}",
        "calibrated:lift=0",
        f"calibrated:lift=1,threshold=-{HUGE},strength={HUGE},warmup=0",
    ],
    "lookahead": [  # runs a model on its top-k candidates: bound to a tiny random Llama here
        "lookahead:alpha=0",
        "lookahead:alpha=-0.999999",
        f"lookahead:alpha={HUGE}",
        "lookahead:alpha=0.5,k=1",
        "lookahead:alpha=0.5,k=1000000",
    ],
    "anchored": [  # a number as the target: no model; target=prompt: ANCHORED_PROMPT_SPECS
        f"anchored:target={TINY},strength={HUGE},threshold=-{HUGE},warmup=0",
        f"anchored:target={HUGE},warmup=0",
        "anchored:target=1,strength=0",
        f"anchored:target=1,base={HUGE}",
        f"anchored:target=1,strength={HUGE},threshold={HUGE},warmup=0",
        f"anchored:target=1,strength={HUGE},warmup=1000000",
        f"anchored:target=0.5,strength={HUGE},base=0.5,warmup=0",
    ],
}
#: The predictor's veto: bound to the shipped predictor by vocabulary.
ANCHORED_VETO_SPECS = [
    f"anchored:predictor=shipped,target={TINY},strength={HUGE},threshold=-{HUGE},warmup=0",
    f"anchored:predictor=shipped,target=1,strength={HUGE},warmup=0",
    f"anchored:predictor=shipped,target=0.5,strength={HUGE},base={HUGE},warmup=0",
]
#: target=prompt runs the bound model over the prompt: bound to a tiny random Llama here.
ANCHORED_PROMPT_SPECS = [
    "anchored",
    f"anchored:offset=-{HUGE},strength={HUGE},threshold=-{HUGE},warmup=0",
    f"anchored:offset={HUGE},strength={HUGE},warmup=0",
]
MODEL_BOUND = ("calibrated", "lookahead")
SMOLLM2_VOCAB = 49152


def _method(spec: str) -> str:
    name = spec.split(":", 1)[0]
    return name if name in EXTREMES else "chain"


ROW_SPECS = [s for m, specs in EXTREMES.items() if m not in MODEL_BOUND for s in specs]
BOUND_SPECS = list(EXTREMES["calibrated"]) + ANCHORED_VETO_SPECS  # shipped predictor by vocab
LOOKAHEAD_SPECS = list(EXTREMES["lookahead"])


def test_every_registered_method_is_covered():
    assert set(methods()) <= set(EXTREMES), set(methods()) - set(EXTREMES)


@pytest.mark.parametrize("spec", ROW_SPECS + BOUND_SPECS + LOOKAHEAD_SPECS + ANCHORED_PROMPT_SPECS)
def test_spec_round_trips(spec):
    d = parse(spec)
    again = parse(str(d))
    assert str(again) == str(d)


# ---- inputs --------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def logits_rows(draw, vocab: int | None = None, max_batch: int = 4):
    """A batch of finite-or--inf logits in one of the three float dtypes, with the hard cases:
    huge magnitudes (±60000 fits float16), ties at the top, one finite token, all -inf rows."""
    dtype = draw(st.sampled_from(DTYPES))
    top = {torch.float16: 6.0e4, torch.bfloat16: 1e30, torch.float32: 1e30}[dtype]
    v = vocab or draw(st.integers(1, 48))
    n = draw(st.integers(1, max_batch))
    rows = []
    for _ in range(n):
        kind = draw(st.sampled_from(["normal", "scaled", "huge", "ties", "one", "dead", "peaked"]))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(v, generator=g, dtype=torch.float64)
        if kind == "scaled":
            x = x * draw(st.sampled_from([1e-6, 0.1, 3.0, 30.0, 300.0]))
        elif kind == "huge":
            x = x.clamp(-1, 1) * top
        elif kind == "ties":
            x[: max(1, v // 2)] = x.max()
        elif kind == "one":
            x = torch.full((v,), -math.inf, dtype=torch.float64)
            x[int(torch.randint(v, (1,), generator=g))] = draw(st.sampled_from([0.0, -top, top]))
        elif kind == "dead":
            x = torch.full((v,), -math.inf, dtype=torch.float64)
        elif kind == "peaked":
            x[int(torch.randint(v, (1,), generator=g))] = x.max() + 40.0
        if kind not in ("one", "dead") and v > 2 and draw(st.booleans()):
            x[int(torch.randint(v, (1,), generator=g))] = -math.inf  # a masked token
        rows.append(x)
    return torch.stack(rows).to(dtype)


def _check_contract(spec: str, x: torch.Tensor, out: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == x.shape, spec
    assert not torch.isnan(out).any(), f"{spec}: NaN in {out}"
    assert not (out == math.inf).any(), f"{spec}: +inf in {out}"
    dead_in = (x.float() == -math.inf).all(-1)
    dead_out = (out == -math.inf).all(-1)
    assert torch.equal(dead_in, dead_out), f"{spec}: rows emptied {dead_out & ~dead_in}"
    # a peaked row (top token >= 40 nats above the rest) keeps its argmax, except under XTC,
    # whose rule is to remove the top choices
    xf = x.float()
    top2 = xf.topk(min(2, xf.shape[-1]), dim=-1).values
    if xf.shape[-1] >= 2 and "xtc" not in spec:
        peaked = (top2[:, 0] - top2[:, 1] >= 40.0) & torch.isfinite(top2[:, 0])
        if peaked.any():
            arg = xf.argmax(-1)
            kept = out.gather(-1, arg[:, None]).squeeze(-1) > -math.inf
            assert bool(kept[peaked].all()), f"{spec}: argmax of a peaked row removed"


def _steps(decoder, x: torch.Tensor, n_steps: int = 3):
    """Apply ``decoder`` for a few steps on the same rows (stateful ones observe the argmax)."""
    decoder.reset(x.shape[0])
    outs = []
    for _ in range(n_steps):
        out = decoder(x)
        outs.append(out)
        decoder.observe(out.argmax(-1))
    return outs


@pytest.mark.parametrize("spec", ROW_SPECS)
@given(x=logits_rows())
def test_row_decoders_keep_the_contract(spec, x):
    for out in _steps(parse(spec), x):
        _check_contract(spec, x, out)


@pytest.mark.parametrize("spec", BOUND_SPECS)
@settings(max_examples=8)
@given(x=logits_rows(vocab=SMOLLM2_VOCAB, max_batch=3))
def test_model_bound_decoders_keep_the_contract(spec, x):
    for out in _steps(parse(spec), x, n_steps=2):
        _check_contract(spec, x, out)


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    return tiny_llama(vocab=40, hidden=16, layers=1, max_positions=64)


@pytest.mark.parametrize("spec", LOOKAHEAD_SPECS + ANCHORED_PROMPT_SPECS)
@settings(max_examples=6)
@given(x=logits_rows(vocab=40, max_batch=3), seed=st.integers(0, 1000))
def test_history_reading_decoders_keep_the_contract(tiny_lm, spec, x, seed):
    """Decoders that run their bound model over input_ids (lookahead on its candidates,
    anchored:target=prompt on the prompt)."""
    ids = torch.randint(0, 40, (x.shape[0], 4), generator=torch.Generator().manual_seed(seed))
    d = parse(spec).bind(tiny_lm)
    d.reset(x.shape[0])
    for _ in range(2):
        out = d(x, ids)
        _check_contract(spec, x, out)
        d.observe(out.argmax(-1))
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)


@pytest.mark.parametrize("spec", ROW_SPECS + BOUND_SPECS[:2])
@settings(max_examples=6)
@given(data=st.data())
def test_hf_processor_keeps_the_contract_over_repeated_generates(spec, data):
    """The transformers adapter, reused for several generate calls (unrelated prompts)."""
    from entcal.decoding import hf

    vocab = SMOLLM2_VOCAB if _method(spec) in MODEL_BOUND else None
    x = data.draw(logits_rows(vocab=vocab, max_batch=3))
    proc = hf.logits_processor(spec)
    n = x.shape[0]
    for call in range(2):
        ids = torch.full((n, 3 + call), 7 + call, dtype=torch.long)  # never extends the last
        for _ in range(2):
            out = proc(ids, x)
            _check_contract(spec, x, out)
            ids = torch.cat([ids, out.argmax(-1, keepdim=True)], 1)


@pytest.mark.parametrize("spec", ROW_SPECS[:: max(1, len(ROW_SPECS) // 12)] + BOUND_SPECS[:2])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_input_is_an_error_naming_the_row(spec, bad):
    v = SMOLLM2_VOCAB if _method(spec) in MODEL_BOUND else 8
    x = torch.randn(3, v)
    x[1, 2] = bad
    d = parse(spec)
    d.reset(3)
    with pytest.raises(ValueError, match=r"row"):
        d(x)
    with pytest.raises(ValueError, match=r"row"):
        apply_rows(x, [d, d, d])


@given(
    specs=st.lists(st.sampled_from(ROW_SPECS), min_size=2, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_mixed_batch_rows_equal_each_row_alone(specs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(specs), 32, generator=g) * 3.0
    decoders = [parse(s) for s in specs]
    alone_decoders = [parse(s) for s in specs]
    for d in decoders + alone_decoders:
        d.reset(1)
    for _ in range(3):  # stateful decoders advance the same way in both
        mixed = apply_rows(x, decoders)
        alone = torch.cat([d(x[i : i + 1]) for i, d in enumerate(alone_decoders)])
        torch.testing.assert_close(mixed, alone, rtol=0, atol=0, equal_nan=False)
        tokens = alone.argmax(-1)
        for i, (d, e) in enumerate(zip(decoders, alone_decoders, strict=True)):
            d.observe(tokens[i : i + 1])
            e.observe(tokens[i : i + 1])


@pytest.mark.parametrize("spec", ["temperature=0.5,top_p=0.9", "mirostat", "edt", "typical=0.5"])
def test_large_batch_and_large_vocabulary(spec):
    """Batch 257 and vocabulary 262144 (Gemma 3's) in float16 and bfloat16."""
    for n, v in ((257, 64), (2, 262144)):
        for dtype in (torch.float16, torch.bfloat16):
            x = (torch.randn(n, v) * 8).to(dtype)
            x[0] = 6.0e4 if dtype == torch.float16 else 1e30
            x[0, 1:] = -6.0e4 if dtype == torch.float16 else -1e30
            for out in _steps(parse(spec), x, n_steps=2):
                _check_contract(spec, x, out)


# ---- the reported cases, with their right values -------------------------------------------


def test_temperature_underflow_is_greedy_not_nan():
    """issue 13, case 1: temperature=1e-300 on [0, 1, -1] gave [nan, inf, -inf]."""
    inf = math.inf
    for spec in ("temperature=1e-300", "mirostat:temperature=1e-300"):
        d = parse(spec)
        d.reset(1)
        out = d(torch.tensor([[0.0, 1.0, -1.0]]))
        assert out.tolist() == [[-inf, 0.0, -inf]], spec
    out = parse(f"temperature={2.0**-126!r}")(torch.tensor([[2.0, 4.0, 3.0]]))
    assert out.tolist() == [[-inf, 0.0, -inf]]


def test_temperature_keeps_the_distribution_where_it_does_not_overflow():
    x = torch.tensor([[1e30, 1e30 - 1e24, 0.0], [2.0, 4.0, 3.0]])
    out = parse("temperature=1e-9")(x)
    assert out[0].tolist()[0] == 0.0 and out[0, 2] == -math.inf
    # the second row is safe: plain division, bit for bit transformers' warper
    assert torch.equal(out[1], x[1] / 1e-9)


def test_all_inf_row_stays_all_inf_through_calibrated():
    """issue 13, case 3 (issue 12): calibrated on an all -inf row gave all NaN."""
    x = torch.randn(3, SMOLLM2_VOCAB)
    x[1] = -math.inf
    d = parse("calibrated")
    d.reset(3)
    out = d(x)
    assert (out[1] == -math.inf).all() and torch.isfinite(out[[0, 2]]).all()
    d2 = parse("calibrated")
    d2.reset(3)
    out2 = apply_rows(x, [d2, d2, d2])
    assert (out2[1] == -math.inf).all()


def test_mirostat_state_does_not_leak_into_the_next_generate():
    """issue 13, case 2: a reused hf processor saw a new prompt one token longer than its last
    sequence as a continuation (mu carried over, the prompt's last token observed)."""
    from entcal.decoding import hf

    proc = hf.logits_processor("mirostat:tau=3.0,eta=0.5")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (2, 5), generator=g)
    for _ in range(6):
        out = proc(ids, torch.randn(2, 32, generator=g) * 4)
        ids = torch.cat([ids, torch.multinomial(out.softmax(-1), 1, generator=g)], 1)
    assert not torch.allclose(proc.decoder.mu_, torch.full((2,), 6.0, dtype=torch.float64))
    new_prompt = torch.randint(0, 32, (2, ids.shape[1] + 1), generator=g)  # one token longer
    scores = torch.randn(2, 32, generator=g) * 4
    fresh = hf.logits_processor("mirostat:tau=3.0,eta=0.5")
    out = proc(new_prompt, scores)
    assert torch.equal(out, fresh(new_prompt, scores))
    assert proc.decoder.mu_.tolist() == [6.0, 6.0]  # 2·tau: a fresh generation
    # a true continuation (the ids extend the last ones by kept tokens) keeps the state
    cont = torch.cat([new_prompt, out.argmax(-1, keepdim=True)], 1)
    proc(cont, scores)
    assert proc.decoder.mu_.tolist() != [6.0, 6.0]


# ---- seeded results never depend on the batch (issue 13, case 4) ----------------------------


def test_a_prompts_generation_does_not_depend_on_its_batch():
    from entcal import generate
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=16, seed=0)
    model, tok = chain.as_model()
    a, b = chain.sample(2, 6, seed=1).tolist()
    for spec in ("ancestral", "top_p=0.8", "mirostat:tau=1.5"):
        alone = generate(model, tok, [a], spec, max_new_tokens=24, seed=0, n=2)
        behind = generate(model, tok, [b, a], spec, max_new_tokens=24, seed=0, n=2)
        split = generate(model, tok, [b, a], spec, max_new_tokens=24, seed=0, n=2, batch_size=1)
        for i in range(2):
            assert alone[i].token_ids == behind[2 + i].token_ids == split[2 + i].token_ids
            assert torch.equal(alone[i].logprob, behind[2 + i].logprob)
        assert alone[0].token_ids != alone[1].token_ids  # the samples of a prompt differ
        other = generate(model, tok, [a], spec, max_new_tokens=24, seed=1, n=2)
        assert other[0].token_ids != alone[0].token_ids  # and the seed matters
        twice = generate(model, tok, [a, b, a], spec, max_new_tokens=24, seed=0)
        assert twice[0].token_ids == alone[0].token_ids  # the first occurrence is "a"
        assert twice[2].token_ids != twice[0].token_ids  # a repeat gets its own sample


def test_sampling_by_inverse_cdf_has_the_right_distribution():
    from entcal.generation import sample_rows, sequence_uniforms

    logits = torch.tensor([[0.0, math.log(3.0), -math.inf, math.log(6.0)]]).expand(20000, 4)
    keys = torch.stack([torch.arange(20000), torch.zeros(20000, dtype=torch.long)], 1)
    tokens = sample_rows(logits, sequence_uniforms(0, keys, step=0))
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert freq[2] == 0  # a masked token is never drawn
    torch.testing.assert_close(
        freq, torch.tensor([0.1, 0.3, 0.0, 0.6], dtype=torch.float64), atol=0.012, rtol=0
    )


def test_compare_results_do_not_depend_on_batch_size(tmp_path):
    from entcal.eval.compare import CompareConfig, run_compare
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(8, seed=1)
    model, tok = chain.as_model()
    prompts = chain.sample(6, 4, seed=0)
    human = chain.sample(6, 12, start=prompts[:, -1], seed=1)
    results = []
    for bs in (1, 32):
        cfg = CompareConfig(
            out=tmp_path / f"bs{bs}", model="markov-8", decoders="ancestral; mirostat:tau=1.5",
            n=6, length=12, prompt_tokens=4, batch_size=bs, progress=False, plots=False,
        )  # fmt: skip
        res = run_compare(cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()))
        res.pop("timing")
        res.pop("config", None)
        results.append(res)
    assert results[0] == results[1]


def test_apply_rows_names_bad_rows_and_isolated_keeps_the_rest():
    from entcal.decoding import apply_rows_isolated

    x = torch.randn(4, 16)
    x[2, 5] = math.nan
    decoders = [parse("top_p=0.5"), parse("min_p=0.1"), parse("top_p=0.5"), None]
    with pytest.raises(ValueError, match=r"row.*\b2\b"):
        apply_rows(x, decoders)
    out, failed = apply_rows_isolated(x, decoders)
    assert list(failed) == [2] and "NaN" in failed[2]
    alone = [parse("top_p=0.5")(x[[0]]), parse("min_p=0.1")(x[[1]])]
    assert torch.equal(out[0], alone[0][0]) and torch.equal(out[1], alone[1][0])
    assert torch.equal(out[3], x[3]) and torch.isnan(out[2, 5])

    class Broken(type(parse("mirostat"))):
        @classmethod
        def _apply_group(cls, decoders, logits, input_ids):
            raise RuntimeError("boom")

    y = torch.randn(3, 16)
    out, failed = apply_rows_isolated(y, [parse("top_p=0.5"), Broken(), None])
    assert list(failed) == [1] and "boom" in failed[1]
    assert torch.equal(out[0], parse("top_p=0.5")(y[[0]])[0]) and torch.equal(out[1], y[1])
