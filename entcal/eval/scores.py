"""The results of teacher-forced scoring as data: per-position statistics of one distribution
(:class:`TokenStats`), of a set of texts under the raw model and every decoder
(:class:`TextScores`, with the combinators compare's cache needs), and what to score
(:class:`ScoreRequest`). :mod:`entcal.eval.scoring` computes them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ScoreRequest", "TextScores", "TokenStats"]


@dataclasses.dataclass
class TokenStats:
    """Per-position statistics of one distribution family, each ``[B, T]`` (CPU).

    ``logprob`` is ``-inf`` where the distribution gives the actual token probability 0; every
    tensor holds 0 at padded positions (see :attr:`TextScores.mask`).
    """

    logprob: Tensor
    entropy: Tensor
    varentropy: Tensor
    rank: Tensor | None = None

    def excluded(self, mask: Tensor) -> Tensor:
        """``[B, T]`` bool: valid positions whose token has probability 0."""
        return mask & torch.isneginf(self.logprob)


_STAT_FIELDS = ("logprob", "entropy", "varentropy", "rank")


@dataclasses.dataclass
class TextScores:
    """Scores of a set of continuations: ``tokens`` / ``mask`` ``[B, T]`` (right padded),
    ``raw`` statistics, ``processed[name]`` per decoder, and optionally

    * ``observer_cross_entropy`` ``[B, T]``: ``-Σ_v softmax(observer)_v · log_softmax(model)_v``,
      the per-token cross-perplexity term of Binoculars (Hans et al., arXiv 2401.12070);
    * ``features`` ``[B, H]``: the model's final hidden state at each text's last token (the
      embedding MAUVE clusters).
    """

    tokens: Tensor
    mask: Tensor
    raw: TokenStats
    processed: dict[str, TokenStats]
    observer_cross_entropy: Tensor | None = None
    features: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextScores:
        """Rebuild from ``dataclasses.asdict`` of a :class:`TextScores` (compare's cache)."""
        raw = TokenStats(**d["raw"])
        processed = {k: TokenStats(**v) for k, v in d["processed"].items()}
        return cls(
            tokens=d["tokens"], mask=d["mask"], raw=raw, processed=processed,
            observer_cross_entropy=d["observer_cross_entropy"], features=d["features"],
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: Sequence[TextScores]) -> TextScores:
        """The rows of ``parts`` one after another (all with the same processed decoders)."""

        def cat(vals):
            return None if any(v is None for v in vals) else torch.cat(vals)

        def cat_stats(items: list[TokenStats]) -> TokenStats:
            return TokenStats(*(cat([getattr(i, f) for i in items]) for f in _STAT_FIELDS))

        return cls(
            tokens=torch.cat([p.tokens for p in parts]),
            mask=torch.cat([p.mask for p in parts]),
            raw=cat_stats([p.raw for p in parts]),
            processed={k: cat_stats([p.processed[k] for p in parts]) for k in parts[0].processed},
            observer_cross_entropy=cat([p.observer_cross_entropy for p in parts]),
            features=cat([p.features for p in parts]),
        )

    @classmethod
    def interleave(cls, parts: Sequence[TextScores]) -> TextScores:
        """Sample-major results (part j holds sample j of every prompt) back to prompt-major rows
        (prompt i, sample j at row i·k + j)."""
        if len(parts) == 1:
            return parts[0]
        joined = cls.concat(parts)
        k, n = len(parts), parts[0].tokens.shape[0]
        order = torch.arange(n * k).reshape(k, n).T.reshape(-1)  # row i·k + j <- j·n + i

        def pick(t):
            return None if t is None else t[order]

        def stats(st: TokenStats) -> TokenStats:
            return TokenStats(*(pick(getattr(st, f)) for f in _STAT_FIELDS))

        return cls(
            tokens=joined.tokens[order], mask=joined.mask[order], raw=stats(joined.raw),
            processed={key: stats(v) for key, v in joined.processed.items()},
            observer_cross_entropy=pick(joined.observer_cross_entropy),
            features=pick(joined.features),
        )  # fmt: skip


@dataclasses.dataclass
class ScoreRequest:
    """One set of continuations (one per prompt, as token ids) and the decoders to score it under.

    ``decoders`` maps a name to a decoder: a callable ``(logits [N, V], input_ids=None) ->
    processed logits [N, V]`` (an ``entcal.decoding.Decoder`` or any function). Decoders with
    ``requires_history = True`` get ``reset(batch)``, ``observe(tokens)`` and the history.
    """

    continuations: Sequence[Sequence[int]]
    decoders: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    rank: bool = True
