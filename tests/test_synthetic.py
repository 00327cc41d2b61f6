"""The synthetic Markov-chain source: analytic quantities and the causal-LM wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from entcal import generate
from entcal.decoding import parse
from entcal.synthetic import MarkovChain, MarkovChainLM, MarkovChainTokenizer


@pytest.fixture(scope="module")
def chain() -> MarkovChain:
    return MarkovChain.random(12, seed=3)


def test_entropy_and_varentropy_match_direct_sums(chain):
    p = chain.transition
    for u in range(chain.vocab_size):
        row = p[u]
        h = -sum(float(x) * math.log(float(x)) for x in row if x > 0)
        v = sum(float(x) * (math.log(float(x)) + h) ** 2 for x in row if x > 0)
        assert chain.entropy()[u].item() == pytest.approx(h, abs=1e-12)
        assert chain.varentropy()[u].item() == pytest.approx(v, abs=1e-10)


def test_stationary_distribution_and_entropy_rate(chain):
    pi = chain.stationary()
    assert torch.allclose(pi @ chain.transition, pi, atol=1e-12)
    assert pi.sum().item() == pytest.approx(1.0)
    assert chain.entropy_rate() == pytest.approx(float(pi @ chain.entropy()))


def test_periodic_chain_stationary():
    flip = MarkovChain(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), initial=torch.tensor([1.0, 0.0]))
    assert torch.allclose(flip.stationary(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert flip.entropy_rate() == 0.0


def test_state_distribution_and_future_entropy_by_recursion(chain):
    last = torch.tensor([0, 5, 5, 7])
    dist = chain.state_distribution(last, 6)
    start = torch.zeros(chain.vocab_size, dtype=torch.float64)
    start[0], start[5], start[7] = 0.25, 0.5, 0.25
    assert torch.allclose(dist[0], start)
    assert torch.allclose(dist[3], start @ torch.linalg.matrix_power(chain.transition, 3))
    # F_k(v) = H(v) + Σ_u P[v, u] F_{k-1}(u)
    f3, f2 = chain.future_entropy(3), chain.future_entropy(2)
    assert torch.allclose(f3, chain.entropy() + chain.transition @ f2)
    assert torch.equal(chain.future_entropy(0), torch.zeros(chain.vocab_size, dtype=torch.float64))


def test_processed_chain_is_the_decoders_distribution(chain):
    q = chain.processed(parse("temperature=0.5"))
    expected = torch.softmax(chain.transition.log() / 0.5, -1)
    assert torch.allclose(q.transition, expected, atol=1e-6)
    top = chain.processed(parse("top_k=2"))
    assert ((top.transition > 0).sum(-1) == 2).all()
    # Cross-entropy of text from P scored by the truncated chain is infinite.
    assert torch.isinf(chain.cross_entropy(top)).all()
    assert torch.allclose(chain.cross_entropy(chain), chain.entropy())


def test_stateful_decoder_is_refused(chain):
    with pytest.raises(ValueError, match="history"):
        chain.processed(parse("mirostat"))


def test_model_logits_are_log_transition(chain):
    model, tok = chain.as_model()
    assert isinstance(model, MarkovChainLM) and isinstance(tok, MarkovChainTokenizer)
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    with torch.inference_mode():
        logits = model(ids).logits
    expected = chain.transition.log().float()[ids]
    assert torch.allclose(torch.log_softmax(logits, -1), expected, atol=1e-5)
    assert model.get_decoder() is model.model
    assert tok.decode([3, 1, 4]) == "s3 s1 s4"
    assert tok("s3 s1 s4")["input_ids"] == [3, 1, 4]


def test_generate_entropies_are_the_analytic_ones(chain):
    """Through entcal.generate (transformers' generate with the KV cache): the entropy recorded
    at each step is exactly H_Q of the previous token, and the per-step mean matches E[H_t]."""
    model, tok = chain.as_model()
    prompts = chain.sample(300, 6, seed=1)
    dec = parse("temperature=0.7")
    q = chain.processed(dec)
    out = generate(model, tok, prompts.tolist(), decoder=dec, max_new_tokens=24, seed=0)
    toks = torch.tensor([g.token_ids for g in out])
    ent = torch.stack([g.entropy for g in out]).double()
    prev = torch.cat([prompts[:, -1:], toks[:, :-1]], dim=1)
    assert torch.allclose(ent, q.entropy()[prev], atol=1e-5)
    raw = torch.stack([g.raw_entropy for g in out]).double()
    assert torch.allclose(raw, chain.entropy()[prev], atol=1e-5)
    analytic = q.expected_entropy_per_step(prompts[:, -1], 24)
    se = ent.std(0) / math.sqrt(ent.shape[0])
    assert ((ent.mean(0) - analytic).abs() < 4 * se + 1e-6).all()


def test_bad_input():
    with pytest.raises(ValueError, match="square"):
        MarkovChain(torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match="sum to 1"):
        MarkovChain(torch.ones(3, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        MarkovChain.random(1)
    with pytest.raises(ValueError, match="sparsity"):
        MarkovChain.random(4, sparsity=1.0)
    with pytest.raises(ValueError, match="steps"):
        MarkovChain.random(4).expected_entropy_per_step(None, 0)
    with pytest.raises(ValueError, match="symbol"):
        MarkovChainTokenizer(4)("s9")
