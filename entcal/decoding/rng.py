"""Counter-based random numbers: a uniform is a pure function of (seed, keys, step).

Sampling and randomized decoders (XTC) draw from these instead of a stateful generator, so a
sequence's draws do not depend on which other sequences share its batch, on the batch order, or
on the engine (``entcal.generate``, Hugging Face ``generate`` or vLLM).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_int64", "sequence_uniforms"]

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (
    _signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def as_int64(seed: int) -> int:
    """A seed in ``[0, 2^64)`` as the int64 with the same bits (what the tensors hold)."""
    return _signed(seed & _MASK64)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on negative values)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014) on int64 tensors, wrapping mod 2^64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def sequence_uniforms(seed: int | Tensor, keys: Tensor, step: int | Tensor) -> Tensor:
    """Uniforms in ``[0, 1)`` (float64 ``[N]``), one per sequence, a function of
    ``(seed, keys[i], step)`` only: ``keys`` ``[N, 2]`` int64 holds (prompt key, sample index);
    ``seed`` and ``step`` are numbers or per-row int64 tensors ``[N]``.

    >>> k = torch.tensor([[0, 0], [3, 1]])
    >>> torch.equal(sequence_uniforms(7, k, 5)[1:], sequence_uniforms(7, k[1:], 5))
    True
    """
    n = keys.shape[0]
    if isinstance(seed, Tensor):
        z = seed.long().cpu().clone()
    else:
        z = torch.full((n,), _signed(seed & _MASK64), dtype=torch.int64)
    steps = step.long().cpu() if isinstance(step, Tensor) else torch.full_like(z, step)
    for part in (keys[:, 0].long().cpu(), keys[:, 1].long().cpu(), steps):
        z = _splitmix64(z + _GOLDEN + part * _GOLDEN)
    return _shr(z, 11).double() * 2.0**-53
