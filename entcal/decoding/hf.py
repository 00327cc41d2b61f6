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

from entcal.decoding.base import Decoder, HistoryDriver
from entcal.decoding.spec import parse

__all__ = ["DecoderLogitsProcessor", "logits_processor"]


class DecoderLogitsProcessor(LogitsProcessor):
    """Wraps a :class:`~entcal.decoding.Decoder` for ``generate``.

    Stateful decoders get ``reset`` / ``observe`` from :class:`~entcal.decoding.base.HistoryDriver`:
    a call continues the previous one only if its ``input_ids`` are the previous call's plus one
    token per row; any other call (a new ``generate``) resets the decoder's state for the batch.
    """

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.supports_continuous_batching = not decoder.requires_history
        self._history = HistoryDriver(decoder)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.decoder.requires_history:
            self._history.step(input_ids)
        return self.decoder(scores, input_ids)

    def __repr__(self) -> str:
        return f"DecoderLogitsProcessor({self.decoder.spec!r})"


def logits_processor(
    spec_or_decoder: str | Decoder, model: Any | None = None
) -> DecoderLogitsProcessor:
    """A ``transformers.LogitsProcessor`` applying the decoder (a spec string or a Decoder).

    Pass ``model`` for model-aware decoders (``calibrated``, ``lookahead``): the predictor's
    fingerprint is checked against it before any generation.
    """
    decoder = parse(spec_or_decoder)
    if model is not None:
        decoder.bind(model)
    return DecoderLogitsProcessor(decoder)
