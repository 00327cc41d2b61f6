"""List decoder: parameter checks, vectorized helpers against brute force, the batched KV-cache
decoder against a naive reference that recomputes every candidate from scratch, and the real model."""

from __future__ import annotations

import math

import pytest
import torch

from entcal.studies.list_decoder import ListDecoder
from entcal.studies.list_rules import cap_per_group, check_list_params, select_children

SHARPEN = 12.0  # the tiny Llamas' lm_head scale: peaked distributions, several tokens pass θ


def _tiny_gemma3(seed: int = 0, vocab: int = 40):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,  # shorter than the prompts: the sliding cache layers really slide
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(15.0)
    return model


def _naive_list_decode(model, prompt, theta, bound, cap, steps, eos=None):
    """Reference: one full forward per candidate per step, Python loops, no cache."""
    live = [([], 0.0)]
    finished = []
    for _ in range(steps):
        children = []
        for seq, score in live:
            ids = torch.tensor([list(prompt) + seq])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            for v in range(lp.shape[0]):
                x = lp[v].item()
                if theta is not None and x < math.log(theta):
                    continue
                if bound is not None and score + x < bound:
                    continue
                children.append(([*seq, v], score + x))
        children.sort(key=lambda c: -c[1])
        children = children[:cap]
        if not children:
            return finished or live, True
        finished += [c for c in children if eos is not None and c[0][-1] == eos]
        live = [c for c in children if eos is None or c[0][-1] != eos]
        if not live:
            break
    return finished + live, False


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("theta", [0.0, 1.0, 1.5, -0.2, float("nan"), "0.1", True])
def test_theta_outside_open_unit_interval_is_rejected(theta):
    with pytest.raises(ValueError, match="theta"):
        check_list_params(theta, None, 4)


@pytest.mark.parametrize("cap", [0, -3, 2.5, None])
def test_list_cap_below_one_is_rejected(cap):
    with pytest.raises(ValueError, match="max_list"):
        check_list_params(0.1, None, cap)


def test_bound_and_rule_checks(tiny_llama):
    with pytest.raises(ValueError, match="min_total_logprob"):
        check_list_params(None, 0.5, 4)
    with pytest.raises(ValueError, match="theta"):
        check_list_params(None, None, 4)
    model = tiny_llama(vocab=40, lm_head_scale=SHARPEN)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ListDecoder(model, theta=0.1, max_new_tokens=0)
    with pytest.raises(ValueError, match="theta"):
        ListDecoder(model, theta=1.0)
    with pytest.raises(ValueError, match="max_list"):
        ListDecoder(model, theta=0.1, max_list=0)


# --------------------------------------------------------------------------- helpers


def test_select_children_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        R, V = 7, 50
        logits = torch.randn(R, V, generator=g) * (1 + trial % 5)
        lp = torch.log_softmax(logits, -1)
        total = -torch.rand(R, generator=g) * 4
        theta = [None, 0.02, 0.1, 0.3][trial % 4]
        bound = [-3.0, None, -5.0, None][trial % 4]
        if theta is None and bound is None:
            bound = -2.0
        k = math.floor(1 / theta + 1e-9) if theta is not None else V
        counts, parent, token, tok_lp = select_children(
            lp, total, theta=theta, min_total_logprob=bound, k=k
        )
        want = set()
        for r in range(R):
            for v in range(V):
                ok = (theta is None or lp[r, v] >= math.log(theta)) and (
                    bound is None or total[r] + lp[r, v] >= bound
                )
                if ok:
                    want.add((r, v))
        assert set(zip(parent.tolist(), token.tolist())) == want
        assert counts.tolist() == [sum(1 for w in want if w[0] == r) for r in range(R)]
        assert torch.allclose(tok_lp, lp[parent, token])


def test_cap_per_group_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = int(torch.randint(0, 60, (1,), generator=g))
        group = torch.randint(0, 5, (n,), generator=g)
        key = torch.randn(n, generator=g)
        cap = int(torch.randint(1, 8, (1,), generator=g))
        keep = cap_per_group(group, key, cap)
        for gr in range(5):
            idx = (group == gr).nonzero().flatten()
            best = set(idx[key[idx].argsort(descending=True)[:cap]].tolist())
            assert set(idx[keep[idx]].tolist()) == best


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize(
    ("theta", "bound", "cap"),
    [(0.05, None, 5), (None, -4.0, 6), (0.02, -6.0, 4), (0.2, None, 1)],
)
def test_cached_batched_decoder_equals_naive_reference(tiny_llama, theta, bound, cap):
    model = tiny_llama(vocab=40, seed=2, lm_head_scale=SHARPEN)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]  # different lengths: left padding
    dec = ListDecoder(
        model,
        theta=theta,
        min_total_logprob=bound,
        max_list=cap,
        max_new_tokens=5,
        eos_token_id=None,
    )
    out = dec.decode(prompts)
    for g, prompt in enumerate(prompts):
        ref, ref_extinct = _naive_list_decode(model, prompt, theta, bound, cap, 5)
        assert out.extinct[g] == ref_extinct
        got = sorted(zip(out.candidates[g], out.scores[g]), key=lambda c: -c[1])
        ref = sorted(ref, key=lambda c: -c[1])
        assert [c for c, _ in got] == [c for c, _ in ref]
        assert torch.allclose(
            torch.tensor([s for _, s in got]), torch.tensor([s for _, s in ref]), atol=1e-4
        )
        assert all(size <= cap for size in out.list_sizes[g])


