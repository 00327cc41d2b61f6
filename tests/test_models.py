import json
import time

import pytest
import torch

from entcal import models

PROMPTS = [
    "The Python interpreter reads a program and",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans",
]


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as err:
        models.load("no-such-model")
    message = str(err.value)
    for name in models.EMBEDDED:
        assert name in message


def test_local_path_rejects_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        models.local_path(str(tmp_path))


def test_cache_that_is_a_file_gives_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ENTCAL_CACHE", str(blocker / "cache"))
    with pytest.raises(RuntimeError, match="ENTCAL_CACHE"):
        models.cache_dir()


def test_corrupt_cached_model_gives_clear_error(tmp_path, monkeypatch):
    folder = models.local_path("smollm2-135m")
    copy = tmp_path / "models" / "smollm2-135m"
    copy.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (copy / item.name).write_bytes(item.read_bytes())
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated weights
    monkeypatch.setenv("ENTCAL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="pull smollm2-135m --force"):
        models.load("smollm2-135m")


def test_converted_folder_is_vllm_ready():
    folder = models.local_path("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys


def test_second_load_is_fast(smollm2):
    start = time.perf_counter()
    model, tokenizer = models.load("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"second load took {elapsed:.1f} s"
    assert model.config.vocab_size == 49152
    assert tokenizer.padding_side == "left"


@pytest.mark.slow
def test_converted_logits_equal_gguf_logits(smollm2):
    model, tokenizer = smollm2
    reference, ref_tokenizer = models.load_gguf("smollm2-135m")
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert ids.tolist() == ref_tokenizer(prompt, return_tensors="pt")["input_ids"].tolist()
        with torch.inference_mode():
            ours = model(ids).logits
            theirs = reference(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_fingerprint(smollm2):
    model, _ = smollm2
    fp = models.fingerprint(model, "smollm2-135m")
    assert fp == {
        "name": "smollm2-135m",
        "vocab_size": 49152,
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "model_type": "llama",
    }


def test_cli_models_list(capsys):
    from entcal.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m (default)" in out and "gemma3-270m" in out
    assert main(["models", "info", "bogus"]) == 2
    assert "unknown model 'bogus'" in capsys.readouterr().err


def test_cli_default_model_is_the_library_default():
    from entcal.commands.common import DEFAULT_MODEL

    assert DEFAULT_MODEL == models.DEFAULT_MODEL
