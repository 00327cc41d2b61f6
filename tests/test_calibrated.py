"""The calibrated decoder: state features, predictor files, gate fit, decoder contract, recipe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from entcal.calibrators.predictor import FutureEntropyPredictor
from entcal.calibrators.predictor_file import PredictorFileError, predictor_fingerprint
from entcal.calibrators.state import (
    REFERENCE_STEPS,
    WINDOWS,
    HiddenProjection,
    StateTracker,
    StepStats,
    feature_names,
    sequence_features,
)


def _tiny_llama(vocab: int = 96, hidden: int = 16, seed: int = 0):
    return make_tiny_llama(
        vocab, hidden, layers=1, seed=seed, intermediate=32, heads=2, kv_heads=1, max_positions=256
    )


@torch.inference_mode()
def _hidden_and_logits(model, n: int = 6, length: int = 20, seed: int = 0):
    ids = torch.randint(
        0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed)
    )
    out = model(input_ids=ids, output_hidden_states=True)
    d = out.hidden_states[-1].shape[-1]
    return out.hidden_states[-1].reshape(-1, d).float(), out.logits.reshape(n * length, -1).float()


def make_predictor(model, dim: int = 3, kind: str = "ridge", seed: int = 0, **gate):
    """A predictor of the model's features, fitted on synthetic labels with a known dependence."""
    hidden, _ = _hidden_and_logits(model, seed=seed)
    proj = HiddenProjection.fit(model.get_output_embeddings().weight, hidden, dim=dim)
    g = np.random.default_rng(seed)
    X = g.normal(size=(600, len(feature_names(dim))))
    y = 0.3 + 0.8 * X[:, 0] - 0.5 * X[:, 3] + 0.05 * g.normal(size=600)
    pred = FutureEntropyPredictor(estimator=kind, random_state=seed).fit(X, y, np.arange(600) // 20)
    pred.projection_ = proj
    pred.gate_ = {"threshold": 0.0, "strength": [0.5, 1.0], "bucket_edges": [4], **gate}
    pred.meta_ = {"fingerprint": predictor_fingerprint(model, "tiny")}
    return pred, X, y


def saved_predictor(tmp_path, model, **kw):
    pred, _, _ = make_predictor(model, **kw)
    return pred.save(tmp_path / "pred", fingerprint=predictor_fingerprint(model, "tiny"))


# ------------------------------------------------------------------ state


def test_projection_reads_the_hidden_state_back_from_any_logits_row():
    model = _tiny_llama(vocab=300, hidden=16)
    hidden, logits = _hidden_and_logits(model)
    proj = HiddenProjection.fit(model.lm_head.weight, hidden, dim=5, n_tokens=64)
    z = proj(logits)
    # the same from log-probs, from shifted logits, from float64: the normalizer drops out
    assert torch.allclose(proj(torch.log_softmax(logits, -1)), z, atol=1e-4)
    assert torch.allclose(proj(logits + 7.0), z, atol=1e-4)
    # standardized principal components of the hidden states it was fitted on
    assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-3)
    assert torch.allclose(z.std(0), torch.ones(5), atol=1e-2)
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=2e-2)
    # a linear function of the hidden state: reproduced by least squares on h
    h1 = torch.cat([hidden, torch.ones(len(hidden), 1)], 1)
    coef = torch.linalg.lstsq(h1.double(), z.double()).solution
    assert torch.allclose((h1.double() @ coef).float(), z, atol=1e-3)
    # masked columns (constraints) do not produce NaN
    masked = logits.clone()
    masked[:, proj.tokens[:3]] = -math.inf
    assert torch.isfinite(proj(masked)).all()
    assert torch.equal(proj(torch.full((1, 300), -math.inf)), torch.zeros(1, 5) - proj.offset)


def test_tracker_equals_sequence_features_and_counts_a_step_once():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(3, 30, generator=g) * 4
    z = torch.randn(3, 30, 4, generator=g)
    whole = sequence_features(ent, z)
    assert whole.shape == (3, 30, len(feature_names(4)))
    tr = StateTracker(4)
    tr.reset(3)
    for t in range(30):
        stats = StepStats(ent[:, t], z[:, t])
        first = tr.features(stats)
        again = tr.features(stats)  # a row processed twice before its token is known
        assert torch.equal(first, again)
        assert torch.allclose(first, whole[:, t], atol=1e-5)
        tr.commit()
        tr.commit()  # a second commit without a new step changes nothing
    assert tr.count.tolist() == [30, 30, 30]


