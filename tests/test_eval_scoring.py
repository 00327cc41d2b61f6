"""Batched scoring against a per-text reference (tiny random-weight models and the synthetic
chain), on every path: windows, the fallback full-logits path, stateful decoders, the observer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from entcal.decoding import parse
from entcal.eval.scoring import ScoreRequest, distribution_stats, score, score_many
from entcal.synthetic import MarkovChain

VOCAB = 8192  # large enough that a 1 MiB budget forces windows of a few positions


def _tiny_llama(seed: int, cls=None):
    # lm_head_scale: spread the logits so distributions are far from uniform (truncation bites).
    return make_tiny_llama(
        VOCAB, seed=seed, max_positions=96, pad_token_id=0, lm_head_scale=40.0, cls=cls
    )


def _doubled_cls():
    from transformers import LlamaForCausalLM

    class DoubledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    return DoubledLogits


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama(0)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 6)]
    conts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 2, 8, 1, 5)]
    return prompts, conts


def _reference(model, prompt, cont, decoder=None):
    ids = torch.tensor([prompt + cont])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    tgt = torch.tensor(cont)
    if decoder is None:
        proc = logits
    elif decoder.requires_history:
        decoder.reset(1)
        rows = []
        for t in range(len(cont)):
            rows.append(decoder(logits[t : t + 1], ids[:, : len(prompt) + t]))
            decoder.observe(tgt[t : t + 1])
        proc = torch.cat(rows)
    else:
        proc = decoder(logits)
    lp = torch.log_softmax(proc, -1)
    p = lp.exp()
    lp0 = torch.where(p > 0, lp, 0.0)
    h = -(p * lp0).sum(-1)
    v = (p * (lp0 + h[:, None]) ** 2).sum(-1)
    chosen = logits.gather(-1, tgt[:, None])
    rank = (logits > chosen).sum(-1) + 1
    return lp.gather(-1, tgt[:, None]).squeeze(-1), h, v, rank


def _check(model, res, prompts, conts, decoders, tol=2e-4):
    for i, (p, c) in enumerate(zip(prompts, conts)):
        n = len(c)
        lp, h, v, rank = _reference(model, p, c)
        assert torch.allclose(res.raw.logprob[i, :n], lp, atol=tol)
        assert torch.allclose(res.raw.entropy[i, :n], h, atol=tol)
        assert torch.allclose(res.raw.varentropy[i, :n], v, atol=10 * tol)
        assert (res.raw.rank[i, :n] - rank).abs().max() <= 1  # near-ties may swap
        assert (res.raw.logprob[i, n:] == 0).all() and not res.mask[i, n:].any()
        for name, spec in decoders.items():
            lp, h, v, _ = _reference(model, p, c, parse(spec))
            st = res.processed[name]
            fin = torch.isfinite(lp)
            assert torch.equal(torch.isfinite(st.logprob[i, :n]), fin)
            assert torch.allclose(st.logprob[i, :n][fin], lp[fin], atol=tol)
            assert torch.allclose(st.entropy[i, :n], h, atol=tol)
            assert torch.allclose(st.varentropy[i, :n], v, atol=10 * tol)


SPECS = {"t": "temperature=0.7", "p": "top_p=0.8", "m": "mirostat:tau=2.0,eta=0.1"}


@pytest.mark.parametrize("budget", [1 << 20, 1 << 30])
def test_score_matches_per_text_reference(tiny, budget):
    prompts, conts = _data()
    decoders = {k: parse(v) for k, v in SPECS.items()}
    res = score(tiny, prompts, conts, decoders, batch_size=2, memory_budget=budget)
    _check(tiny, res, prompts, conts, SPECS)
    assert res.features is not None and res.features.shape == (5, 32)
    # Truncation excludes some of these random tokens, and the mask says which.
    assert res.processed["p"].excluded(res.mask).any()


def test_fallback_path_when_the_model_transforms_its_logits():
    model = _tiny_llama(0, _doubled_cls())
    prompts, conts = _data(2)
    res = score(model, prompts, conts, {"t": parse("temperature=0.7")}, memory_budget=1 << 20)
    _check(model, res, prompts, conts, {"t": "temperature=0.7"})
    assert res.features is None  # only the fast path sees hidden states


def test_many_requests_share_the_prompt(tiny):
    prompts, conts = _data(3)
    other = [c[::-1] for c in conts]
    a, b = score_many(
        tiny, prompts, [ScoreRequest(conts, {"t": parse("temperature=0.7")}), ScoreRequest(other)]
    )
    alone = score(tiny, prompts, other)
    assert torch.allclose(b.raw.logprob, alone.raw.logprob, atol=1e-5)
    assert b.processed == {}
    _check(tiny, a, prompts, conts, {"t": "temperature=0.7"})


def test_observer_cross_entropy(tiny):
    observer = _tiny_llama(5)
    prompts, conts = _data(4)
    res = score(tiny, prompts, conts, observer=observer, memory_budget=1 << 20, batch_size=3)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        ids = torch.tensor([p + c])
        with torch.inference_mode():
            m = torch.log_softmax(tiny(ids).logits[0, len(p) - 1 : -1], -1)
            o = torch.softmax(observer(ids).logits[0, len(p) - 1 : -1], -1)
        ref = -(o * m).sum(-1)
        assert torch.allclose(res.observer_cross_entropy[i, : len(c)], ref, atol=2e-4)


def test_synthetic_chain_scores_are_analytic():
    chain = MarkovChain.random(10, seed=2, sparsity=0.3)
    model, _ = chain.as_model()
    prompts = chain.sample(6, 4, seed=0)
    conts = chain.sample(6, 12, start=prompts[:, -1], seed=1)
    res = score(model, prompts.tolist(), conts.tolist())
    prev = torch.cat([prompts[:, -1:], conts[:, :-1]], dim=1)
    logp = chain.transition.log()
    assert torch.allclose(res.raw.logprob.double(), logp[prev, conts], atol=1e-5)
    assert torch.allclose(res.raw.entropy.double(), chain.entropy()[prev], atol=1e-5)
    assert torch.allclose(res.raw.varentropy.double(), chain.varentropy()[prev], atol=1e-4)


def test_distribution_stats_edge_cases():
    logits = torch.tensor([[0.0, -float("inf"), 0.0], [1.0, 2.0, 3.0]])
    lp, h, v, rank = distribution_stats(logits, torch.tensor([1, 2]), rank=True)
    assert lp[0] == -float("inf") and torch.isclose(h[0], torch.log(torch.tensor(2.0)))
    assert v[0].abs() < 1e-6 and rank.tolist() == [3, 1]
    with pytest.raises(ValueError, match="NaN"):
        distribution_stats(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no finite"):
        distribution_stats(torch.full((1, 3), -float("inf")), torch.tensor([0]))


def test_bad_input(tiny):
    prompts, conts = _data()
    with pytest.raises(ValueError, match="empty"):
        score(tiny, [[], *prompts[1:]], conts)
    with pytest.raises(ValueError, match="one per prompt"):
        score(tiny, prompts, conts[:-1])
    with pytest.raises(ValueError, match="context of 96"):
        score(tiny, prompts, [[1] * 95] * len(prompts))
    with pytest.raises(ValueError, match="batch_size"):
        score(tiny, prompts, conts, batch_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        score(tiny, prompts, conts, memory_budget=10)
    broken = _tiny_llama(0)
    with torch.no_grad():
        broken.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        score(broken, prompts, conts)


def test_gemma3_softcap_and_sliding_window_fast_path():
    """A tiny random Gemma 3 (sliding-window layers, final logit soft-capping, vocabulary 262144
    as the real one): the fast path reproduces the model's own logits, windows stay bounded."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4,
        final_logit_softcapping=5.0, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 262144, (n,), generator=g).tolist() for n in (6, 3)]
    conts = [torch.randint(1, 262144, (n,), generator=g).tolist() for n in (7, 9)]
    res = score(model, prompts, conts, {"t": parse("temperature=0.7")}, memory_budget=1 << 24)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        ids = torch.tensor([p + c])
        with torch.inference_mode():
            logits = model(ids).logits[0, len(p) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        assert torch.allclose(res.raw.logprob[i, : len(c)], lp, atol=1e-4)
        lpt = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        assert torch.allclose(res.processed["t"].logprob[i, : len(c)], lpt, atol=1e-4)
    assert res.features is not None  # the fast path was taken (soft-capping reproduced)
