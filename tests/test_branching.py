"""Branching analysis: known answers on a synthetic Galton–Watson "LM" (R set exactly, on both
sides of 1), formula and interpolation checks, bad input, the real model and the CLI."""

from __future__ import annotations

import json
import math

import pytest

from entcal.studies.branching import BranchingResult, branching_analysis, branching_sweep
from entcal.studies.branching_stats import critical_theta, predicted_erroneous
from entcal.synthetic import BranchingSourceLM, synthetic_pairs


@pytest.mark.parametrize(("R", "seed"), [(0.6, 1), (1.5, 2)])
def test_recovers_R_and_beta_of_a_galton_watson_source(R, seed):
    """R is set exactly by the source; R̂ must be within 2 standard errors and its 95% interval
    on the right side of 1 (subcritical below, supercritical above)."""
    model = BranchingSourceLM(R=R, beta=1.0, theta=0.1, seed=seed)
    res = branching_analysis(
        model, synthetic_pairs(64, 12), theta=0.1, max_list=96, n_boot=500, seed=seed
    )
    assert abs(res.R - R) <= 2 * res.R_se, (res.R, res.R_se)
    assert res.R_low <= R <= res.R_high
    assert 0 < res.R_se < 0.05
    if R < 1:
        assert res.R_high < 1.0
    else:
        assert res.R_low > 1.0
    assert abs(res.beta - 1.0) <= 3 * res.beta_se
    assert res.ref_kept_rate == 1.0  # the source always gives the reference token q > θ
    # Measured mean erroneous count tracks β̂(1 − R̂ᵗ)/(1 − R̂) (final step within 20%).
    assert res.erroneous_mean[-1] == pytest.approx(res.erroneous_predicted[-1], rel=0.2)
    if R > 1:
        assert res.cap_hit_rate > 0  # the weighted count went beyond the cap and still matched
        assert res.erroneous_mean[-1] > 96


def test_small_cap_keeps_estimates_unbiased():
    """With a cap far below the population, uniform subsampling + Horvitz–Thompson weights keep
    R̂ and the erroneous-count estimate on target."""
    model = BranchingSourceLM(R=1.4, beta=1.0, theta=0.1, seed=3)
    res = branching_analysis(model, synthetic_pairs(64, 12), theta=0.1, max_list=8, n_boot=200)
    assert res.cap_hit_rate > 0.5
    assert abs(res.R - 1.4) <= 2.5 * res.R_se
    assert max(res.list_size_mean) <= 8
    assert res.erroneous_mean[-1] == pytest.approx(res.erroneous_predicted[-1], rel=0.3)


def test_wrong_cache_order_would_be_detected():
    """The source reads its history from the cache: the on-reference rows are exactly the ones the
    analysis feeds the reference token, so β̂ ≈ β only if the cache follows the rows."""
    model = BranchingSourceLM(R=0.0, beta=2.0, theta=0.1, seed=4)
    res = branching_analysis(model, synthetic_pairs(32, 8), theta=0.1, max_list=32, n_boot=100)
    # R = 0: erroneous candidates never have children; a cache mix-up would give them β-rows.
    assert res.R == 0.0
    assert abs(res.beta - 2.0) <= 3 * res.beta_se
    assert res.erroneous_mean == pytest.approx(res.erroneous_predicted, rel=0.25)


def test_predicted_erroneous_formula():
    assert predicted_erroneous(2.0, 1.0, 4) == [2.0, 4.0, 6.0, 8.0]
    vals = predicted_erroneous(1.0, 0.5, 60)
    assert vals[0] == 1.0 and vals[1] == 1.5
    assert vals[-1] == pytest.approx(2.0)  # β/(1 − R)
    assert predicted_erroneous(1.0, 2.0, 3) == [1.0, 3.0, 7.0]


def _fake(theta, R):
    return BranchingResult(theta, None, 1, 1, 1, R, 0, R, R, 0, 0, [0], [0], [0], 1, 1, 0)


def test_critical_theta_interpolates_in_log_theta():
    res = [_fake(0.01, 3.0), _fake(0.1, 1.5), _fake(1.0 / 3, 0.5)]
    crit = critical_theta(res)
    # halfway between R = 1.5 and 0.5 in log θ between 0.1 and 1/3
    assert crit == pytest.approx(math.exp(0.5 * (math.log(0.1) + math.log(1 / 3))))
    assert critical_theta([_fake(0.1, 2.0), _fake(0.2, 1.5)]) is None


def test_bad_input():
    model = BranchingSourceLM(R=1.0, theta=0.1)
    pairs = synthetic_pairs(4, 5)
    for theta in (0.0, 1.0, 1.2, -0.5):
        with pytest.raises(ValueError, match="theta"):
            branching_analysis(model, pairs, theta=theta)
    with pytest.raises(ValueError, match="max_list"):
        branching_analysis(model, pairs, theta=0.1, max_list=0)
    with pytest.raises(ValueError, match="steps"):
        branching_analysis(model, pairs, theta=0.1, steps=6)
    with pytest.raises(ValueError, match="pairs"):
        branching_analysis(model, [], theta=0.1)
    with pytest.raises(ValueError, match="R must"):
        BranchingSourceLM(R=20.0, theta=0.1)


@pytest.mark.slow
def test_real_model_sweep(smollm2):
    from entcal import corpora

    model, tok = smollm2
    pairs = corpora.make_pairs(
        corpora.load_corpus(), tok, prompt_tokens=32, continuation_tokens=6, n=3, seed=1
    )
    res = branching_sweep(model, pairs, [0.05, 0.3], steps=6, max_list=8, n_boot=200)
    lo, hi = res
    # Teacher forcing: the correct prefixes and their logits are the same for both θ, so a
    # higher threshold keeps fewer wrong children and passes the reference token less often.
    assert lo.beta >= hi.beta
    assert lo.ref_kept_rate >= hi.ref_kept_rate
    for r in res:
        assert math.isfinite(r.beta) and r.n_parents >= 0
        if r.n_parents:
            assert r.R_low <= r.R <= r.R_high
            assert 0 <= r.R <= math.floor(1 / r.theta)
        assert max(r.list_size_mean) <= 8


@pytest.mark.slow
def test_cli_listdecode_writes_outputs(tmp_path, smollm2):
    from entcal.cli import main

    out = tmp_path / "ld"
    rc = main(
        [
            "listdecode", "--out", str(out), "--n", "2", "--steps", "4", "--prompt-tokens", "24",
            "--thetas", "0.1,0.3", "--max-list", "4", "--n-boot", "50", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [row["theta"] for row in data["thetas"]] == [0.1, 0.3]
    for row in data["thetas"]:
        assert {"theta", "R", "R_low", "R_high", "beta"} <= set(row)
    assert (out / "report.md").read_text().startswith("# List decoding")
    for name in ("erroneous_vs_step.png", "R_vs_theta.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--thetas", "1.5"], "theta"),
        (["--thetas", "0"], "theta"),
        (["--max-list", "0"], "max_list"),
    ],
)
def test_cli_listdecode_bad_input(tmp_path, capsys, args, msg):
    from entcal.cli import main

    assert main(["listdecode", "--out", str(tmp_path), *args]) == 2
    assert msg in capsys.readouterr().err