def test_features_known_answers():
    # entropy 1 then 3; z constant 2
    ent = torch.tensor([[1.0, 3.0]])
    z = torch.full((1, 2, 1), 2.0)
    f = sequence_features(ent, z)
    names = feature_names(1)
    assert names == [
        "entropy-ref",
        *(f"ema{w}-ref" for w in WINDOWS),
        *(f"z0_ema{w}" for w in WINDOWS),
    ]
    # step 0: everything equals the reference (the first entropy), z EMAs = 2
    assert f[0, 0].tolist() == pytest.approx([0, 0, 0, 2, 2])
    # step 1: reference = mean(1, 3) = 2; EMA_w = (d·1 + 3)/(d + 1), d = 1 − 1/w
    ema = [((1 - 1 / w) * 1 + 3) / (2 - 1 / w) for w in WINDOWS]
    assert f[0, 1].tolist() == pytest.approx([1.0, ema[0] - 2, ema[1] - 2, 2, 2], abs=1e-6)
    # the reference stops moving after REFERENCE_STEPS steps
    long = torch.cat([torch.ones(1, REFERENCE_STEPS), torch.full((1, 5), 9.0)], 1)
    f = sequence_features(long, torch.zeros(1, long.shape[1], 1))
    assert f[0, -1, 0].item() == pytest.approx(8.0)


# ------------------------------------------------------------------ predictor


@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_predictor_torch_matches_sklearn_and_roundtrips(tmp_path, kind):
    model = _tiny_llama()
    pred, X, y = make_predictor(model, kind=kind)
    assert pred.kind_ == kind
    if kind == "ridge":
        assert pred.scores_["r2_heldout"] > 0.95
    from sklearn.linear_model import Ridge

    if kind == "ridge":
        ref = Ridge(alpha=pred.ridge_alpha).fit(
            (X - pred.x_mean_) / pred.x_scale_, (y - pred.y_mean_) / pred.y_scale_
        )
        expect = ref.predict((X - pred.x_mean_) / pred.x_scale_) * pred.y_scale_ + pred.y_mean_
        assert np.allclose(pred.predict(X), expect, atol=1e-4)
    folder = pred.save(tmp_path / "p", fingerprint=predictor_fingerprint(model, "tiny"))
    back = FutureEntropyPredictor.load(folder, model=model)
    assert np.allclose(back.predict(X), pred.predict(X), atol=1e-5)
    assert back.gate_ == {
        "threshold": 0.0, "strength": [0.5, 1.0], "bucket_edges": [4], "base": 0.0, "warmup": 0
    }  # fmt: skip
    meta = json.loads((folder / "predictor.json").read_text())
    assert meta["format_version"] == 2 and meta["fingerprint"]["name"] == "tiny"


def test_predictor_file_errors(tmp_path):
    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model)
    with pytest.raises(FileNotFoundError, match=r"predictor\.json"):
        FutureEntropyPredictor.load(tmp_path / "nowhere")
    meta_path = folder / "predictor.json"
    good = meta_path.read_text()
    meta_path.write_text("{not json")
    with pytest.raises(PredictorFileError, match="not valid JSON"):
        FutureEntropyPredictor.load(folder)
    old = json.loads(good)
    old["format_version"] = 1  # the one-step predictor of earlier releases
    meta_path.write_text(json.dumps(old))
    with pytest.raises(PredictorFileError, match="format version 2"):
        FutureEntropyPredictor.load(folder)
    bad_gate = json.loads(good)
    bad_gate["gate"]["strength"] = [1.0]
    meta_path.write_text(json.dumps(bad_gate))
    with pytest.raises(PredictorFileError, match="strength"):
        FutureEntropyPredictor.load(folder)
    bad_gate = json.loads(good)
    bad_gate["gate"]["base"] = -0.5
    meta_path.write_text(json.dumps(bad_gate))
    with pytest.raises(PredictorFileError, match="base"):
        FutureEntropyPredictor.load(folder)
    no_base = json.loads(good)  # a file written before the base existed: base 0
    del no_base["gate"]["base"]
    meta_path.write_text(json.dumps(no_base))
    assert FutureEntropyPredictor.load(folder).gate_["base"] == 0.0
    assert FutureEntropyPredictor.load(folder).gate_["warmup"] == 0  # (no warm-up either)
    for bad in (-1, 1.5, True, "8"):
        bad_gate = json.loads(good)
        bad_gate["gate"]["warmup"] = bad
        meta_path.write_text(json.dumps(bad_gate))
        with pytest.raises(PredictorFileError, match="warmup"):
            FutureEntropyPredictor.load(folder)
    warm = json.loads(good)
    warm["gate"]["warmup"] = 6
    meta_path.write_text(json.dumps(warm))
    assert FutureEntropyPredictor.load(folder).gate_["warmup"] == 6
    assert "lift" not in FutureEntropyPredictor.load(folder).gate_  # absent: no lift
    for key, bad, level in (("lift", -0.5, 0.1), ("lift", 1.5, 0.1), ("lift", "half", 0.1),
                            ("lift", None, 0.1), ("reference_level", 0.5, None),
                            ("reference_level", 0.5, float("nan")),
                            ("reference_level", 0.0, float("inf"))):  # fmt: skip
        bad_gate = json.loads(good)
        bad_gate["gate"]["lift"] = bad
        if level is not None:
            bad_gate["gate"]["reference_level"] = level
        meta_path.write_text(json.dumps(bad_gate))
        with pytest.raises(PredictorFileError, match=key):
            FutureEntropyPredictor.load(folder)
    warm["gate"].update(lift=0.5, reference_level=0.25)
    meta_path.write_text(json.dumps(warm))
    lifted = FutureEntropyPredictor.load(folder).gate_
    assert lifted["lift"] == 0.5 and lifted["reference_level"] == 0.25
    meta_path.write_text(good)
    tensors = folder / "predictor.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PredictorFileError, match="truncated or corrupted"):
        FutureEntropyPredictor.load(folder)
    tensors.write_bytes(data)
    FutureEntropyPredictor.load(folder, model=model)
    # another model, same shapes: the LM-head digest tells them apart; other shapes: the config
    with pytest.raises(PredictorFileError, match="tiny"):
        FutureEntropyPredictor.load(folder, model=_tiny_llama(seed=1))
    with pytest.raises(PredictorFileError, match="vocab_size"):
        FutureEntropyPredictor.load(folder, model=_tiny_llama(vocab=80))


