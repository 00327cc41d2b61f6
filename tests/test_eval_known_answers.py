"""Known answers on the synthetic Markov source, through the whole ``entcal compare`` pipeline
(entcal.generate, batched scoring, metrics): every expected value below is analytic."""

from __future__ import annotations

import math

import pytest
import torch

from entcal import generate
from entcal.decoding import parse
from entcal.eval import calibration
from entcal.eval.compare import CompareConfig, run_compare
from entcal.eval.scoring import score
from entcal.synthetic import MarkovChain

N, PROMPT, LENGTH = 400, 8, 32
DECODERS = "ancestral; temperature=0.8; top_k=4"


@pytest.fixture(scope="module")
def source():
    return MarkovChain.random(16, seed=0)


def _pairs(chain: MarkovChain, seed: int):
    prompts = chain.sample(N, PROMPT, seed=seed)
    human = chain.sample(N, LENGTH, start=prompts[:, -1], seed=seed + 1)
    return prompts, human


@pytest.fixture(scope="module")
def same(source, tmp_path_factory):
    """Human text from the model's own chain."""
    model, tok = source.as_model()
    prompts, human = _pairs(source, 10)
    cfg = CompareConfig(
        out=tmp_path_factory.mktemp("same"), model="markov-16", decoders=DECODERS, n=N,
        length=LENGTH, prompt_tokens=PROMPT, batch_size=200, progress=False,
    )  # fmt: skip
    res = run_compare(cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()))
    return res, prompts, cfg.out


def test_same_chain_is_calibrated_typical_and_undetectable(same):
    res, _, out = same
    d = res["decoders"]["ancestral"]
    # EntCE of the model against its own samples is 0 up to noise (the SE's coverage is tested
    # separately below).
    assert abs(d["entce"]) <= 2 * d["entce_se"]
    assert d["human_log_loss"] == pytest.approx(res["human"]["log_loss"], abs=1e-6)
    assert d["human_tokens_excluded"] == 0.0
    assert d["aep"]["z_ks_pvalue"] > 0.01
    assert d["aep_raw"]["z_ks_pvalue"] > 0.01  # ancestral: the raw model *is* the sampling one
    for name, det in d["detect"].items():
        assert abs(det["auroc"] - 0.5) <= 0.07, name
    assert d["check"]["max_abs_raw_logprob_diff_generate_vs_score"] < 1e-4
    for name in ("results.json", "report.md", "entropy_per_step.png", "aep.png", "roc.png"):
        assert (out / name).exists()


def test_per_step_entropies_are_analytic(same, source):
    res, prompts, _ = same
    for spec in ("ancestral", "temperature=0.8", "top_k=4"):
        q = source.processed(parse(spec))
        analytic = q.expected_entropy_per_step(prompts[:, -1], LENGTH)
        measured = torch.tensor(res["decoders"][spec]["gen_entropy_per_step"], dtype=torch.float64)
        # Per-step mean of N texts: the standard deviation of H_t is below 1 nat here.
        sd = (q.entropy().max() - q.entropy().min()) / 2
        assert ((measured - analytic).abs() < 4 * sd / math.sqrt(N)).all(), spec
    # The human per-step log loss of the raw model: the chain's own expected surprisal.
    ll = torch.tensor(res["human"]["log_loss_per_step"], dtype=torch.float64)
    expected = source.expected_log_loss_per_step(source, prompts[:, -1], LENGTH)
    assert (ll - expected).abs().mean() < 0.05


def test_temperature_and_truncation_known_answers(same, source):
    res, prompts, _ = same
    last = prompts[:, -1]
    # Human log loss under temperature 0.8: E[-log Q(y)] with y ~ P.
    q = source.processed(parse("temperature=0.8"))
    d = res["decoders"]["temperature=0.8"]
    expected = float(source.expected_log_loss_per_step(q, last, LENGTH).mean())
    assert d["human_log_loss"] == pytest.approx(expected, abs=3 * d["human_log_loss_se"])
    assert d["entce"] < -5 * d["entce_se"]  # a cooled model is overconfident
    # top_k=4 excludes the human tokens outside each state's 4 most likely: expected fraction
    # Σ_t dist_t · (P-mass outside Q's support).
    k = source.processed(parse("top_k=4"))
    d = res["decoders"]["top_k=4"]
    outside = torch.where(k.transition > 0, 0.0, source.transition).sum(-1)
    frac = float((source.state_distribution(last, LENGTH) @ outside).mean())
    assert d["human_log_loss"] == "inf" and d["entce"] == "-inf"
    assert d["human_tokens_excluded"] == pytest.approx(frac, abs=0.015)
    # Truncated samples scored by the raw model: l - h converges to E_Q[CE(Q, P) - H(P)], not 0.
    gap = k.cross_entropy(source) - source.entropy()
    expected_gap = float((k.state_distribution(last, LENGTH) @ gap).mean())
    assert d["aep_raw"]["mean_gap"] == pytest.approx(expected_gap, abs=0.03)
    assert abs(d["aep"]["mean_gap"]) < 0.03  # under the sampling distribution it is ~0


def test_different_chain_is_detected(source, tmp_path):
    model, tok = source.as_model()
    other = MarkovChain.random(16, seed=7)
    prompts, human = _pairs(other, 20)
    cfg = CompareConfig(
        out=tmp_path, model="markov-16", decoders="ancestral", n=N, length=LENGTH,
        prompt_tokens=PROMPT, batch_size=400, progress=False, plots=False,
    )  # fmt: skip
    res = run_compare(cfg, model=model, tokenizer=tok, pairs=(prompts.tolist(), human.tolist()))
    det = res["decoders"]["ancestral"]["detect"]
    assert det["log_likelihood"]["auroc"] > 0.97
    assert det["typicality"]["auroc"] > 0.97
    assert det["typicality"]["tpr_at_1fpr"] > 0.5
    # Foreign text costs the model more than its own entropy: EntCE = H - L < 0.
    d = res["decoders"]["ancestral"]
    assert d["entce"] < -5 * d["entce_se"]


def test_entce_standard_error_covers_zero_as_often_as_it_should(source):
    """16 independent replicates of (generations, human text) from the same chain: |EntCE|/SE
    is below 1 about 68% of the time and never far out (the SE is honest, not inflated)."""
    model, tok = source.as_model()
    ratios = []
    for rep in range(16):
        prompts, human = _pairs(source, 100 + 2 * rep)
        prompts, human = prompts[:100], human[:100]
        gens = generate(model, tok, prompts.tolist(), max_new_tokens=LENGTH, seed=rep)
        ent = torch.stack([g.entropy for g in gens])
        s = score(model, prompts.tolist(), human.tolist())
        cal = calibration.entropy_calibration(
            ent, torch.ones_like(ent, dtype=torch.bool), s.raw.logprob, s.mask
        )
        ratios.append(abs(cal.entce) / cal.entce_se)
    inside = sum(r < 1 for r in ratios)
    assert inside >= 7, ratios
    assert max(ratios) < 4, ratios
