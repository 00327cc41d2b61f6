"""XTC, "exclude top choices" (p-e-w, text-generation-webui PR 6335; llama.cpp's ``xtc``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from entcal.decoding import ops
from entcal.decoding.base import (
    Decoder,
    InstanceBatched,
    check_known,
    format_value,
    instance_rows,
    parse_float,
    parse_int,
)
from entcal.decoding.rng import as_int64, sequence_uniforms
from entcal.decoding.spec import register_method

__all__ = ["XTCDecoder"]


class XTCDecoder(InstanceBatched):
    """Exclude top choices: sometimes drop the most probable tokens to break clichés.

    Each step, each sequence draws a uniform ``u``; if ``u < probability`` and at least two
    tokens have ``p >= threshold`` (``p = softmax(logits)``), all of those except the least
    probable one are removed (:func:`entcal.decoding.ops.xtc_mask`). ``threshold > 0.5`` never
    removes anything (as in llama.cpp).

    The coin is per sequence and seeded: row ``i`` of the batch the decoder was reset for (in
    vLLM each request is its own batch of one, row 0) draws its ``t``-th uniform as a pure
    function of ``(seed, i, t)`` (:mod:`entcal.decoding.rng`), with ``t`` the number of tokens it
    has generated. So the coins do not depend on the logits or on the other rows' coins, but in
    ``entcal.generate`` and Hugging Face ``generate`` they depend on the row a prompt sits in,
    and two vLLM requests with the same seed draw the same coins (give them different seeds for
    independent ones).

    Spec: ``xtc[:threshold=0.1,probability=0.5,seed=0,min_keep=1]`` (the defaults of
    llama.cpp, except its probability 0 = off). Compose it with other stages as a pipeline:
    ``"min_p=0.02 | xtc:threshold=0.1 | temperature=0.9"``.

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> d = parse("xtc:threshold=0.2,probability=1")
        >>> d.reset(batch_size=1)
        >>> d(torch.tensor([[3.0, 2.5, 2.0, -1.0]]))   # p = .50 .30 .18 .01: .50 goes
        tensor([[   -inf,  2.5000,  2.0000, -1.0000]])
    """

    requires_history: ClassVar[bool] = True
    OPTIONS = ("threshold", "probability", "seed", "min_keep")

    def __init__(
        self, threshold: float = 0.1, probability: float = 0.5, seed: int = 0, min_keep: int = 1
    ) -> None:
        self.threshold = parse_float("threshold", threshold, lo=0.0, hi=1.0)
        self.probability = parse_float("probability", probability, lo=0.0, hi=1.0)
        self.seed = parse_int("seed", seed, lo=0, range_text="an integer in [0, 2^64)")
        if self.seed >= 2**64:
            raise ValueError(f"seed={seed} is out of range; seed must be an integer in [0, 2^64)")
        self.min_keep = parse_int("min_keep", min_keep, lo=1, range_text="an integer >= 1")
        self.steps_: Tensor | None = None  # [N] int64: tokens generated per sequence

    @classmethod
    def from_options(cls, options: dict[str, str]) -> XTCDecoder:
        check_known("xtc", options, cls.OPTIONS)
        return cls(**options)  # type: ignore[arg-type]  # each parser names its key

    @property
    def spec(self) -> str:
        parts = [
            f"threshold={format_value(self.threshold)}",
            f"probability={format_value(self.probability)}",
        ]
        if self.seed:
            parts.append(f"seed={self.seed}")
        if self.min_keep != 1:
            parts.append(f"min_keep={self.min_keep}")
        return "xtc:" + ",".join(parts)

    def reset(self, batch_size: int) -> None:
        self.steps_ = torch.zeros(batch_size, dtype=torch.long)

    def observe(self, tokens: Tensor) -> None:
        if self.steps_ is not None:
            self.steps_ = self.steps_ + 1

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # One pass over the rows of every instance (vLLM: one per request), with per-row
        # threshold, probability, seed, step and index of the row within its instance.
        n, dev = logits.shape[0], logits.device
        owners = instance_rows(decoders)
        if len(owners) == 1:
            ((d, _),) = owners
            assert isinstance(d, XTCDecoder)
            seed, (steps, within) = d.seed, d._state(n)
            prob, thr, mk = d.probability, d.threshold, d.min_keep
        else:
            seed = torch.empty(n, dtype=torch.long)
            steps = torch.empty(n, dtype=torch.long)
            within = torch.empty(n, dtype=torch.long)
            prob = torch.empty(n, dtype=torch.float64)
            thr = torch.empty(n, dtype=torch.float64)
            mk = torch.empty(n, dtype=torch.long)
            for d, idx in owners:  # per instance, not per row
                assert isinstance(d, XTCDecoder)
                rows = torch.tensor(idx)
                seed[rows] = as_int64(d.seed)
                steps[rows], within[rows] = d._state(len(idx))
                prob[rows], thr[rows], mk[rows] = d.probability, d.threshold, d.min_keep
        keys = torch.stack([torch.zeros(n, dtype=torch.long), within], dim=1)
        u = sequence_uniforms(seed, keys, steps)  # type: ignore[arg-type]
        fire = (u < prob).to(dev)
        remove = ops.xtc_mask(logits, thr if not isinstance(thr, Tensor) else thr.to(dev), fire,
                              mk if not isinstance(mk, Tensor) else mk.to(dev))  # fmt: skip
        return logits.masked_fill(remove, float("-inf"))

    def _state(self, rows: int) -> tuple[Tensor, Tensor]:
        """(steps, sequence index) of ``rows`` rows ``[rows]`` each."""
        if self.steps_ is not None and self.steps_.shape[0] == 1 and rows > 1:
            # one sequence on several rows (vLLM's speculative decoding): one coin, state kept
            return self.steps_.expand(rows), torch.zeros(rows, dtype=torch.long)
        if self.steps_ is None or self.steps_.shape[0] != rows:
            self.reset(rows)
        assert self.steps_ is not None
        return self.steps_, torch.arange(rows)


register_method("xtc", XTCDecoder.from_options)
