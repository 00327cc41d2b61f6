"""Hugging Face adapter: any entcal decoder as a ``transformers.LogitsProcessor``.

Pass it to ``generate`` with transformers' own warpers switched off, or its truncation would be
applied on top (``do_sample=True, temperature=1.0, top_k=0, top_p=1.0``); :func:`entcal.generate`
does this for you, including ignoring a model's ``generation_config`` defaults.

Example::

    >>> from entcal import models
    >>> from entcal.decoding import hf
    >>> model, tok = models.load("smollm2-135m")
    >>> inputs = tok(["The capital of France is"], return_tensors="pt")   # 5 tokens
    >>> proc = hf.logits_processor("temperature=0.8,top_p=0.95")
    >>> out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    ...                      max_new_tokens=8, logits_processor=[proc], pad_token_id=0)
    >>> out.shape
    torch.Size([1, 13])
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from entcal.decoding.base import Decoder
from entcal.decoding.spec import parse

__all__ = ["EntcalLogitsProcessor", "logits_processor"]


class EntcalLogitsProcessor(LogitsProcessor):
    """Wraps a :class:`~entcal.decoding.Decoder` for ``generate``.

    Stateful decoders: a call continues the previous one only if its ``input_ids`` are the
    previous call's plus one token per row (the ids themselves are compared, not only the
    shapes); then that token is passed to ``decoder.observe`` first. Any other call (a new
    ``generate``, even one whose prompt happens to be one token longer) resets the decoder's
    state for the batch.
    """

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.supports_continuous_batching = not decoder.requires_history
        self._last_ids: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.decoder.requires_history:
            last = self._last_ids
            if (
                last is not None
                and input_ids.shape == (last.shape[0], last.shape[1] + 1)
                and torch.equal(input_ids[:, :-1], last)
            ):
                self.decoder.observe(input_ids[:, -1])
            else:
                self.decoder.reset(int(input_ids.shape[0]))
            self._last_ids = input_ids.detach().clone()
        return self.decoder(scores, input_ids)

    def __repr__(self) -> str:
        return f"EntcalLogitsProcessor({self.decoder.spec!r})"


def logits_processor(
    spec_or_decoder: str | Decoder, model: Any | None = None
) -> EntcalLogitsProcessor:
    """A ``transformers.LogitsProcessor`` applying the decoder (a spec string or a Decoder).

    Pass ``model`` for model-aware decoders (``calibrated``, ``lookahead``): the predictor's
    fingerprint is checked against it before any generation.
    """
    decoder = parse(spec_or_decoder)
    if model is not None:
        decoder.bind(model)
    return EntcalLogitsProcessor(decoder)
