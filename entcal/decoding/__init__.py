"""entcal.decoding: sampling processors as batched tensor ops, with HF and vLLM adapters.

* :func:`parse` turns a spec (``"temperature=0.8,top_p=0.95"``, ``"mirostat:tau=3"``,
  ``"dry:multiplier=0.8 | min_p=0.05 | xtc:threshold=0.1"``) into a :class:`Decoder`;
  ``str(decoder)`` is the canonical spec.
* :func:`register_method` adds named methods; installed packages declare theirs as
  ``entcal.decoders`` entry points (entcal's own ``calibrated`` and ``lookahead`` included),
  loaded on first use.
* :func:`apply_rows` processes a batch that mixes decoders, one vectorized pass per kind;
  :func:`apply_rows_isolated` does the same for a serving loop, keeping a fault in its own rows.
* :mod:`entcal.decoding.ops`: the pure per-row tensor functions.
* :mod:`entcal.decoding.hf`: ``logits_processor(spec)`` for transformers' ``generate``.
* :mod:`entcal.decoding.reference`: ``reference_warpers(spec)``, transformers' own warpers for a
  chain spec (what entcal's chain is checked against).
"""

from __future__ import annotations

from entcal.decoding import ops
from entcal.decoding.adaptive import EDTDecoder, MirostatDecoder
from entcal.decoding.base import Decoder
from entcal.decoding.chain import CHAIN_KEYS, ChainDecoder
from entcal.decoding.dry import DRYDecoder
from entcal.decoding.pipeline import PipelineDecoder
from entcal.decoding.rows import apply_rows, apply_rows_isolated
from entcal.decoding.spec import methods, parse, parse_options, register_method
from entcal.decoding.xtc import XTCDecoder

__all__ = [
    "CHAIN_KEYS",
    "ChainDecoder",
    "DRYDecoder",
    "Decoder",
    "EDTDecoder",
    "MirostatDecoder",
    "PipelineDecoder",
    "XTCDecoder",
    "apply_rows",
    "apply_rows_isolated",
    "methods",
    "ops",
    "parse",
    "parse_options",
    "register_method",
]
