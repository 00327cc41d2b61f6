"""``entcal train --engine vllm``: the rollouts come from vLLM (token ids), everything else from
the same teacher-forced passes as with transformers."""

from __future__ import annotations

import json

import pytest

ARGS = [
    "--quiet", "--fit-docs", "4", "--gate-docs", "2", "--prompt-tokens", "16", "--length", "24",
    "--horizon", "6", "--projection-dim", "4", "--threshold-quantiles", "0.5,0.9",
    "--bucket-edges", "12", "--gate-rounds", "1", "--batch-size", "4",
]  # fmt: skip


def test_vllm_args_need_the_vllm_engine(tmp_path, capsys):
    from entcal.cli import main

    rc = main(["train", "--out", str(tmp_path), "--vllm-arg", "dtype=bfloat16", *ARGS])
    assert rc == 2 and "need engine='vllm'" in capsys.readouterr().err
    rc = main(["train", "--out", str(tmp_path), "--engine", "vllm", "--vllm-arg", "=1", *ARGS])
    assert rc == 2 and "NAME=VALUE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.vllm
def test_train_rollouts_through_vllm(tmp_path):
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    from entcal import models
    from entcal.calibrators.predictor import FutureEntropyPredictor
    from entcal.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--engine", "vllm", *ARGS]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["engine"] == "vllm"
    assert report["states"]["n_states"] == 2 * 4 * 24
    tokens = load_file(out / "data" / "rollouts.safetensors")["tokens"]
    assert tokens.shape == (4, 24 + 6)
    model, _ = models.load("smollm2-135m")
    assert tokens.min() >= 0 and tokens.max() < model.config.vocab_size
    assert len({tuple(row) for row in tokens.tolist()}) == 4  # four different samples
    pred = FutureEntropyPredictor.load(out / "predictor", model=model)
    assert len(pred.gate_["strength"]) == 2
    # the engine is part of the run: the same folder refuses the transformers engine
    assert main(["train", "--out", str(out), *ARGS]) == 2
