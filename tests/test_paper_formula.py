"""The paper's future-entropy formula (the lookahead comparator's math): p_α, φ, the α fit."""

from __future__ import annotations

import math

import pytest
import torch

from entcal.calibrators.alpha import fit_alpha, logloss_terms
from entcal.calibrators.paper_formula import adjusted_logprobs, fill_phi
from entcal.decoding.ops import entropy_varentropy

VOCAB = 64


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 6.0, n)[:, None]  # flat to peaked rows
    return torch.randn(n, vocab, generator=g) * scale


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
    ent, var = entropy_varentropy(lp)
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
