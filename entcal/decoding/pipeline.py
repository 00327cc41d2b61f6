"""Pipelines: decoders applied one after another, in the order written (``"a | b | c"``).

The built-in chain fixes transformers' order (temperature, then top-k, top-p, min-p, ...).
Other stacks order the same rules differently, and the kept set depends on it; a pipeline
states the order::

    transformers (the chain):  "temperature=0.8,top_p=0.9,min_p=0.1"
    vLLM's sampler:            "temperature=0.8 | min_p=0.1 | top_k=40 | top_p=0.9"
                               (penalties, temperature, min-p, then top-k and top-p)
    llama.cpp's queue order:   "dry:multiplier=0.8 | top_n_sigma=... | top_k=40 | typical=1
                                | top_p=0.95 | min_p=0.05 | xtc:threshold=0.1 | temperature=0.8"
                               (penalties, DRY, top-nσ, top-k, typical, top-p, min-p, XTC,
                               temperature last; llama.cpp's defaults leave DRY and XTC off)

Each stage sees the previous stage's output (masked tokens at ``-inf``); a stage that is a chain
applies its own keys in the chain's order. Stateful stages (mirostat, XTC, DRY) keep their
state; ``reset``, ``prime``, ``observe`` and ``bind`` reach every stage.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from entcal.decoding.base import Decoder

__all__ = ["PipelineDecoder"]


class PipelineDecoder(Decoder):
    """Stages applied in order; ``spec`` is ``"stage | stage | ..."``.

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> row = torch.tensor([[0.45, 0.35, 0.12, 0.08]]).log()
        >>> parse("top_p=0.85,min_p=0.25")(row).isfinite().sum().item()   # transformers' order
        3
        >>> parse("min_p=0.25 | top_p=0.85")(row).isfinite().sum().item()  # vLLM's order
        2
    """

    def __init__(self, stages: Sequence[Decoder]) -> None:
        flat: list[Decoder] = []
        for s in stages:
            flat.extend(s.stages if isinstance(s, PipelineDecoder) else [s])
        if len(flat) < 2:
            raise ValueError("a pipeline needs at least two stages ('a | b')")
        self.stages: tuple[Decoder, ...] = tuple(flat)

    @property
    def requires_history(self) -> bool:  # type: ignore[override]
        return any(s.requires_history for s in self.stages)

    @property
    def requires_input_ids(self) -> bool:  # type: ignore[override]
        return any(s.requires_input_ids for s in self.stages)

    @property
    def spec(self) -> str:
        return " | ".join(s.spec for s in self.stages)

    def __copy__(self) -> PipelineDecoder:
        # stateful stages get their own copies (vLLM copies a decoder per request)
        return PipelineDecoder([copy.copy(s) if s.requires_history else s for s in self.stages])

    def bind(self, model: Any) -> PipelineDecoder:
        for s in self.stages:
            s.bind(model)
        return self

    def reset(self, batch_size: int) -> None:
        for s in self.stages:
            s.reset(batch_size)

    def prime(self, prompts: Sequence[Sequence[int]]) -> None:
        for s in self.stages:
            s.prime(prompts)

    def observe(self, tokens: Tensor) -> None:
        for s in self.stages:
            s.observe(tokens)

    @property
    def prompt_nll_window(self) -> int:  # type: ignore[override]
        return max(s.prompt_nll_window for s in self.stages)

    def prime_prompt_nll(self, nll: Tensor, real: Tensor) -> None:
        for s in self.stages:  # (each reads its own trailing window)
            s.prime_prompt_nll(nll, real)

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        x = logits
        for s in self.stages:
            x = s._process(x, input_ids)
        return x

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # Pipelines of the same shape (stage kinds in order) run stage by stage, each stage
        # one vectorized pass over all their rows; different shapes are grouped by shape.
        shapes: dict[tuple[type, ...], list[int]] = {}
        for i, d in enumerate(decoders):
            assert isinstance(d, PipelineDecoder)
            shapes.setdefault(tuple(type(s) for s in d.stages), []).append(i)
        if len(shapes) == 1:
            x = logits
            depth = len(next(iter(shapes)))
            for j in range(depth):
                stage = [d.stages[j] for d in decoders]  # type: ignore[attr-defined]
                x = type(stage[0])._apply_group(stage, x, input_ids)
            return x
        return super()._apply_group(decoders, logits, input_ids)
