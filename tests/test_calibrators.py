"""Comparators of the calibrated decoder (lookahead, fitted temperature) on tiny models."""

from __future__ import annotations

import pytest
import torch

from entcal.calibrators.paper_formula import adjusted_logprobs, fill_phi
from entcal.decoding.ops import entropy_varentropy


def _lookahead_reference(model, ids: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        cand = torch.topk(lp, k).indices
        h = torch.empty(ids.shape[0], k)
        for i in range(ids.shape[0]):
            seqs = torch.cat([ids[i].repeat(k, 1), cand[i][:, None]], dim=1)
            nxt = torch.log_softmax(model(input_ids=seqs).logits[:, -1].float(), -1)
            h[i] = entropy_varentropy(nxt)[0]
        phi = fill_phi(lp, cand, torch.ones_like(cand, dtype=torch.bool), h)
        return adjusted_logprobs(lp, phi, alpha)


def test_lookahead_matches_brute_force_over_steps(tiny_llama):
    from entcal.decoding import parse  # lookahead: an entcal.decoders entry point

    model = tiny_llama(vocab=48, max_positions=512)
    d = parse("lookahead:alpha=0.5,k=4")
    assert str(d) == "lookahead:alpha=0.5,k=4" and parse(str(d)) == d
    d.bind(model)
    ids = torch.randint(0, 48, (3, 7), generator=torch.Generator().manual_seed(0))
    d.reset(3)
    for _ in range(3):  # the decoder's own cache is extended step by step
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[:, -1]
        out = d(logits, ids)
        assert torch.allclose(out, _lookahead_reference(model, ids, 4, 0.5), atol=1e-4)
        nxt = torch.multinomial(out.exp(), 1, generator=torch.Generator().manual_seed(1))
        d.observe(nxt[:, 0])
        ids = torch.cat([ids, nxt], dim=1)
    with pytest.raises(ValueError, match="alpha"):
        parse("lookahead")
    with pytest.raises(ValueError, match="k="):
        parse("lookahead:alpha=0.1,k=0")
    with pytest.raises(ValueError, match="input_ids"):
        d(logits)


def test_fitted_temperature_is_one_when_humans_are_the_model():
    """Known answer: if "human" text is sampled from the model itself, EntCE(1) = 0."""
    from entcal.calibrators.temperature import fit_temperature
    from entcal.corpora import TextPair
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=20, scale=1.2, seed=3)
    model, tok = chain.as_model()
    texts = chain.sample(48, 40, seed=5)
    pairs = [TextPair(tuple(t[:8].tolist()), tuple(t[8:].tolist()), i) for i, t in enumerate(texts)]
    fit = fit_temperature(model, tok, pairs, lo=0.6, hi=1.6, tol=0.01, seed=1)
    assert abs(fit.entce) < 0.03
    assert fit.tau == pytest.approx(1.0, abs=0.12)
    assert fit.spec.startswith("temperature=")
    taus = [e[0] for e in fit.evaluations]
    entces = [e[3] for e in fit.evaluations]
    order = sorted(range(len(taus)), key=taus.__getitem__)
    assert [entces[i] for i in order] == sorted(entces)  # EntCE rises with τ
