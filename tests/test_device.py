"""Device and dtype: a device that is not here fails at once naming it; bfloat16 weights still give
float32 statistics; on a GPU (skipped here when none is present) every decoder, generation and
scoring keep their work on the model's device."""

from __future__ import annotations

import pytest
import torch

from entcal import devices, models
from entcal.cli import main

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_missing_cuda_is_a_clear_error_naming_the_device(device, capsys, tmp_path):
    with pytest.raises(ValueError, match=f"device '{device}': no CUDA device"):
        devices.resolve_device(device)
    for argv in (
        ["compare", "--device", device, "--quick", "--out", str(tmp_path)],
        ["generate", "--device", device, "hello"],
        ["train", "--device", device, "--out", str(tmp_path)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"device '{device}'" in err and "Traceback" not in err


def test_device_and_dtype_values():
    assert devices.resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert devices.resolve_device("CPU") == torch.device("cpu")
    if not CUDA:
        assert devices.resolve_dtype("auto", "auto") == torch.float32
    assert devices.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="device 'gpu0' is not a device"):
        devices.resolve_device("gpu0")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        devices.resolve_dtype("int8")
    with pytest.raises(ValueError, match="dtype"):
        devices.resolve_dtype(torch.int64)


@pytest.mark.slow
def test_bfloat16_weights_give_float32_statistics():
    from entcal.decoding import parse
    from entcal.eval import scoring
    from entcal.generation import generate

    model, tok = models.load("smollm2-135m", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # a temperature, not a truncation: bf16 rounding differs between the incremental and the
    # teacher-forced pass (and with the thread count), which can move a token across a
    # nucleus boundary and make a replayed log-prob -inf
    spec = "temperature=0.9"
    gens = generate(model, tok, ["The capital of France is"], spec, max_new_tokens=6)
    g = gens[0]
    for t in (g.logprob, g.entropy, g.varentropy, g.raw_logprob, g.raw_entropy):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    prompt = tok("The capital of France is")["input_ids"]
    s = scoring.score(model, [prompt], [g.token_ids], {"p": parse(spec)})
    assert s.raw.entropy.dtype == torch.float32
    # the teacher-forced replay sees the distribution generation sampled from, bf16 rounding of
    # the two forward passes aside: a bf16 logit near 20-30 carries up to ~0.1 of rounding, and
    # a log-prob is a difference of such terms
    diff = (s.processed["p"].logprob[0] - g.logprob).abs()
    assert float(diff.max()) < 0.3 and float(diff.mean()) < 0.1, diff


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_everything_stays_on_the_gpu():
    from test_contract import ROW_SPECS

    from entcal.decoding import apply_rows, parse
    from entcal.eval import scoring
    from entcal.generation import generate

    dev = torch.device("cuda")
    logits = torch.randn(8, 49152, device=dev) * 3
    for spec in ROW_SPECS:
        d = parse(spec)
        d.reset(8)
        out = d(logits)
        assert out.device == dev, spec
    mixed = apply_rows(logits, [parse(s) for s in ROW_SPECS[:8]])
    assert mixed.device == dev
    model, tok = models.load("smollm2-135m", device="cuda", dtype="bfloat16")
    gens = generate(model, tok, ["Hello"], "calibrated", max_new_tokens=4)
    prompt = tok("Hello")["input_ids"]
    s = scoring.score(model, [prompt], [gens[0].token_ids], {"c": parse("calibrated").bind(model)})
    assert bool(torch.isfinite(s.processed["c"].logprob).all())
