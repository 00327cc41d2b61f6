"""Shared fixtures: the real embedded model (loaded once per test session) and tiny
random-weight Llamas."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, float32 on CPU."""
    from entcal import models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


def run_quick_compare(out, *extra: str) -> tuple[dict, str]:
    """``entcal compare --quick --out OUT *extra``: (results.json, the printed table)."""
    import contextlib
    import io
    import json

    from entcal.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["compare", "--quick", "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), printed.getvalue()


@pytest.fixture(scope="session")
def quick_compare(tmp_path_factory):
    """The transformers engine's ``entcal compare --quick`` on SmolLM2 (run once per session):
    (out folder, results.json, printed table)."""
    out = tmp_path_factory.mktemp("compare") / "quick"
    results, table = run_quick_compare(out)
    return out, results, table


def make_tiny_llama(
    vocab: int = 48,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    *,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    max_positions: int = 128,
    lm_head_scale: float | None = None,
    cls=None,
    **config,
):
    """A tiny random-weight Llama in eval mode: ``torch.manual_seed(seed)``, then the model.

    Defaults follow ``hidden``: ``intermediate = 2 * hidden``, ``heads = hidden // 8`` (head
    dimension 8), ``kv_heads = heads // 2`` (grouped-query attention). Everything else is
    ``LlamaConfig``'s default (untied embeddings, bos 1, eos 2, no pad) unless given in
    ``config``. ``lm_head_scale`` multiplies the output embeddings (above 1: peaked
    distributions, which truncation then bites; below 1: nearly flat). ``cls`` replaces
    ``LlamaForCausalLM`` (a subclass). The weights depend only on the sizes and the seed.

    The ``tiny_llama`` fixture returns this function; import it (``from conftest import
    make_tiny_llama``) where a fixture cannot be used.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = heads or max(1, hidden // 8)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        max_position_embeddings=max_positions,
        **config,
    )
    torch.manual_seed(seed)
    model = (cls or LlamaForCausalLM)(cfg).eval()
    if lm_head_scale is not None:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(lm_head_scale)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """The factory of tiny random-weight Llamas: ``tiny_llama(vocab=..., hidden=..., layers=...,
    seed=...)`` (see ``make_tiny_llama``)."""
    return make_tiny_llama