def test_sliding_window_cache_reorder_gemma3():
    """Gemma 3 mixes sliding-window and full cache layers; prompts longer than the window."""
    model = _tiny_gemma3(seed=3)
    prompts = [[2, 5, 7, 11, 13, 17, 19], [3, 4, 6, 8, 10, 12]]
    dec = ListDecoder(model, theta=0.05, max_list=4, max_new_tokens=5, eos_token_id=None)
    out = dec.decode(prompts)
    for g, prompt in enumerate(prompts):
        ref, _ = _naive_list_decode(model, prompt, 0.05, None, 4, 5)
        ref = sorted(ref, key=lambda c: -c[1])
        assert [c for c in out.candidates[g]] == [c for c, _ in ref]
        assert torch.allclose(
            torch.tensor(out.scores[g]), torch.tensor([s for _, s in ref]), atol=1e-4
        )


def test_eos_finishes_candidates_and_verifier_chooses(tiny_llama):
    model = tiny_llama(vocab=40, seed=4, lm_head_scale=SHARPEN)
    dec = ListDecoder(model, theta=0.05, max_list=6, max_new_tokens=5, eos_token_id=None)
    base = dec.decode([[1, 2, 3]])
    # Make the first token of the 2nd-best candidate the EOS: its branch stops there.
    eos = base.candidates[0][1][0]
    dec_eos = ListDecoder(model, theta=0.05, max_list=6, max_new_tokens=5, eos_token_id=eos)
    out = dec_eos.decode([[1, 2, 3]])
    ref, _ = _naive_list_decode(model, [1, 2, 3], 0.05, None, 6, 5, eos=eos)
    assert sorted(map(tuple, out.candidates[0])) == sorted(tuple(c) for c, _ in ref)
    assert any(c == [eos] for c in out.candidates[0])
    # Verifier: prefer candidates containing a given token; ties by log-probability.
    target = out.candidates[0][-1][-1]
    dec_v = ListDecoder(
        model,
        theta=0.05,
        max_list=6,
        max_new_tokens=5,
        eos_token_id=eos,
        verifier=lambda ids: target in ids,
    )
    chosen = dec_v.decode([[1, 2, 3]])
    assert target in chosen.best[0]
    fits = [s for c, s in zip(out.candidates[0], out.scores[0]) if target in c]
    assert chosen.best_score[0] == pytest.approx(max(fits))
    assert base.best[0] == base.candidates[0][0]  # default: highest total log-probability


def test_extinction_returns_last_list(tiny_llama):
    model = tiny_llama(vocab=40, seed=5, lm_head_scale=0.5)  # nearly flat: nothing reaches θ = 0.3
    out = ListDecoder(model, theta=0.3, max_list=4, max_new_tokens=4, eos_token_id=None).decode(
        [[1, 2]]
    )
    assert out.extinct == [True]
    assert out.candidates[0] == [[]] and out.best[0] == []
    assert out.list_sizes[0] == [0]


@pytest.mark.slow
def test_real_model_scores_match_full_forward(smollm2):
    model, tok = smollm2
    dec = ListDecoder(model, tok, theta=0.1, max_list=6, max_new_tokens=8)
    out = dec.decode(["The Python interpreter reads", "A list is a"])
    for g, prompt in enumerate(["The Python interpreter reads", "A list is a"]):
        ids = tok(prompt)["input_ids"]
        assert 1 <= len(out.candidates[g]) <= 6 + 6 * 8  # live cap plus finished ones
        for cand, score in list(zip(out.candidates[g], out.scores[g]))[:3]:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids + cand])).logits[0].float(), -1)
            ref = sum(lp[len(ids) - 1 + i, t].item() for i, t in enumerate(cand))
            assert score == pytest.approx(ref, abs=2e-3)
            # every kept token passed the threshold
            assert all(lp[len(ids) - 1 + i, t].item() >= math.log(0.1) for i, t in enumerate(cand))
        assert out.best_score[g] == max(out.scores[g])
