"""Information emergence: the MINE estimator against analytic Gaussian MI, the hooks against
transformers' own hidden states (and the authors' output-is-input pitfall), bad input, the real
model and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from entcal.studies.capture import capture_block_states, check_layers
from entcal.studies.emergence import information_emergence, text_windows
from entcal.studies.mine import estimate_mi, estimate_mi_many


def _gauss(n: int, d: int, rho: float, seed: int):
    """x ~ N(0, I_d), y = ρx + √(1−ρ²)ε: I(X;Y) = −(d/2) log(1 − ρ²) nats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y, -d / 2 * math.log(1 - rho**2)


def test_mine_matches_analytic_gaussian_mi_within_10_percent():
    cases = [(1, 0.8), (2, 0.6), (4, 0.5), (3, 0.9), (4, 0.7)]  # 0.51, 0.45, 0.58, 2.49, 1.35
    data = [_gauss(10000, d, rho, 100 + i) for i, (d, rho) in enumerate(cases)]
    # One more pair, independent: the estimate must be near 0 (the critic starts at T ≡ 0).
    g = torch.Generator().manual_seed(7)
    xs = [x for x, _, _ in data] + [torch.randn(10000, 3, generator=g)]
    ys = [y for _, y, _ in data] + [torch.randn(10000, 3, generator=g)]
    est, se = estimate_mi_many(xs, ys, seed=0, return_se=True)
    for (d, rho), (_, _, mi), e, s in zip(cases, data, est, se):
        assert abs(e - mi) <= 0.1 * mi, f"d={d} rho={rho}: MINE {e:.3f} vs analytic {mi:.3f}"
        # The held-out standard error: a few percent of the MI with 2000 test rows.
        assert 0.005 < s < 0.06, f"d={d} rho={rho}: SE {s}"
    assert -0.02 <= est[-1] < 0.05
    assert se[-1] < 0.02


def test_estimate_mi_public_single_pair_and_seeded():
    x, y, mi = _gauss(10000, 2, 0.8, 11)  # 1.02 nats
    est = estimate_mi(x, y, seed=1)
    assert isinstance(est, float)
    assert abs(est - mi) <= 0.1 * mi
    # Same seed, same number; another seed, another (but close) number.
    small = dict(steps=30, batch_size=128, eval_every=10)
    a = estimate_mi(x[:1000], y[:1000], seed=3, **small)
    assert a == estimate_mi(x[:1000], y[:1000], seed=3, **small)
    assert a != estimate_mi(x[:1000], y[:1000], seed=4, **small)


def test_estimate_mi_reduction_keeps_a_lower_bound():
    # 64-dim x carrying a 2-dim signal in a random rotation: reduced to 8 principal components
    # the estimate is still near the truth and not above it (a projection only lowers MI).
    g = torch.Generator().manual_seed(5)
    x2, y2, mi = _gauss(6000, 2, 0.8, 12)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    x = torch.cat([3 * x2, torch.randn(6000, 62, generator=g)], 1) @ q
    y = torch.cat([3 * y2, torch.randn(6000, 62, generator=g)], 1) @ q
    est = estimate_mi(x, y, dim=8, steps=300, seed=0)
    assert 0.8 * mi <= est <= 1.05 * mi


