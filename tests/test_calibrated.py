"""The calibrated decoder's math: application step, candidates, α fit, predictor files, spec."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from entcal.calibrators.alpha import fit_alpha, logloss_terms
from entcal.calibrators.features import candidate_features, feature_names, token_table
from entcal.calibrators.ops import adjusted_logprobs, cover_candidates, entropy_stats, fill_phi
from entcal.calibrators.predictor import (
    FutureEntropyPredictor,
    PredictorFileError,
    predictor_fingerprint,
)

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 6.0, n)[:, None]  # flat to peaked rows
    return torch.randn(n, vocab, generator=g) * scale


def fitted_predictor(model, kind: str = "ridge", dim: int = 4, seed: int = 0):
    """A predictor fitted on synthetic labels with a known dependence on the features."""
    table = token_table(model.get_output_embeddings().weight, dim)
    logits = random_logits(40, table.shape[0], seed)
    lp = torch.log_softmax(logits, -1)
    ids = torch.topk(lp, 12).indices
    pos = torch.arange(40)
    feats = candidate_features(lp, ids, pos, table).reshape(-1, len(feature_names(dim)))
    X = feats.double().numpy()
    y = 20.0 - 2.0 * X[:, 0] + 1.5 * X[:, 2] + 0.5 * X[:, 9]
    groups = np.repeat(np.arange(40), 12)
    pred = FutureEntropyPredictor(estimator=kind, random_state=seed).fit(X, y, groups)
    pred.table_ = table
    return pred, X, y


# ------------------------------------------------------------------ application step


def test_alpha_zero_is_identity():
    lp = torch.log_softmax(random_logits(8), -1)
    phi = torch.randn(8, VOCAB) * 5
    assert torch.allclose(adjusted_logprobs(lp, phi, 0.0), lp, atol=1e-6)


def test_ratio_identity_on_the_papers_worked_rows():
    # Draft §5.2 worked examples: (p̂, Ĥ) of "main", "character", "D", "U"; α = 0.1.
    rows = [(0.013, 141.0), (0.016, 297.0), (0.04, 151.0), (0.22, 132.0)]
    alpha = 0.1
    p = torch.full((VOCAB,), (1.0 - sum(r[0] for r in rows)) / (VOCAB - 4), dtype=torch.float64)
    h = torch.full((VOCAB,), 126.0, dtype=torch.float64)
    for i, (pi, hi) in enumerate(rows):
        p[i], h[i] = pi, hi
    lp = p.log()[None]
    ids = torch.arange(VOCAB)[None]
    phi = fill_phi(lp, ids, torch.ones_like(ids, dtype=torch.bool), h[None])
    q = adjusted_logprobs(lp, phi, alpha)[0].exp()
    for a in range(4):
        for b in range(4):
            expected = (p[a] / p[b]) ** (1 + alpha) * math.exp(-alpha * (h[a] - h[b]))
            assert float(q[a] / q[b]) == pytest.approx(float(expected), rel=1e-9)
    # "character" (Ĥ 297) is penalized against "main" although more probable.
    assert q[1] < q[0]


def test_non_candidates_get_mass_weighted_mean():
    lp = torch.log_softmax(random_logits(6), -1)
    ids, valid = cover_candidates(lp)
    h = torch.rand(ids.shape) * 50
    phi = fill_phi(lp, ids, valid, h)
    for i in range(6):
        c = ids[i, valid[i]]
        w = lp[i, c].exp()
        mean = float((w * h[i, valid[i]]).sum() / w.sum())
        others = torch.ones(VOCAB, dtype=torch.bool)
        others[c] = False
        if others.any():
            assert torch.allclose(
                lp[i, others] - phi[i, others], torch.full_like(phi[i, others], mean), atol=1e-4
            )
        assert torch.allclose(lp[i, c] - phi[i, c], h[i, valid[i]], atol=1e-4)


@pytest.mark.parametrize("vocab", [50, 3000])
def test_cover_candidates_is_minimal_and_matches_full_sort(vocab):
    logits = random_logits(24, vocab, seed=vocab)
    logits[0, 5:] = float("-inf")  # a row with 5 allowed tokens
    lp = torch.log_softmax(logits, -1)
    ids, valid = cover_candidates(lp)
    probs = lp.exp()
    for i in range(24):
        srt = probs[i].sort(descending=True).values.double()
        k = int(valid[i].sum())
        cum = srt.cumsum(0)
        assert cum[k - 1] >= 1 - 1e-4 - 1e-6 or k == int((srt > 0).sum())
        if k > 1:
            assert cum[k - 2] < 1 - 1e-4 + 1e-6
        assert torch.equal(
            probs[i, ids[i, valid[i]]].sort(descending=True).values,
            probs[i].sort(descending=True).values[:k],
        )
    assert int(valid[0].sum()) <= 5


def test_adjusted_keeps_masked_tokens_masked_and_rejects_alpha_le_minus_one():
    logits = random_logits(3)
    logits[:, :10] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    phi = torch.randn_like(lp)
    out = adjusted_logprobs(lp, phi, torch.tensor([0.5, -0.5, 2.0]))
    assert torch.isinf(out[:, :10]).all() and torch.isfinite(out[:, 10:]).all()
    assert torch.allclose(out.exp().sum(-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        adjusted_logprobs(lp, phi, -1.0)


def test_entropy_stats_reference():
    lp = torch.log_softmax(random_logits(5).double(), -1)
    ent, var = entropy_stats(lp)
    p = lp.exp()
    ref_h = -(p * lp).sum(-1)
    ref_v = (p * (lp + ref_h[:, None]) ** 2).sum(-1)
    assert torch.allclose(ent, ref_h) and torch.allclose(var, ref_v)


# ------------------------------------------------------------------ α fit


def _synthetic_alpha_data(alpha_true: list[float], n_per: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nb = len(alpha_true)
    lp = torch.log_softmax(torch.randn(nb * n_per, VOCAB, generator=g, dtype=torch.float64) * 2, -1)
    phi = lp - torch.rand(nb * n_per, VOCAB, generator=g, dtype=torch.float64) * 6
    alpha = torch.tensor(alpha_true, dtype=torch.float64).repeat_interleave(n_per)
    q = adjusted_logprobs(lp, phi, alpha).exp()
    y = torch.multinomial(q, 1, generator=g)[:, 0]
    position = torch.arange(nb).repeat_interleave(n_per) * 10
    return lp, phi, y, position


def test_fit_alpha_recovers_known_alpha_and_never_raises_loss():
    lp, phi, y, _ = _synthetic_alpha_data([0.4], n_per=3000)
    fit = fit_alpha(lp, phi, y)
    assert fit.alpha[0] == pytest.approx(0.4, abs=0.08)
    assert fit.loss_at_alpha[0] <= fit.loss_at_zero[0]
    assert abs(fit.gradient[0]) < 1e-6
    # the minimum of a convex function: a grid around it never does better
    for a in torch.linspace(-0.5, 1.5, 21).tolist():
        grid = logloss_terms(lp, phi, y, torch.full((len(y),), a, dtype=torch.float64))[0].mean()
        assert fit.loss_at_alpha[0] <= float(grid) + 1e-9


def test_fit_alpha_per_bucket():
    lp, phi, y, pos = _synthetic_alpha_data([-0.3, 0.0, 0.8], n_per=2000, seed=1)
    fit = fit_alpha(lp, phi, y, pos, bucket_edges=[10, 20])
    assert fit.alpha == pytest.approx([-0.3, 0.0, 0.8], abs=0.12)
    assert all(a <= z + 1e-12 for a, z in zip(fit.loss_at_alpha, fit.loss_at_zero))
    assert fit.counts == [2000, 2000, 2000]


def test_fit_alpha_on_unrelated_phi_stays_near_zero_and_never_worse():
    # φ unrelated to what generated y: the fit may not raise the loss above α = 0.
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(500, VOCAB, generator=g) * 2, -1)
    y = torch.multinomial(lp.exp(), 1, generator=g)[:, 0]
    phi = torch.randn(500, VOCAB, generator=g)
    fit = fit_alpha(lp, phi, y)
    assert fit.loss_at_alpha[0] <= fit.loss_at_zero[0]
    assert abs(fit.alpha[0]) < 0.3


# ------------------------------------------------------------------ predictor


@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_predictor_torch_matches_sklearn_and_roundtrips(tmp_path, kind):
    model = tiny_llama()
    pred, X, y = fitted_predictor(model, kind)
    assert pred.kind_ == kind
    if kind == "ridge":
        assert pred.scores_["r2_heldout"] > 0.99  # labels are linear in the features
    # differential: the torch re-expression against scikit-learn's own estimator
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor

    Xs = (X - pred.x_mean_) / pred.x_scale_
    ys = (y - pred.y_mean_) / pred.y_scale_
    est = pred._make(kind, len(y))
    assert isinstance(est, Ridge if kind == "ridge" else MLPRegressor)
    from entcal.calibrators.predictor import _quiet_fit

    est = _quiet_fit(est, Xs, ys)
    ref = est.predict(Xs) * pred.y_scale_ + pred.y_mean_
    assert np.allclose(pred.predict(X), ref, atol=1e-3 * max(1.0, np.abs(ref).max()))
    pred.meta_ = {"alpha": {"global": 0.2, "bucket_edges": [16], "bucket_values": [0.1, 0.3]}}
    folder = pred.save(tmp_path / "p", fingerprint=predictor_fingerprint(model, "tiny"))
    back = FutureEntropyPredictor.load(folder, model=model)
    assert np.allclose(back.predict(X), pred.predict(X), atol=1e-2)  # table stored in float16
    assert back.alpha_for(torch.tensor([0, 15, 16, 100])).tolist() == pytest.approx(
        [0.1, 0.1, 0.3, 0.3]
    )


def _saved(tmp_path):
    model = tiny_llama()
    pred, _, _ = fitted_predictor(model)
    pred.meta_ = {"alpha": {"global": 0.25, "bucket_edges": [], "bucket_values": []}}
    return model, pred.save(tmp_path / "pred", fingerprint=predictor_fingerprint(model, "tiny"))


def test_predictor_file_errors(tmp_path):
    model, folder = _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FutureEntropyPredictor.load(tmp_path / "nowhere")
    # another model (other vocabulary) and the same shape with other weights
    with pytest.raises(PredictorFileError, match="vocab_size"):
        FutureEntropyPredictor.load(folder, model=tiny_llama(vocab=80))
    with pytest.raises(PredictorFileError, match="weights differ"):
        FutureEntropyPredictor.load(folder, model=tiny_llama(seed=7))
    tensors = folder / "predictor.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PredictorFileError, match="truncated or corrupted"):
        FutureEntropyPredictor.load(folder)
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    tensors.write_bytes(bytes(corrupt))
    with pytest.raises(PredictorFileError, match="truncated or corrupted"):
        FutureEntropyPredictor.load(folder)
    tensors.write_bytes(data)
    meta = folder / "predictor.json"
    text = meta.read_text()
    meta.write_text(text[:100])
    with pytest.raises(PredictorFileError, match="not valid JSON"):
        FutureEntropyPredictor.load(folder)
    meta.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PredictorFileError, match="format version"):
        FutureEntropyPredictor.load(folder)
    meta.write_text(text)
    assert FutureEntropyPredictor.load(folder, model=model).kind_ == "ridge"


# ------------------------------------------------------------------ decoder


def test_decoder_spec_state_and_errors(tmp_path):
    from entcal.decoding import parse
    from entcal.decoding.calibrated import CalibratedDecoder, calibrated_logprobs

    model, folder = _saved(tmp_path)
    d = parse(f"calibrated:predictor={folder},alpha=0.3")
    assert isinstance(d, CalibratedDecoder) and d.requires_history
    assert parse(str(d)) == d and str(d) == f"calibrated:predictor={folder},alpha=0.3"
    assert parse(f"calibrated:predictor={folder}").alpha == "fitted"
    d.bind(model)
    with pytest.raises(PredictorFileError):
        d.bind(tiny_llama(seed=3))
    with pytest.raises(ValueError, match="alpha"):
        parse(f"calibrated:predictor={folder},alpha=-1")
    with pytest.raises(ValueError, match="alpha"):
        parse(f"calibrated:predictor={folder},alpha=hot")
    with pytest.raises(ValueError, match="unknown option 'beta'"):
        parse(f"calibrated:predictor={folder},beta=1")
    with pytest.raises(FileNotFoundError):
        parse(f"calibrated:predictor={tmp_path}/missing")

    logits = random_logits(4)
    before = logits.clone()
    d.reset(4)
    out0 = d(logits)
    assert torch.equal(logits, before)  # never in place
    assert out0.dtype == torch.float32
    pred = d.predictor
    ref = calibrated_logprobs(logits, pred, torch.zeros(4, dtype=torch.long), 0.3)
    assert torch.allclose(out0, ref)
    d.observe(torch.zeros(4, dtype=torch.long))
    d.observe(torch.zeros(4, dtype=torch.long))
    assert d.pos_.tolist() == [2, 2, 2, 2]
    assert torch.allclose(d(logits), calibrated_logprobs(logits, pred, torch.full((4,), 2), 0.3))
    zero = parse(f"calibrated:predictor={folder},alpha=0")
    assert torch.allclose(zero(logits), torch.log_softmax(logits, -1), atol=1e-6)
    bad = logits.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError):
        d(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        d(torch.randn(2, VOCAB + 1))


def test_mixed_batch_matches_per_instance(tmp_path):
    from entcal.decoding import apply_rows, parse

    _, folder = _saved(tmp_path)
    a = parse(f"calibrated:predictor={folder},alpha=0.3")
    b = parse(f"calibrated:predictor={folder},alpha=-0.2")
    a.reset(1)
    b.reset(1)
    b.observe(torch.tensor([0]))
    logits = random_logits(2, seed=5)
    mixed = apply_rows(logits, [a, b])
    assert torch.allclose(mixed[0], a(logits[:1])[0], atol=1e-6)
    assert torch.allclose(mixed[1], b(logits[1:])[0], atol=1e-6)


def test_ridge_full_vocabulary_path_equals_features_path():
    model = tiny_llama()
    pred, _, _ = fitted_predictor(model, "ridge")
    logits = random_logits(10)
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(10) * 7
    ids, _valid, h = pred.candidate_entropy(lp, pos)
    feats = candidate_features(lp, ids, pos, pred.table_)
    assert torch.allclose(h, pred.predict_features(feats), atol=1e-3)


def test_ridge_phi_fast_path_equals_candidate_path():
    """The shipped (ridge) predictor's dense φ (closed-form Ĥ of every token, candidates from
    cover_mask) equals fill_phi over the same candidates with Ĥ from the predictor's features."""
    from entcal.calibrators.features import candidate_features
    from entcal.calibrators.ops import cover_mask
    from entcal.decoding.calibrated import load_predictor

    pred = load_predictor()
    g = torch.Generator().manual_seed(4)
    v = pred.table_.shape[0]
    x = torch.randn(6, v, generator=g) * torch.tensor([0.5, 1, 2, 3, 4, 6])[:, None]
    lp = torch.log_softmax(x, -1)
    pos = torch.tensor([0, 1, 5, 17, 100, 300])
    keep = cover_mask(lp)
    m = int(keep.sum(-1).max())
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices
    ids, valid = order[:, :m], keep.gather(-1, order[:, :m])
    h = pred.predict_features(candidate_features(lp, ids, pos, pred.table_))
    slow = fill_phi(lp, ids, valid, h)
    assert torch.allclose(pred.phi(lp, pos), slow, atol=1e-3, rtol=1e-5)


