"""The shipped SmolLM2 predictor on the real model: generation, teacher-forced check, bad models."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_shipped_predictor_loads_and_matches_the_model(smollm2):
    from entcal.calibrators.predictor import FutureEntropyPredictor
    from entcal.calibrators.predictor_file import shipped_predictor_for, shipped_predictor_path

    model, _ = smollm2
    folder = shipped_predictor_path("smollm2-135m")
    assert shipped_predictor_for(model) == folder
    pred = FutureEntropyPredictor.load(folder, model=model)
    meta = pred.meta_
    assert meta["fingerprint"]["name"] == "smollm2-135m"
    assert meta["fingerprint"]["vocab_size"] == 49152
    assert meta["kind"] in ("ridge", "mlp")
    gate = pred.gate_
    assert len(gate["strength"]) == len(gate["bucket_edges"]) + 1
    assert all(g >= 0 for g in gate["strength"]) and max(gate["strength"]) > 0
    # fitted to calibrate its own generations on the training split: within one evaluation's
    # standard error (48 generations of 256 tokens: about 0.1 nats/token), and with the gate the
    # file holds
    report = meta["report"]["gate"]
    assert abs(report["entce"]) <= 0.1
    assert report["strength"] == gate["strength"] and report["threshold"] == gate["threshold"]
    # the shipped artifact stays small (package data)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 2_000_000


def test_calibrated_generation_equals_teacher_forced_scoring(smollm2):
    """What entcal.generate samples with 'calibrated' is exactly what teacher-forced scoring
    (the same decoder fed the same tokens step by step) assigns: one state machine for both."""
    from entcal.decoding import parse
    from entcal.eval import scoring
    from entcal.generation import generate

    model, tok = smollm2
    dec = parse("calibrated").bind(model)
    assert str(dec) == "calibrated"
    prompts = [
        "The os module provides a portable way of using operating system functionality.",
        "Lists are mutable sequences, typically used to store collections of items.",
    ]
    gens = generate(model, tok, prompts, decoder=dec, max_new_tokens=80, seed=0)
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for i, g in zip(ids, gens):  # score each alone: prompts of one batch need equal lengths
        s = scoring.score(model, [i], [g.token_ids], {"c": parse("calibrated").bind(model)})
        got = s.processed["c"]
        assert torch.allclose(got.logprob[0], g.logprob, atol=2e-3)
        assert torch.allclose(got.entropy[0], g.entropy, atol=2e-3)
        assert torch.allclose(s.raw.logprob[0], g.raw_logprob, atol=2e-3)
        # never truncates: the raw model's every token keeps a positive probability
        assert bool(torch.isfinite(got.logprob).all())


def test_predictor_for_another_model_fails_before_generation(smollm2, tiny_llama, tmp_path):
    from entcal.calibrators.predictor_file import PredictorFileError, shipped_predictor_path
    from entcal.decoding import parse
    from entcal.generation import generate

    _, tok = smollm2
    small = tiny_llama(vocab=49152, hidden=16, layers=1, max_positions=2048)
    folder = shipped_predictor_path("smollm2-135m")
    with pytest.raises(PredictorFileError, match="no predictor is shipped"):
        parse("calibrated").bind(small)
    with pytest.raises(PredictorFileError, match="smollm2-135m"):
        generate(small, tok, ["hello"], f"calibrated:predictor={folder}", max_new_tokens=2)


def test_binding_again_to_the_same_model_checks_once(smollm2, monkeypatch):
    from entcal.calibrators.predictor import FutureEntropyPredictor
    from entcal.decoding import parse

    model, _ = smollm2
    checks = []
    original = FutureEntropyPredictor.check_model
    monkeypatch.setattr(
        FutureEntropyPredictor,
        "check_model",
        lambda self, m: (checks.append(m), original(self, m))[1],
    )
    d = parse("calibrated")
    assert d.bind(model) is d and d.bind(model) is d
    assert len(checks) == 1
    d.bind(model.config)  # another object: checked again
    assert len(checks) == 2
