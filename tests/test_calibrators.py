"""Comparators (lookahead, fitted temperature) and the training pipeline on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from entcal.calibrators.ops import adjusted_logprobs, entropy_stats, fill_phi


def _tiny_llama(vocab: int = 48, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


def _lookahead_reference(model, ids: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        cand = torch.topk(lp, k).indices
        h = torch.empty(ids.shape[0], k)
        for i in range(ids.shape[0]):
            seqs = torch.cat([ids[i].repeat(k, 1), cand[i][:, None]], dim=1)
            nxt = torch.log_softmax(model(input_ids=seqs).logits[:, -1].float(), -1)
            h[i] = entropy_stats(nxt)[0]
        phi = fill_phi(lp, cand, torch.ones_like(cand, dtype=torch.bool), h)
        return adjusted_logprobs(lp, phi, alpha)


def test_lookahead_matches_brute_force_over_steps():
    import entcal.calibrators.decoder  # noqa: F401  (registers lookahead; see the report)
    from entcal.decoding import parse

    model = _tiny_llama()
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


@pytest.mark.parametrize("horizon", [1, 3])
def test_train_pipeline_end_to_end_and_resume(tmp_path, smollm2_tokenizer, horizon):
    """The whole recipe on a tiny random model with the real tokenizer and corpus, via the CLI:
    horizon 1 labels per document, longer horizons by rollouts batched over documents."""
    from entcal.calibrators.predictor import FutureEntropyPredictor
    from entcal.cli import main
    from entcal.decoding import parse

    tok = smollm2_tokenizer
    model = _tiny_llama(vocab=len(tok))
    with torch.no_grad():
        # A random LM head gives near-uniform rows, whose candidate sets span the whole
        # vocabulary; scaled up, rows are peaked like a trained model's (and the test is fast).
        model.lm_head.weight.mul_(100.0)
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    args = [
        "train", "--model", str(folder), "--out", str(out), "--quiet",
        "--label-pairs", "3", "--refit-pairs", "2", "--positions-per-pair", "3", "--top-k", "4",
        "--n-tail", "2", "--horizon", str(horizon), "--alpha-pairs", "2",
        "--alpha-positions-per-pair", "40", "--test-pairs", "1", "--prompt-tokens", "32",
        "--continuation-tokens", "48", "--bucket-edges", "8,24",
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    r0, r1 = report["rounds"]
    assert r1["labels_from"] == "adjusted model of round 0"
    assert r1["n_labels_fitted"] == r0["n_labels"] + r1["n_labels"]
    for r in report["rounds"]:
        fit = r["alpha_fit_logloss"]
        assert fit["alpha_global"] <= fit["raw"] + 1e-9
        assert r["n_labels"] > 0 and r["predictor"]["chosen"] in ("ridge", "mlp")
    pred = FutureEntropyPredictor.load(out / "predictor", model=model)
    assert pred.meta_["alpha"]["bucket_edges"] == [8, 24]
    first = (out / "predictor" / "predictor.safetensors").read_bytes()
    # resume: chunks are reused, same seed, same predictor
    chunks = sorted((out / "data" / "round0").glob("*.npz"))
    # one chunk per document (horizon 1), or per group of up to 8 documents (rollouts)
    assert len(chunks) == (3 if horizon == 1 else 1)
    if horizon > 1:  # 3 documents x 3 positions x (4 top + human + 2 tail) candidates
        assert r0["n_labels"] == 3 * 3 * 7
    assert main(args) == 0
    assert (out / "predictor" / "predictor.safetensors").read_bytes() == first
    # a different config refuses to mix into the same folder
    assert main([*args[:-2], "--bucket-edges", "4"]) == 2
    d = parse(f"calibrated:predictor={out / 'predictor'}").bind(model)
    logits = torch.randn(2, len(tok))
    d.reset(2)
    assert torch.allclose(d(logits).exp().sum(-1), torch.ones(2), atol=1e-4)