def test_estimate_mi_bad_input():
    x = torch.randn(200, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        estimate_mi(x, torch.randn(150, 2))
    with pytest.raises(ValueError, match="finite"):
        estimate_mi(x, torch.full((200, 2), float("nan")))
    with pytest.raises(ValueError, match="at least 50"):
        estimate_mi(x[:10], x[:10])
    with pytest.raises(ValueError, match="steps"):
        estimate_mi(x, x, steps=0)
    with pytest.raises(ValueError, match="dim"):
        estimate_mi(x, x, dim=0)
    with pytest.raises(ValueError, match="val_fraction"):
        estimate_mi(x, x, val_fraction=0.6)


@pytest.fixture
def tiny(tiny_llama):
    """Three blocks, vocabulary 50."""
    return tiny_llama(vocab=50, layers=3, max_positions=2048)


def test_hooks_capture_real_block_inputs_and_outputs(tiny):
    model = tiny
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    ins, outs = capture_block_states(model, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    for layer in range(3):
        # The pitfall in the authors' Gemma/OpenLlama samplers: "output" that is the input.
        assert not torch.allclose(outs[layer], ins[layer])
        assert torch.allclose(ins[layer], ref[layer], atol=1e-6)  # transformers' own states
        if layer < 2:
            assert torch.equal(outs[layer], ins[layer + 1])  # output of l feeds block l + 1


def test_first_token_in_context_equals_the_token_alone(tiny):
    # The micro variable of token 0 and the in-context state at position 0 are the same state
    # (causal attention): a known answer for the macro/micro capture.
    model = tiny
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    ins, outs = capture_block_states(model, ids, [1])
    ins0, outs0 = capture_block_states(model, ids[:, :1], [1])
    assert torch.allclose(outs[1][:, 0], outs0[1][:, 0], atol=1e-5)
    assert torch.allclose(ins[1][:, 0], ins0[1][:, 0], atol=1e-5)
    assert not torch.allclose(
        outs[1][:, -1], capture_block_states(model, ids[:, -1:], [1])[1][1][:, 0]
    )


def test_text_windows_are_distinct_and_inside_sentences(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = [
        "One two three four five six seven eight nine ten. " * 3 + "Short one.\n\nA b c d e f g h."
    ]
    w = text_windows(docs, tok, 2, 4, seed=0)
    assert w.shape == (2, 4)
    assert len({tuple(r) for r in w.tolist()}) == 2  # the repeated sentence counts once
    with pytest.raises(ValueError, match="distinct windows"):
        text_windows(docs, tok, 50, 4)
    with pytest.raises(ValueError, match="seq_len"):
        text_windows(docs, tok, 2, 1)


def test_layer_index_beyond_model_is_rejected(tiny):
    model = tiny
    with pytest.raises(ValueError, match=r"layer 3 is beyond the model: it has 3 blocks"):
        check_layers(model, [0, 3])
    with pytest.raises(ValueError, match="beyond the model"):
        capture_block_states(model, torch.zeros(1, 2, dtype=torch.long), [-1])


@pytest.mark.slow
def test_real_model_blocks_change_their_input(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok("The interpreter reads a program")["input_ids"]])
    ins, outs = capture_block_states(model, ids)
    assert len(ins) == model.config.num_hidden_layers
    for layer in ins:
        assert (outs[layer] - ins[layer]).abs().max() > 1e-3


@pytest.mark.slow
def test_information_emergence_real_model(smollm2):
    model, tok = smollm2
    kw = dict(layers=[0, 15], n_sequences=400, seq_len=4, dim=8, steps=60, batch_size=128)
    res = information_emergence(model, tok, positions=True, eval_every=20, **kw)
    assert res.layers == [0, 15] and res.n_test == 80
    for i in range(2):
        assert math.isfinite(res.ie[i]) and 0 < res.ie_se[i] < 1
        assert res.ie[i] == pytest.approx(res.mi_macro[i] - res.mi_micro[i], abs=1e-5)
        assert res.mi_micro[i] == pytest.approx(sum(res.mi_micro_positions[i]) / 4, abs=1e-5)
        assert res.mi_context_positions[i][-1] == pytest.approx(res.mi_macro[i], abs=1e-5)
        assert res.ie_positions[i][-1] == pytest.approx(res.ie[i], abs=1e-5)
        # Whitened 8-dim states plus unit noise: MI(x̃; ỹ) <= MI(x̃; x) <= (8/2)·log 2 = 2.77
        # nats (the capacity of a Gaussian channel with unit power per dimension, whatever the
        # states' distribution); held-out bounds are never far below 0 (zero-started critic).
        for v in [res.mi_macro[i], *res.mi_micro_positions[i]]:
            assert -0.3 < v < 2.77 + 0.5
    with pytest.raises(ValueError, match="beyond the model"):
        information_emergence(model, tok, layers=[model.config.num_hidden_layers])
    with pytest.raises(ValueError, match="noise"):
        information_emergence(model, tok, layers=[0], noise=-1.0)
    with pytest.raises(ValueError, match="unknown MINE settings"):
        information_emergence(model, tok, layers=[0], stepz=3)


@pytest.mark.slow
def test_information_emergence_is_seeded(smollm2):
    model, tok = smollm2
    kw = dict(layers=[3], n_sequences=200, seq_len=4, dim=4, steps=20, batch_size=64)
    a = information_emergence(model, tok, **kw).to_dict()
    assert a == information_emergence(model, tok, **kw).to_dict()
    assert a["ie"] != information_emergence(model, tok, seed=1, **kw).to_dict()["ie"]


@pytest.mark.slow
def test_cli_emergence(tmp_path, capsys, smollm2):
    from entcal.cli import main

    out = tmp_path / "em"
    args = ["emergence", "--out", str(out), "--layers", "0,29", "--n", "128", "--seq-len", "4"]
    args += ["--dim", "4", "--mine-steps", "40", "--mine-batch", "64", "--no-progress"]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["layers"] == [0, 29] and len(data["ie"]) == 2 and len(data["ie_se"]) == 2
    assert data["noise"] == 1.0 and data["dim"] == 4
    assert (out / "ie_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert "Information emergence" in (out / "report.md").read_text()
    assert main(["emergence", "--out", str(out), "--layers", "30"]) == 2
    assert "layer 30 is beyond the model" in capsys.readouterr().err
    assert main(["emergence", "--out", str(out), "--noise", "-1"]) == 2
    assert "--noise must be >= 0" in capsys.readouterr().err