# ------------------------------------------------------------------ gate fit and identities


def test_gate_fit_recovers_a_known_temperature():
    """Known answer: the model is the human source at temperature τ0 = 1.25 (too flat). With the
    gate always open (constant excess 1, threshold 0), α = g, and the EntCE-constrained fit must
    find 1 + α = τ0, where the sharpened model equals the source."""
    from entcal.calibrators.strength import GateEvaluation, fit_gate
    from entcal.synthetic import MarkovChain

    source = MarkovChain.random(vocab_size=12, scale=1.5, seed=4)
    tau0 = 1.25
    model = source.processed(lambda logits: logits / tau0)
    steps = 24

    def evaluate(threshold: float, strength: list[float], base: float) -> GateEvaluation:
        alpha = base + strength[0] * max(0.0, 1.0 - threshold)
        q = model.processed(lambda logits: logits * (1 + alpha))
        gen = float(q.expected_entropy_per_step(None, steps).mean())
        loss = float(source.expected_log_loss_per_step(q, None, steps).mean())
        raw = float(source.expected_log_loss_per_step(model, None, steps).mean())
        entce = gen - loss
        return GateEvaluation(threshold, list(strength), [entce], entce, loss - raw, 1.0, base)

    best, grid = fit_gate(evaluate, [0.0], n_buckets=1, rounds=40, tolerance=1e-4)
    assert abs(best.entce) <= 1e-4
    assert best.strength[0] == pytest.approx(tau0 - 1, abs=2e-3)
    assert best.cost < 0  # the recovered source has the lowest log loss
    assert len(grid) < 40
    # a second base starts from the strengths the first ended with (a warm start)
    _, grid = fit_gate(evaluate, [0.0], n_buckets=1, rounds=40, tolerance=1e-4, bases=(0, 1e-4))
    first, second = ([e for e in grid if e.base == b] for b in (0, 1e-4))
    assert second[0].strength == first[-1].strength and len(second) < len(first)


def test_gate_fit_chooses_the_base_that_calibrates_where_the_gate_cannot_open():
    """Known answer: the model is the source at temperature τ0 = 1.25 and the gate never opens
    (excess 0 below threshold 1), so only the base α_0 acts: among the bases tried, the fit must
    keep α_0 = τ0 − 1, the only one that calibrates (and the one of lowest log loss)."""
    from entcal.calibrators.strength import GateEvaluation, fit_gate
    from entcal.synthetic import MarkovChain

    source = MarkovChain.random(vocab_size=12, scale=1.5, seed=4)
    tau0 = 1.25
    model = source.processed(lambda logits: logits / tau0)
    steps = 24
    raw = float(source.expected_log_loss_per_step(model, None, steps).mean())

    def evaluate(threshold: float, strength: list[float], base: float) -> GateEvaluation:
        alpha = base + strength[0] * max(0.0, 0.0 - threshold)
        q = model.processed(lambda logits: logits * (1 + alpha))
        gen = float(q.expected_entropy_per_step(None, steps).mean())
        loss = float(source.expected_log_loss_per_step(q, None, steps).mean())
        entce = gen - loss
        return GateEvaluation(threshold, list(strength), [entce], entce, loss - raw, 0.0, base)

    bases = (0.0, 0.1, tau0 - 1, 0.4)
    best, grid = fit_gate(evaluate, [1.0], n_buckets=1, rounds=3, tolerance=1e-3, bases=bases)
    assert best.base == tau0 - 1 and abs(best.entce) < 1e-3 and best.cost < 0
    assert sorted({e.base for e in grid}) == sorted(bases)
    # an evaluation is keyed by its base too: the same strengths under another base are new
    assert len(grid) == len({(e.base, tuple(e.strength)) for e in grid})


