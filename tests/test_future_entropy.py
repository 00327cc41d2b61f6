"""Monte-Carlo future entropy: known answers on a Markov source, KV-cache sharing vs recompute."""

from __future__ import annotations

import pytest
import torch

from entcal.calibrators.montecarlo import (
    choose_candidates,
    expand_cache,
    hf_step_fn,
    rollout_entropy,
)


def test_mc_labels_match_analytic_future_entropy_on_markov_source():
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=12, scale=1.5, seed=4)
    model, _ = chain.as_model()
    horizon, samples = 5, 600
    prefix = torch.tensor([[3, 7, 1, 5]])
    with torch.inference_mode():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
    cand = torch.arange(12).repeat_interleave(samples)
    state = expand_cache(cache, prefix.shape[1], cand.shape[0])
    gen = torch.Generator().manual_seed(0)
    totals = rollout_entropy(hf_step_fn(model), state, cand, horizon, gen).view(12, samples)
    mean = totals.mean(1)
    se = totals.std(1) / samples**0.5
    analytic = chain.future_entropy(horizon)
    z = (mean - analytic) / se
    # each label within its standard error (4.5 SE: 12 tests at once), and jointly calibrated
    assert z.abs().max() < 4.5, z
    assert float((z**2).mean()) < 2.5
    # the estimates are informative: the spread of F_k over tokens is far above the noise
    assert float(analytic.std()) > 5 * float(se.max())


def test_horizon_one_is_exact_next_step_entropy():
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=10, seed=1)
    model, _ = chain.as_model()
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([[2, 4]]), use_cache=True).past_key_values
    cand = torch.arange(10)
    out = rollout_entropy(hf_step_fn(model), expand_cache(cache, 2, 10), cand, 1)
    assert torch.allclose(out, chain.entropy(), atol=1e-5)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def test_shared_cache_rollout_equals_full_recompute():
    """Cropping + repeating one prefix cache gives the same entropies as recomputing each row."""
    model = _tiny_llama()
    ids = torch.randint(0, 48, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    length = 13  # a shorter prefix than the cache holds: exercises the crop
    cand = torch.tensor([5, 9, 9, 31])
    horizon = 4
    fast = rollout_entropy(
        hf_step_fn(model), expand_cache(cache, length, 4), cand, horizon,
        torch.Generator().manual_seed(1),
    )  # fmt: skip

    def recompute(tokens, seqs):
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        logits = model(input_ids=seqs).logits[:, -1].float()
        return torch.log_softmax(logits, -1), seqs

    with torch.inference_mode():
        slow = rollout_entropy(
            recompute, ids[:, :length].repeat(4, 1), cand, horizon,
            torch.Generator().manual_seed(1),
        )  # fmt: skip
    assert torch.allclose(fast, slow, atol=1e-4)


def test_adjusted_rollouts_sum_entropies_of_the_adjusted_model():
    from entcal.calibrators.ops import adjusted_logprobs, entropy_stats
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=8, seed=2)
    model, _ = chain.as_model()
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([[1]]), use_cache=True).past_key_values
    phi = torch.linspace(-3, 3, 8)

    def adjust(lp, pos):
        return adjusted_logprobs(lp, lp - phi, 0.7)

    out = rollout_entropy(hf_step_fn(model), expand_cache(cache, 1, 8), torch.arange(8), 1,
                          adjust=adjust)  # fmt: skip
    lp = chain.log_transition().float()
    expected = entropy_stats(adjusted_logprobs(lp, lp - phi, 0.7))[0]
    assert torch.allclose(out.float(), expected, atol=1e-5)


def test_choose_candidates_and_bad_horizon():
    lp = torch.log_softmax(torch.randn(100, generator=torch.Generator().manual_seed(0)) * 3, -1)
    gen = torch.Generator().manual_seed(0)
    cand = choose_candidates(lp, human=int(lp.argmin()), top_k=5, n_tail=3, generator=gen)
    top = torch.topk(lp, 5).indices
    assert torch.equal(cand[:5], top)
    assert int(lp.argmin()) in cand.tolist()
    assert len(cand) == 9 and len(set(cand.tolist())) == 9
    with pytest.raises(ValueError, match="horizon"):
        rollout_entropy(lambda t, s: (lp[None], s), None, torch.tensor([0]), 0)
