"""The shipped SmolLM2 predictor on the real model: generation, teacher-forced check, bad models."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_shipped_predictor_loads_and_matches_the_model(smollm2):
    from entcal.calibrators.predictor import FutureEntropyPredictor, shipped_predictor_path

    model, _ = smollm2
    folder = shipped_predictor_path("smollm2-135m")
    pred = FutureEntropyPredictor.load(folder, model=model)
    meta = pred.meta_
    assert meta["fingerprint"]["name"] == "smollm2-135m"
    assert meta["fingerprint"]["vocab_size"] == 49152
    assert meta["kind"] in ("ridge", "mlp")
    assert "r2_heldout" in meta["scores"]
    alpha = meta["alpha"]
    assert alpha["default"] in ("global", "buckets")
    assert -1 < alpha["global"] < 10
    # the shipped artifact stays small (package data)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 3_000_000


def test_calibrated_generation_equals_teacher_forced_application(smollm2):
    """entcal.generate with spec 'calibrated' samples exactly p_α of the shipped predictor."""
    from entcal.decoding import parse
    from entcal.decoding.calibrated import calibrated_logprobs
    from entcal.generation import generate

    model, tok = smollm2
    dec = parse("calibrated")
    assert str(dec) == "calibrated"
    dec.bind(model)
    prompts = ["The os module provides", "Lists are mutable sequences"]
    gens = generate(model, tok, prompts, decoder=dec, max_new_tokens=6, seed=0)
    for g, prompt in zip(gens, prompts):
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        full = torch.tensor([ids + g.token_ids])
        with torch.inference_mode():
            logits = model(input_ids=full).logits[0, len(ids) - 1 : -1].float()
        pos = torch.arange(len(g.token_ids))
        lp = calibrated_logprobs(logits, dec.predictor, pos, dec.alpha_rows(pos))
        got = lp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert torch.allclose(got, g.logprob, atol=2e-3)
        ent = -(lp.exp() * lp.clamp_min(-1e4)).sum(-1)
        assert torch.allclose(ent, g.entropy, atol=2e-3)
        # no truncation: every token keeps a positive probability
        assert bool(torch.isfinite(lp).all())


def test_predictor_for_another_model_fails_before_generation(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from entcal.calibrators.predictor import PredictorFileError
    from entcal.decoding import parse

    torch.manual_seed(0)
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(PredictorFileError, match="smollm2-135m"):
        parse("calibrated").bind(small)
