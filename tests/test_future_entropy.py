"""Monte-Carlo future entropy: known answers on a Markov source, KV-cache sharing vs recompute."""

from __future__ import annotations

import pytest
import torch

from entcal.calibrators.montecarlo import (
    batched_rollout_entropy,
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


def test_shared_cache_rollout_equals_full_recompute(tiny_llama):
    """Cropping + repeating one prefix cache gives the same entropies as recomputing each row."""
    model = tiny_llama(vocab=48)
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
    from entcal.calibrators.paper_formula import adjusted_logprobs
    from entcal.decoding.ops import entropy_varentropy
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
    expected = entropy_varentropy(adjusted_logprobs(lp, lp - phi, 0.7))[0]
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


def test_batched_rollouts_match_analytic_future_entropy_on_markov_source():
    """Many prefixes (padded to one batch) x candidates: Markov futures depend on the token only."""
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=10, scale=1.5, seed=5)
    model, _ = chain.as_model()
    horizon, samples = 4, 300
    prefixes = [[3, 7, 1, 5], [2, 2], [9, 0, 4]]  # unequal lengths: the padded path
    cand = torch.arange(10).repeat_interleave(samples).repeat(3, 1)
    gen = torch.Generator().manual_seed(0)
    totals = batched_rollout_entropy(model, prefixes, cand, torch.zeros(3), horizon, gen)
    totals = totals.view(3, 10, samples)
    mean, se = totals.mean(-1), totals.std(-1) / samples**0.5
    z = (mean - chain.future_entropy(horizon)) / se
    assert z.abs().max() < 4.5, z
    assert float((z**2).mean()) < 2.5


@pytest.mark.parametrize("lengths", [(9, 9, 9), (13, 6, 9)])
def test_batched_rollouts_equal_full_recompute(tiny_llama, lengths):
    """Shared prefix caches, repeated over candidates (and left padding where the prefixes
    differ in length) give the entropies and samples of recomputing every row from scratch."""
    model = tiny_llama(vocab=48, seed=1)
    g = torch.Generator().manual_seed(3)
    prefixes = [torch.randint(0, 48, (n,), generator=g).tolist() for n in lengths]
    cand = torch.randint(0, 48, (3, 4), generator=g)
    position = torch.tensor([0, 5, 2])
    horizon = 5

    def adjust(lp, pos):  # a position-dependent sampled process, as the adjusted model is
        return torch.log_softmax(lp * (1.0 + 0.1 * pos[:, None].float()), -1)

    fast = batched_rollout_entropy(
        model, prefixes, cand, position, horizon, torch.Generator().manual_seed(7), adjust
    )
    from entcal.decoding.ops import entropy_varentropy

    gen = torch.Generator().manual_seed(7)
    seqs = [[*p, int(c)] for p, row in zip(prefixes, cand) for c in row]
    pos = position.repeat_interleave(4)
    slow = torch.zeros(12, dtype=torch.float64)
    with torch.inference_mode():
        for s in range(horizon):
            lp = torch.stack(
                [torch.log_softmax(model(input_ids=torch.tensor([q])).logits[0, -1], -1)
                 for q in seqs]
            )  # fmt: skip
            lp = adjust(lp, pos + 1 + s)
            slow += entropy_varentropy(lp)[0].double()
            if s + 1 < horizon:
                nxt = torch.multinomial(lp.exp(), 1, generator=gen)[:, 0]
                seqs = [[*q, int(t)] for q, t in zip(seqs, nxt)]
    assert torch.allclose(fast.view(-1), slow, atol=1e-4)


def test_batched_rollouts_bad_input(tiny_llama):
    model = tiny_llama(vocab=48)
    with pytest.raises(ValueError, match="horizon"):
        batched_rollout_entropy(model, [[1, 2]], torch.tensor([[3]]), torch.zeros(1), 0)
    with pytest.raises(ValueError, match="non-empty prefixes"):
        batched_rollout_entropy(model, [[1, 2], []], torch.tensor([[3], [4]]), torch.zeros(2), 1)
