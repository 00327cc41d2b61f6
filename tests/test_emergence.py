"""Information emergence: the MINE estimator against analytic Gaussian MI, the hooks against
transformers' own hidden states (and the authors' output-is-input pitfall), bad input, the real
model and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from entcal.eval.emergence import (
    capture_block_states,
    check_layers,
    estimate_mi,
    estimate_mi_many,
    information_emergence,
)


def _gauss(n: int, d: int, rho: float, seed: int):
    """x ~ N(0, I_d), y = ρx + √(1−ρ²)ε: I(X;Y) = −(d/2) log(1 − ρ²) nats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y, -d / 2 * math.log(1 - rho**2)


def test_mine_matches_analytic_gaussian_mi_within_10_percent():
    cases = [(1, 0.8), (2, 0.6), (4, 0.5), (3, 0.9)]  # 0.51, 0.45, 0.58, 2.49 nats
    data = [_gauss(10000, d, rho, 100 + i) for i, (d, rho) in enumerate(cases)]
    # One more pair, independent: the estimate must be near 0.
    g = torch.Generator().manual_seed(7)
    xs = [x for x, _, _ in data] + [torch.randn(10000, 3, generator=g)]
    ys = [y for _, y, _ in data] + [torch.randn(10000, 3, generator=g)]
    est = estimate_mi_many(xs, ys, seed=0)
    for (d, rho), (_, _, mi), e in zip(cases, data, est):
        assert abs(e - mi) <= 0.1 * mi, f"d={d} rho={rho}: MINE {e:.3f} vs analytic {mi:.3f}"
    assert abs(est[-1]) < 0.05


def test_estimate_mi_public_single_pair():
    x, y, mi = _gauss(10000, 2, 0.8, 11)  # 1.02 nats
    est = estimate_mi(x, y, seed=1)
    assert isinstance(est, float)
    assert abs(est - mi) <= 0.1 * mi


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


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def test_hooks_capture_real_block_inputs_and_outputs():
    model = _tiny_llama()
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


def test_layer_index_beyond_model_is_rejected():
    model = _tiny_llama()
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
    res = information_emergence(
        model, tok, layers=[0, 15], n_sequences=256, seq_len=4, dim=4, positions=True,
        steps=60, batch_size=64, eval_every=20,
    )  # fmt: skip
    assert res.layers == [0, 15]
    for i in range(2):
        assert math.isfinite(res.ie[i])
        assert res.ie[i] == pytest.approx(res.mi_macro[i] - res.mi_micro[i])
        assert res.mi_micro[i] == pytest.approx(sum(res.mi_micro_positions[i]) / 4)
        assert res.mi_context_positions[i][-1] == res.mi_macro[i]
        assert len(res.ie_positions[i]) == 4
    with pytest.raises(ValueError, match="beyond the model"):
        information_emergence(model, tok, layers=[model.config.num_hidden_layers])


@pytest.mark.slow
def test_cli_emergence(tmp_path, capsys, smollm2):
    from entcal.cli import main

    out = tmp_path / "em"
    args = ["emergence", "--out", str(out), "--layers", "0,29", "--n", "128", "--seq-len", "4"]
    args += ["--dim", "4", "--mine-steps", "40", "--mine-batch", "64", "--no-progress"]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["layers"] == [0, 29] and len(data["ie"]) == 2
    assert (out / "ie_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert "Information emergence" in (out / "report.md").read_text()
    assert main(["emergence", "--out", str(out), "--layers", "30"]) == 2
    assert "layer 30 is beyond the model" in capsys.readouterr().err