def test_telescoping_identity_on_markov_source():
    """Σ_t of the per-step α-gradients of human log loss (Lemma A.2) with the exact future
    entropy as Ĥ equals the human log loss minus the total entropy of generations, for every
    human text: the reason a strength fitted to EntCE = 0 and one at the log-loss optimum agree
    only when Ĥ is the future entropy of the process actually sampled."""
    from entcal.calibrators.alpha import logloss_terms
    from entcal.synthetic import MarkovChain

    model = MarkovChain.random(vocab_size=10, scale=1.5, seed=1)
    human = MarkovChain.random(vocab_size=10, scale=2.5, seed=2)
    steps = 15
    texts = human.sample(6, steps + 1, seed=3)  # first token is the prompt
    logp = model.log_transition().double()
    for text in texts:
        prev, nxt = text[:-1], text[1:]
        lp = logp[prev]  # (steps, V): the model's rows along the human text
        fut = torch.stack([model.future_entropy(steps - t - 1) for t in range(steps)])
        phi = lp - fut  # φ = log p − Ĥ with the exact future entropy after each candidate
        _, grad, _ = logloss_terms(lp, phi, nxt, torch.zeros(steps, dtype=torch.float64))
        loss_total = float(-lp.gather(-1, nxt[:, None]).sum())
        gen_total = float(model.expected_entropy_per_step([int(text[0])], steps).sum())
        assert float(grad.sum()) == pytest.approx(loss_total - gen_total, abs=1e-6)


def test_gate_alpha_base_survives_an_infinite_strength():
    """A closed gate under an infinite strength is 0, not 0·inf = NaN (which would drop α_0)."""
    from entcal.calibrators.derailment import gate_alpha

    alpha = gate_alpha(torch.tensor([0.0, 2.0]), torch.tensor(float("inf")), 1.0, 0.5)
    assert alpha.tolist() == [0.5, float("inf")]


def test_lifted_excess_step_by_step_equals_the_whole_sequence():
    """The decoder's step-wise early level (a running sum committed per step) gives what the
    training-time sequence version gives, per-row warm-up, lift and level included."""
    from entcal.calibrators.derailment import (
        REFERENCE_WINDOW,
        early_level_along,
        lifted_excess,
        lifted_excess_along,
    )

    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, REFERENCE_WINDOW + 30, generator=g)
    warm, lift = torch.tensor([0, 5, 9]), torch.tensor([0.5, 1.0, 0.25])
    level = torch.tensor([0.3, 0.0, 2.0])
    ref = torch.zeros(3)
    for t in range(d.shape[1]):
        score, share = lifted_excess(d[:, t], torch.full((3,), t), ref, warm, lift, level)
        ref = ref + share
        for i in range(3):
            along = lifted_excess_along(d[i : i + 1], int(warm[i]), float(lift[i]), float(level[i]))
            assert score[i].item() == pytest.approx(along[0, t].item(), abs=1e-5)
    # known answers. A text at a constant level 2 under a human level 3: lifted by λ·1 from the
    # window on, not during the warm-up; above the human level: not lifted (one-sided)
    const = torch.full((1, 40), 2.0)
    assert lifted_excess_along(const, 4, 1.0, 3.0)[0].tolist() == [2.0] * 4 + [3.0] * 36
    assert lifted_excess_along(const, 0, 0.5, 3.0)[0].tolist() == [2.5] * 40
    assert torch.equal(lifted_excess_along(const, 0, 1.0, 1.0), const)
    # the early level is the running mean inside the window, then stays fixed
    ramp = torch.arange(40.0)[None]
    early = early_level_along(ramp, 4)[0]
    assert early[:4].isnan().all() and early[4:8].tolist() == [4.0, 4.5, 5.0, 5.5]
    fixed = (4 + 4 + REFERENCE_WINDOW - 1) / 2
    assert early[4 + REFERENCE_WINDOW :].tolist() == [fixed] * (36 - REFERENCE_WINDOW)


def test_gate_update_moves_against_each_buckets_error():
    from entcal.calibrators.strength import STRENGTH_MAX, update_strengths

    g = update_strengths([1.0, 1.0, 0.0, 7.9], [0.2, -0.2, 0.1, 1.0])
    assert g[0] > 1 > g[1] and g[2] > 0 and g[3] == STRENGTH_MAX


