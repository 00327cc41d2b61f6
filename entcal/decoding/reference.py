"""transformers' own warpers for an entcal chain spec: the reference entcal is checked against.

:func:`reference_warpers` builds the ``LogitsProcessorList`` that transformers' ``generate``
would build for the same settings (``do_sample=True``; its warpers in its own order, which is
the chain's order), so the two can be run on the same logits and compared::

    >>> import torch
    >>> from entcal.decoding import parse
    >>> from entcal.decoding.reference import reference_warpers
    >>> spec = "temperature=0.7,top_k=200,top_p=0.9"
    >>> ref = reference_warpers(spec)
    >>> [type(w).__name__ for w in ref]
    ['TemperatureLogitsWarper', 'TopKLogitsWarper', 'TopPLogitsWarper']
    >>> x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    >>> bool(((ref(None, x) == -torch.inf) == (parse(spec)(x) == -torch.inf)).all())
    True

The kept sets are equal, up to the exceptions documented in :mod:`entcal.decoding.ops` (ties,
typical's float32 rounding). Chain keys transformers has no warper for (``top_n_sigma``,
``smoothing_factor``, ``dynatemp_range``) and named methods (``mirostat``, ``xtc``, ...) raise
``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from entcal.decoding.base import Decoder
from entcal.decoding.chain import CHAIN_KEYS, ChainDecoder
from entcal.decoding.spec import parse

__all__ = ["REFERENCE_WARPERS", "reference_warpers"]

#: Chain key -> ``(value, min_tokens_to_keep) -> warper``, in the order transformers'
#: ``generate`` appends its warpers (also the chain's order). Temperature and top-H take no
#: ``min_tokens_to_keep`` there. The chain's other keys have no transformers warper.
REFERENCE_WARPERS: dict[str, Callable[[Any, int], LogitsProcessor]] = {
    "temperature": lambda v, mk: TemperatureLogitsWarper(v),
    "top_h": lambda v, mk: TopHLogitsWarper(v),
    "top_k": lambda v, mk: TopKLogitsWarper(v, min_tokens_to_keep=mk),
    "top_p": lambda v, mk: TopPLogitsWarper(v, min_tokens_to_keep=mk),
    "min_p": lambda v, mk: MinPLogitsWarper(v, min_tokens_to_keep=mk),
    "typical": lambda v, mk: TypicalLogitsWarper(v, min_tokens_to_keep=mk),
    "epsilon": lambda v, mk: EpsilonLogitsWarper(v, min_tokens_to_keep=mk),
    "eta": lambda v, mk: EtaLogitsWarper(v, min_tokens_to_keep=mk),
}
#: Keys that only modify another key's stage (alone they change nothing): no warper needed.
_MODIFIERS = ("min_tokens_to_keep", "dynatemp_exponent", "smoothing_curve")


def reference_warpers(spec: str | Mapping[str, Any] | Decoder) -> LogitsProcessorList:
    """transformers' ``LogitsProcessorList`` equivalent to an entcal chain spec.

    ``spec``: a chain spec string (``"temperature=0.7,top_p=0.9"``, aliases such as
    ``typical_p`` allowed), a ``key -> value`` mapping, or a parsed ``ChainDecoder``. One warper
    per key at a non-neutral value, in transformers' order; ``min_tokens_to_keep`` goes to every
    truncation warper that takes it (all but top-H, as in ``generate``). ``"ancestral"`` gives
    an empty list. ``ValueError`` for a key transformers has no warper for, a named method or a
    pipeline (``"a | b"``), and for a bad value (as :func:`entcal.decoding.parse`).
    """
    if isinstance(spec, Mapping):
        decoder: Decoder = ChainDecoder.from_options(dict(spec))
    else:
        decoder = parse(spec)
    if not isinstance(decoder, ChainDecoder):
        raise ValueError(
            f"{str(decoder)!r} is not a chain spec: transformers has warpers only for the "
            f"chain keys {', '.join(REFERENCE_WARPERS)}"
        )
    for key, (neutral, _) in CHAIN_KEYS.items():
        if (
            key not in REFERENCE_WARPERS
            and key not in _MODIFIERS
            and getattr(decoder, key) != neutral
        ):
            raise ValueError(
                f"transformers has no warper for {key!r} (it has for "
                f"{', '.join(REFERENCE_WARPERS)})"
            )
    mk = decoder.min_tokens_to_keep
    return LogitsProcessorList(
        make(getattr(decoder, key), mk)
        for key, make in REFERENCE_WARPERS.items()
        if getattr(decoder, key) != CHAIN_KEYS[key][0]
    )
