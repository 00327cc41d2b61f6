"""Pure metric functions: known answers and differential tests against reference code."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from entcal.eval import calibration, detect, diversity, typical

# --------------------------------------------------------------------------- calibration


def test_weighted_mean_matches_delta_method_by_hand():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(7, 9))
    mask = rng.random((7, 9)) < 0.8
    mask[:, 0] = True
    mean, se = calibration.weighted_mean(torch.tensor(vals), torch.tensor(mask))
    sums = (vals * mask).sum(1)
    counts = mask.sum(1)
    m = sums.sum() / counts.sum()
    var = 7 / 6 * ((sums - m * counts) ** 2).sum() / counts.sum() ** 2
    assert mean == pytest.approx(m)
    assert se == pytest.approx(math.sqrt(var))
    # Equal lengths: the clustered error is the standard error of the per-text means.
    full = np.ones((7, 9), dtype=bool)
    _, se_full = calibration.weighted_mean(torch.tensor(vals), torch.tensor(full))
    assert se_full == pytest.approx(vals.mean(1).std(ddof=1) / math.sqrt(7))


def test_per_step_mean_and_slope_known_line():
    steps = torch.arange(50, dtype=torch.float64)
    vals = 2.0 + 0.01 * steps + torch.zeros(6, 1, dtype=torch.float64)
    vals += torch.linspace(-0.1, 0.1, 6, dtype=torch.float64)[:, None]
    mask = torch.ones_like(vals, dtype=torch.bool)
    mean, se, count = calibration.per_step_mean(vals, mask)
    assert torch.allclose(mean, 2.0 + 0.01 * steps)
    offsets = torch.linspace(-0.1, 0.1, 6, dtype=torch.float64)
    assert torch.allclose(se, offsets.std() / math.sqrt(6) + 0 * se)
    assert (count == 6).all()
    slope, slope_se = calibration.entropy_slope(vals, mask)
    assert slope == pytest.approx(0.01)
    assert slope_se == pytest.approx(0.0, abs=1e-12)


def test_entropy_calibration_truncation_is_honest():
    gen = torch.full((4, 5), 2.0)
    gmask = torch.ones(4, 5, dtype=torch.bool)
    human = torch.full((4, 5), -1.5)
    human[0, 2] = -math.inf  # one excluded human token
    raw = torch.full((4, 5), -1.7)
    res = calibration.entropy_calibration(gen, gmask, human, gmask, raw)
    assert res.human_log_loss == math.inf and res.entce == -math.inf
    assert res.human_tokens_excluded == pytest.approx(1 / 20)
    assert res.human_log_loss_included == pytest.approx(1.5)
    assert res.raw_log_loss_included == pytest.approx(1.7)
    assert res.log_loss_gap == pytest.approx(-0.2)
    assert res.entce_included == pytest.approx(0.5)
    ok = calibration.entropy_calibration(gen, gmask, raw, gmask, raw)
    assert ok.entce == pytest.approx(0.3) and ok.human_tokens_excluded == 0.0
    assert ok.log_loss_gap == pytest.approx(0.0)


def test_calibration_bad_input():
    with pytest.raises(ValueError, match="mask"):
        calibration.weighted_mean(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no valid token"):
        calibration.weighted_mean(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- typical set


def test_aep_known_values_and_z():
    # Two texts of 4 tokens: surprisal - entropy = +0.5 and -0.25 everywhere, varentropy 1.
    lp = torch.tensor([[-2.5] * 4, [-1.75] * 4])
    ent = torch.full((2, 4), 2.0)
    var = torch.ones(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    res = typical.aep(lp, ent, var, mask, epsilon=0.3)
    assert res.log_perplexity == pytest.approx([2.5, 1.75])
    assert res.mean_entropy == pytest.approx([2.0, 2.0])
    assert res.z == pytest.approx([2 * 0.5, 2 * -0.25])
    assert res.mean_abs_gap == pytest.approx(0.375)
    assert res.typical_fraction == 0.5
    assert res.curve["n"] == [1, 2, 4]
    assert res.curve["envelope"] == pytest.approx([1.0, math.sqrt(1 / 2), 0.5])


def test_aep_z_is_standard_normal_for_gaussian_martingale():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(500, 64, generator=gen, dtype=torch.float64) * 1.3
    ent = torch.full((500, 64), 3.0, dtype=torch.float64)
    res = typical.aep(-(ent + z), ent, torch.full_like(ent, 1.69), torch.ones(500, 64).bool())
    assert res.z_ks_pvalue > 0.01
    assert res.z_std == pytest.approx(1.0, abs=0.1)
    shifted = typical.aep(
        -(ent + z + 0.3), ent, torch.full_like(ent, 1.69), torch.ones(500, 64).bool()
    )
    assert shifted.z_ks_pvalue < 1e-6


def test_aep_zero_varentropy_gives_nan_z():
    res = typical.aep(
        torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4).bool()
    )
    assert all(math.isnan(z) for z in res.z) and math.isnan(res.z_ks_pvalue)
    with pytest.raises(ValueError, match="epsilon"):
        typical.aep(
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.ones(1, 1).bool(),
            epsilon=0,
        )


# --------------------------------------------------------------------------- detectors


def test_detector_scores_by_hand():
    lp = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    ent = torch.tensor([[2.0, 2.0], [1.0, 3.0]])
    var = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    rank = torch.tensor([[1, 4], [2, 2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    xent = torch.tensor([[2.0, 2.0], [4.0, 4.0]])
    s = detect.detector_scores(lp, ent, var, mask, rank, xent)
    assert s["log_likelihood"] == pytest.approx([-2.0, -2.0])
    assert s["log_rank"] == pytest.approx([-math.log(4) / 2, -math.log(2)])
    assert s["entropy"] == pytest.approx([-2.0, -2.0])
    assert s["typicality"] == pytest.approx([0.0, 0.0])
    assert s["binoculars"] == pytest.approx([-1.0, -0.5])


def test_auroc_and_tpr_known_answers():
    from sklearn.metrics import roc_auc_score

    human = np.arange(100, dtype=float)
    machine = np.arange(100, dtype=float) + 1000
    assert detect.auroc(human, machine) == 1.0
    assert detect.tpr_at_fpr(human, machine) == 1.0
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.5, size=200)
    ref = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert detect.auroc(a, b) == pytest.approx(ref)
    # TPR at 1% FPR: 3 of 300 human scores may be flagged, so the best threshold lies just
    # above the 4th highest human score.
    thr = np.sort(a)[-4]
    assert detect.tpr_at_fpr(a, b) == pytest.approx((b > thr).mean(), abs=1e-12)
    with pytest.raises(ValueError, match="fpr"):
        detect.tpr_at_fpr(a, b, 2.0)


# --------------------------------------------------------------------------- diversity


def test_distinct_repetition_zipf_known_answers():
    texts = [[1, 2, 1, 2, 1], [3, 3, 3]]
    # bigrams: (1,2),(2,1),(1,2),(2,1),(3,3),(3,3) -> 3 unique / 6
    assert diversity.distinct_n(texts, 2) == pytest.approx(0.5)
    assert diversity.distinct_n(texts, 1) == pytest.approx(3 / 8)
    # seq-rep-2: text 1: 1 - 2/4, text 2: 1 - 1/2
    assert diversity.repetition(texts, 2) == pytest.approx(0.5)
    # An exact power law: frequency of rank r is round(10000 / r^1.2) (top ranks exact enough).
    tokens = []
    for r in range(1, 41):
        tokens += [r] * round(10000 / r**1.2)
    assert diversity.zipf_coefficient([tokens]) == pytest.approx(1.2, abs=0.01)
    with pytest.raises(ValueError, match="n must"):
        diversity.distinct_n(texts, 0)


def test_loop_detection():
    rng = random.Random(0)
    base = [rng.randrange(1000) for _ in range(60)]
    assert diversity.loop_fraction([base]) == 0.0
    assert diversity.loop_fraction([base + [7, 8, 9] * 3]) == 1.0
    assert diversity.loop_fraction([base + [5] * 60]) == 1.0
    assert diversity.loop_fraction([base + [5] * 9]) == 1.0  # '5 5 5' three times
    assert diversity.loop_fraction([base + [5] * 5]) == 0.0


def test_self_bleu_matches_nltk():
    """Differential test against NLTK's sentence_bleu (method1 smoothing, BLEU-4, other texts as
    references), on random texts with plenty of shared n-grams and unequal lengths."""
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(0)
    for trial in range(5):
        vocab = 6 + 4 * trial
        texts = [[rng.randrange(vocab) for _ in range(rng.randint(5, 30))] for _ in range(12)]
        smooth = nltk_bleu.SmoothingFunction().method1
        ref = np.mean(
            [
                nltk_bleu.sentence_bleu(
                    texts[:i] + texts[i + 1 :],
                    texts[i],
                    weights=(0.25,) * 4,
                    smoothing_function=smooth,
                )
                for i in range(len(texts))
            ]
        )
        assert diversity.self_bleu(texts) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_identical_texts_have_self_bleu_one():
    texts = [[1, 2, 3, 4, 5, 6]] * 4
    assert diversity.self_bleu(texts) == pytest.approx(1.0)
    assert math.isnan(diversity.self_bleu(texts[:1]))


def test_mauve_is_optional():
    out = diversity.mauve_score(np.zeros((4, 3)), np.ones((4, 3)))
    try:
        import mauve  # noqa: F401
    except ImportError:
        assert out is None
    else:
        assert 0.0 <= out <= 1.0