# ------------------------------------------------------------------ the decoder


def test_closed_gate_is_the_identity_and_an_open_one_a_temperature_on_markov_source(tmp_path):
    """α_t = 0 wherever the predicted excess is below the threshold: the sampled distribution is
    then exactly the model's; with the gate always open at α = g it is temperature 1/(1 + g)."""
    from entcal.calibrators.calibrated import CalibratedDecoder
    from entcal.generation import generate
    from entcal.synthetic import MarkovChain

    chain = MarkovChain.random(vocab_size=16, scale=1.5, seed=0)
    lm, tok = chain.as_model()
    pred, _, _ = make_predictor(lm, dim=3)
    # a predictor that never sees derailment: D̂ ≡ 0 (no derailment on a stationary chain)
    pred.fit(np.random.default_rng(0).normal(size=(50, len(feature_names(3)))), np.zeros(50))
    prompts = [[1, 2, 3], [4, 5]]
    closed = CalibratedDecoder.from_predictor(pred, [3.0, 3.0], threshold=0.5)
    out = generate(lm, tok, prompts, closed, max_new_tokens=12, seed=0)
    for g in out:
        assert torch.equal(g.logprob, g.raw_logprob) and torch.equal(g.entropy, g.raw_entropy)
    opened = CalibratedDecoder.from_predictor(pred, [0.5, 0.5], threshold=-1.0)  # α = 0.5
    # the gate closed, a base α_0 = 0.5 alone: the same temperature
    based = CalibratedDecoder.from_predictor(pred, [3.0, 3.0], threshold=0.5, base=0.5)
    sharp = chain.processed(lambda logits: logits * 1.5).log_transition()
    for dec in (opened, based):
        out = generate(lm, tok, prompts, dec, max_new_tokens=12, seed=0)
        for g, p in zip(out, prompts):
            prev = torch.tensor([p[-1], *g.token_ids[:-1]])
            expect = sharp[prev, torch.tensor(g.token_ids)].float()
            assert torch.allclose(g.logprob, expect, atol=1e-4)
    # warmup=5: the open gate stays closed for the first 5 steps (the raw model), then opens
    warm = CalibratedDecoder.from_predictor(pred, [0.5, 0.5], threshold=-1.0, warmup=5)
    for g, p in zip(generate(lm, tok, prompts, warm, max_new_tokens=12, seed=0), prompts):
        prev = torch.tensor([p[-1], *g.token_ids[:-1]])
        expect = sharp[prev, torch.tensor(g.token_ids)].float()
        assert torch.equal(g.logprob[:5], g.raw_logprob[:5])
        assert torch.allclose(g.logprob[5:], expect[5:], atol=1e-4)
        assert not torch.allclose(g.logprob[5:], g.raw_logprob[5:], atol=1e-3)
    # a predictor at a constant level D̂ ≡ 0 and threshold 0.5: closed (the raw model) unless
    # lifted: toward a human level of 1, lift=0.75 reads 0.75 (α = 0.5·0.25) from the first step
    # after the warm-up (here 2); toward a level of 0 (the text is not below it) no lift at all
    lift = {"threshold": 0.5, "warmup": 2, "lift": 0.75}
    level_one = CalibratedDecoder.from_predictor(pred, [0.5, 0.5], reference_level=1.0, **lift)
    level_zero = CalibratedDecoder.from_predictor(pred, [0.5, 0.5], reference_level=0.0, **lift)
    for g in generate(lm, tok, prompts, level_zero, max_new_tokens=24, seed=0):
        assert torch.equal(g.logprob, g.raw_logprob)
    sharp = chain.processed(lambda logits: logits * 1.125).log_transition()
    for g, p in zip(generate(lm, tok, prompts, level_one, max_new_tokens=24, seed=0), prompts):
        prev = torch.tensor([p[-1], *g.token_ids[:-1]])
        expect = sharp[prev, torch.tensor(g.token_ids)].float()
        assert torch.equal(g.logprob[:2], g.raw_logprob[:2])
        assert torch.allclose(g.logprob[2:], expect[2:], atol=1e-4)