def test_ridge_adjusted_fast_path_equals_phi_then_adjust():
    """The fused ridge application step equals log_softmax(lp + α·φ) with φ from the dense fill."""
    from entcal.calibrators.ops import cover_mask, fill_phi_dense
    from entcal.decoding.calibrated import load_predictor

    pred = load_predictor()
    g = torch.Generator().manual_seed(5)
    v = pred.table_.shape[0]
    x = torch.randn(5, v, generator=g) * torch.tensor([0.5, 1, 2, 4, 6])[:, None]
    x[1, :100] = float("-inf")  # masked tokens stay masked
    lp = torch.log_softmax(x, -1)
    pos = torch.tensor([0, 3, 17, 100, 300])
    alpha = torch.tensor([0.0, 0.2, -0.3, 0.05, 1.0])
    t = pred._tensors(lp.device)
    h = pred._ridge_full(lp, pos, entropy_stats(lp), t)
    keep = cover_mask(lp) & (lp > float("-inf"))
    ref = adjusted_logprobs(lp, fill_phi_dense(lp, keep, h), alpha)
    ours = pred.adjusted(lp, pos, alpha)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=2e-4)
    assert torch.allclose(ours[0], lp[0], atol=1e-5)  # α = 0 is the identity


def test_cover_mask_covers_the_mass_and_contains_the_minimal_cover():
    from entcal.calibrators.ops import COVER_MASS, cover_mask

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3000, generator=g) * torch.tensor([0.3, 1, 3, 8])[:, None]
    lp = torch.log_softmax(x, -1)
    keep = cover_mask(lp)
    p = lp.double().exp()
    assert bool(((p * keep).sum(-1) >= COVER_MASS * p.sum(-1) - 1e-12).all())
    ids, valid = cover_candidates(lp)
    for i in range(4):
        assert bool(keep[i, ids[i, valid[i]]].all())
        # at most the tokens within one 0.25-nat step of the minimal cover's boundary are extra
        edge = lp[i, ids[i, valid[i]]].min()
        assert bool((lp[i, keep[i]] >= edge - 0.25 - 1e-5).all())
