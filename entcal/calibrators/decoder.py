"""Registers entcal's calibrator-backed decoders with :mod:`entcal.decoding`.

``entcal.decoding.parse`` imports this module on the first lookup of ``calibrated`` (its lazy
hook); importing it registers ``calibrated`` (:class:`entcal.decoding.calibrated.CalibratedDecoder`)
and ``lookahead`` (:class:`entcal.calibrators.lookahead.LookaheadDecoder`).
"""

from __future__ import annotations

from entcal.calibrators.lookahead import LookaheadDecoder
from entcal.decoding.calibrated import CalibratedDecoder

__all__ = ["CalibratedDecoder", "LookaheadDecoder"]