def test_decoder_spec_options_and_bad_input(tmp_path):
    from entcal.decoding import parse

    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model)
    d = parse(f"calibrated:predictor={folder},scale=0.5,threshold=0.2")
    assert parse(str(d)) == d and str(d) == f"calibrated:predictor={folder},scale=0.5,threshold=0.2"
    d.bind(model)
    assert d.gate() == ([0.25, 0.5], 0.2, 0.0)
    assert parse(f"calibrated:predictor={folder},strength=2").bind(model).gate()[0] == [2.0, 2.0]
    # the base is scaled with the strengths: scale=0 is the raw model
    based = parse(f"calibrated:predictor={folder},base=0.1,scale=0.5")
    assert parse(str(based)) == based and based.bind(model).gate()[2] == pytest.approx(0.05)
    warm = parse(f"calibrated:predictor={folder},warmup=8")
    assert str(warm) == f"calibrated:predictor={folder},warmup=8" and parse(str(warm)) == warm
    assert warm.bind(model).warmup_steps() == 8 and d.warmup_steps() == 0  # (the file's)
    assert d.lift_weights() == (0.0, 0.0)
    # this predictor's gate records no human reference level: a lift is refused at parse
    # (vLLM admission answers it), and for the shipped predictor at bind
    with pytest.raises(ValueError, match=r"lift=0\.5 needs the human reference level"):
        parse(f"calibrated:predictor={folder},lift=0.5")
    for bad, key in (("scale=-1", "scale"), ("strength=nan", "strength"), ("base=-0.1", "base"),
                     ("threshold=inf", "threshold"), ("alpha=1", "alpha"),
                     ("warmup=-1", "warmup"), ("warmup=1.5", "warmup"),
                     ("lift=1.5", "lift"), ("lift=-0.1", "lift"), ("lift=nan", "lift")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            parse(f"calibrated:predictor={folder},{bad}")
    with pytest.raises(FileNotFoundError):
        parse(f"calibrated:predictor={tmp_path / 'missing'}")
    with pytest.raises(PredictorFileError, match="vocab_size"):
        d.bind(_tiny_llama(vocab=80))
    # no shipped predictor for this model
    with pytest.raises(PredictorFileError, match="no predictor is shipped"):
        parse("calibrated").bind(model)
    # all -inf rows stay all -inf; NaN rows are named
    d.reset(3)
    logits = torch.randn(3, 96)
    logits[1] = -math.inf
    out = d(logits)
    assert torch.isinf(out[1]).all() and (out[1] < 0).all() and torch.isfinite(out[[0, 2]]).all()
    logits[2, 5] = math.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        d(logits)


def test_mixed_instances_in_one_batch_equal_each_alone(tmp_path):
    """vLLM batches rows of many requests, each with its own decoder instance and state."""
    from entcal.decoding import apply_rows, parse

    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model, reference_level=2.0)  # (a lift lifts toward 2)
    specs = [
        f"calibrated:predictor={folder},base=0.2",
        f"calibrated:predictor={folder},scale=2,base=0.05,warmup=3,lift=0.7",
        f"calibrated:predictor={folder},threshold=0.5,lift=0.3",
        "top_p=0.9",
    ]
    assert parse(str(parse(specs[1]))) == parse(specs[1]) and "lift=0.7" in str(parse(specs[1]))
    together = [parse(s).bind(model) if s.startswith("cal") else parse(s) for s in specs]
    alone = [parse(s).bind(model) if s.startswith("cal") else parse(s) for s in specs]
    for d in together + alone:
        d.reset(1)
    g = torch.Generator().manual_seed(0)
    for _ in range(24):  # long enough to pass the bucket edge (4) and the reference window
        logits = torch.randn(4, 96, generator=g) * 3
        mixed = apply_rows(logits, together)
        for i, d in enumerate(alone):
            assert torch.allclose(mixed[i], d(logits[i : i + 1])[0], atol=1e-5)
        tokens = torch.multinomial(mixed.softmax(-1), 1, generator=g)[:, 0]
        for i in range(4):
            together[i].observe(tokens[i : i + 1])
            alone[i].observe(tokens[i : i + 1])


def test_an_instance_with_rows_apart_in_the_batch(tmp_path):
    """One instance holding rows 0 and 2 of a batch, another row 1 (interleaved)."""
    from entcal.decoding import apply_rows, parse

    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model)
    a, b = (
        parse(f"calibrated:predictor={folder},scale={s},base={a0}").bind(model)
        for s, a0 in ((1, 0.3), (3, 0))
    )
    a_alone, b_alone = (parse(str(d)).bind(model) for d in (a, b))
    a.reset(2), b.reset(1), a_alone.reset(2), b_alone.reset(1)
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        logits = torch.randn(3, 96, generator=g) * 3
        mixed = apply_rows(logits, [a, b, a])
        assert torch.allclose(mixed[[0, 2]], a_alone(logits[[0, 2]]), atol=1e-5)
        assert torch.allclose(mixed[[1]], b_alone(logits[[1]]), atol=1e-5)
        for d in (a, b, a_alone, b_alone):
            d.observe(None)
    assert a.tracker.count.tolist() == [7, 7] and b.tracker.count.tolist() == [7]


def test_hf_processor_state_does_not_leak_into_the_next_generate(tmp_path):
    """A processor reused for a new generate whose prompt happens to be one token longer than
    the last sequence it saw must start fresh (the ids, not only the shapes, decide)."""
    from entcal.decoding import hf

    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model)
    spec = f"calibrated:predictor={folder},threshold=-1"  # gate open: the state shapes every step
    proc = hf.logits_processor(spec, model=model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 5), generator=g)
    for _ in range(6):  # a first generation of 6 steps
        scores = torch.randn(2, 96, generator=g)
        out = proc(ids, scores)
        ids = torch.cat([ids, torch.multinomial(out.softmax(-1), 1, generator=g)], 1)
    new_prompt = torch.randint(0, 96, (2, ids.shape[1] + 1), generator=g)  # one token longer
    scores = torch.randn(2, 96, generator=g)
    fresh = hf.logits_processor(spec, model=model)
    assert torch.allclose(proc(new_prompt, scores), fresh(new_prompt, scores))
    assert proc.decoder.tracker.count.tolist() == [0, 0]


# ------------------------------------------------------------------ the recipe


def test_train_recipe_end_to_end_and_resume(tmp_path, smollm2_tokenizer, capsys):
    """The whole recipe on a tiny random model with the real tokenizer and corpus, via the CLI."""
    from entcal.cli import main
    from entcal.decoding import parse

    tok = smollm2_tokenizer
    model = _tiny_llama(vocab=len(tok), hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked rows, like a trained model's
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "run"
    args = [
        "train", "--model", str(folder), "--out", str(out), "--quiet", "--fit-docs", "4",
        "--gate-docs", "2", "--prompt-tokens", "16", "--length", "24", "--horizon", "6",
        "--projection-dim", "4", "--threshold-quantiles", "0.5,0.9", "--bucket-edges", "12",
        "--gate-rounds", "2", "--base-alphas", "0,0.05", "--warmup", "3", "--batch-size", "4",
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["warmup"] == 3
    assert report["states"]["n_states"] == 2 * 4 * 24
    assert report["predictor"]["chosen"] == "ridge"
    grid = report["gate_grid"]
    assert {round(e["threshold"], 6) for e in grid} == {
        round(e["threshold"], 6) for e in grid[:1] + grid[-1:]
    }
    assert 4 <= len(grid) <= 8 and report["gate"] in grid
    assert {e["base"] for e in grid} == {0.0, 0.05}
    pred = FutureEntropyPredictor.load(out / "predictor", model=model)
    assert pred.gate_["bucket_edges"] == [12] and len(pred.gate_["strength"]) == 2
    assert pred.gate_["base"] == report["gate"]["base"] and pred.gate_["warmup"] == 3

    # the warm-up reaches decoders through the file
    assert parse(f"calibrated:predictor={out / 'predictor'}").bind(model).warmup_steps() == 3
    first = (out / "predictor" / "predictor.safetensors").read_bytes()
    # resume: everything cached is reused; same seed, same predictor
    assert main(args) == 0
    assert (out / "predictor" / "predictor.safetensors").read_bytes() == first
    # a cache file cut short (or corrupted) is reported and computed again: the same predictor
    cache = out / "data" / "rollouts.safetensors"
    cache.write_bytes(cache.read_bytes()[:100])
    capsys.readouterr()
    assert main(args) == 0
    assert "rollouts.safetensors is unreadable" in capsys.readouterr().err
    assert (out / "predictor" / "predictor.safetensors").read_bytes() == first
    # a different config refuses to mix into the same folder
    assert main([*args[:-2], "--batch-size", "2"]) == 2
    # the gate alone refitted: the same predictor, threshold and buckets; the base searched
    refit = tmp_path / "refit"
    gate_args = ["--gate-of", str(out / "predictor"), "--base-alphas", "0.05", "--gate-rounds", "1"]
    no_warmup = [a for i, a in enumerate(args) if "--warmup" not in args[max(i - 1, 0) : i + 1]]
    assert main([*no_warmup[:4], str(refit), *no_warmup[5:], *gate_args]) == 0
    again = FutureEntropyPredictor.load(refit / "predictor", model=model)
    assert again.gate_["base"] == 0.05 and again.gate_["threshold"] == pred.gate_["threshold"]
    assert again.gate_["warmup"] == 3  # no --warmup: the refit keeps the predictor's
    assert again.gate_["bucket_edges"] == [12] and not (refit / "data").exists()
    assert "lift" not in again.gate_  # (no lift, as in older files)
    regrid = json.loads((refit / "report.json").read_text())["gate_grid"]
    assert [e["strength"] for e in regrid] == [pred.gate_["strength"]]  # it starts from its own
    assert (refit / "predictor" / "predictor.safetensors").read_bytes() == first
    assert again.meta_["report"]["gate_of"]["folder"] == str(out / "predictor")
    # a refit with a lift: written to the file with the gate documents' human reference level
    lift = tmp_path / "refit-lift"
    assert main([*no_warmup[:4], str(lift), *no_warmup[5:], *gate_args, "--lift", "0.5"]) == 0
    lifted = FutureEntropyPredictor.load(lift / "predictor", model=model)
    assert lifted.gate_["lift"] == 0.5 and lifted.gate_["warmup"] == 3
    assert math.isfinite(lifted.gate_["reference_level"])
    assert lifted.gate_["threshold"] == pred.gate_["threshold"]
    weights = parse(f"calibrated:predictor={lift / 'predictor'}").bind(model).lift_weights()
    assert weights == (0.5, lifted.gate_["reference_level"])
    # a refit must draw the predictor's gate documents, and name a predictor folder that exists
    capsys.readouterr()
    other = [*args[:4], str(tmp_path / "r2"), *args[5:], *gate_args, "--fit-docs", "3"]
    assert main(other) == 2 and "fit_docs=3" in capsys.readouterr().err
    missing = [*args[:4], str(tmp_path / "r3"), *args[5:], "--gate-of", str(tmp_path / "none")]
    assert main(missing) == 2 and "no predictor.json" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()  # refused before anything was written
    d = parse(f"calibrated:predictor={out / 'predictor'}").bind(model)
    d.reset(2)
    assert torch.allclose(d(torch.randn(2, len(tok))).softmax(-1).sum(-1), torch.ones(2))


@pytest.mark.slow
def test_train_killed_at_any_point_resumes_to_the_same_predictor(tmp_path, smollm2_tokenizer):
    """SIGKILL `entcal train` at several points (some mid-write); each rerun resumes from its
    caches, and the final predictor is byte-identical to an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tok = smollm2_tokenizer
    model = _tiny_llama(vocab=len(tok), hidden=32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    def command(out):
        return [
            sys.executable, "-m", "entcal.cli", "train", "--model", str(folder), "--out",
            str(out), "--quiet", "--fit-docs", "4", "--gate-docs", "2", "--prompt-tokens", "16",
            "--length", "24", "--horizon", "6", "--projection-dim", "4",
            "--threshold-quantiles", "0.5,0.9", "--bucket-edges", "12", "--gate-rounds", "2",
            "--batch-size", "4",
        ]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    for n_files in (1, 3, 4):  # data/ caches written so far
        proc = subprocess.Popen(command(cut), env=env, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list((cut / "data").glob("*.safetensors"))) < n_files:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(command(cut), check=True, env=env, capture_output=True)
    for name in ("predictor.safetensors", "predictor.json"):
        a = (tmp_path / "whole" / "predictor" / name).read_bytes()
        b = (cut / "predictor" / name).read_bytes()
        if name == "predictor.json":
            a, b = json.loads(a), json.loads(b)
            for m in (a, b):
                m.pop("seconds", None)
                m.get("report", {}).pop("seconds", None)
        assert a == b, name


def test_cache_key_follows_the_predictor_file_not_only_the_spec(tmp_path):
    """compare caches results per decoder: a predictor retrained (or its gate changed) at the
    same path must not be answered from the old entry, while unchanged decoders keep their keys."""
    from entcal.decoding import parse
    from entcal.eval.results_cache import decoder_key

    model = _tiny_llama()
    folder = saved_predictor(tmp_path, model)
    spec = f"calibrated:predictor={folder}"
    before = parse(spec).bind(model)
    again = parse(spec).bind(model)
    assert before.cache_key() == again.cache_key() != spec
    meta_path = folder / "predictor.json"
    meta = json.loads(meta_path.read_text())
    meta["gate"]["warmup"] = 4
    meta_path.write_text(json.dumps(meta))
    from entcal.calibrators.calibrated import _CACHE

    _CACHE.clear()  # (keyed by the file's mtime, which a fast rewrite may leave unchanged)
    after = parse(spec).bind(model)
    assert after.spec == before.spec and after.cache_key() != before.cache_key()
    assert (
        decoder_key(spec, before)["decoder_content"] != decoder_key(spec, after)["decoder_content"]
    )
    assert decoder_key("top_p=0.9", parse("top_p=0.9")) == {"decoder": "top_p=0.9"}


def test_train_config_checks_the_warmup_and_the_lift_before_any_rollout():
    from entcal.calibrators.config import TrainConfig

    TrainConfig(warmup=8).validate()
    TrainConfig().validate()  # None: 0, or with gate_of the predictor's own
    for bad in (2.5, True, -1, 256):
        with pytest.raises(ValueError, match="warmup"):
            TrainConfig(warmup=bad).validate()
    TrainConfig(lift=0.5).validate()
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="lift"):
            TrainConfig(lift=bad).validate()
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lift_quantile"):
            TrainConfig(lift_quantile=bad).validate()
