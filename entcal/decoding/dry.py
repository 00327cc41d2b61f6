"""DRY, "don't repeat yourself" (p-e-w, text-generation-webui PR 5677; llama.cpp's ``dry``).

A token that would extend a sequence already seen in the context is penalized, the more the
longer the repeat: if the last ``n`` tokens also occur earlier, followed by token ``v``, then ``v``
gets ``multiplier · base^(n - allowed_length)`` subtracted from its logit, for
``n >= allowed_length``. Sequence breakers (token ids) stop a match: a repeat never reaches back
across one, and a breaker as the last token or as the extending token starts no match.

This is text-generation-webui's rule, repeat lengths capped at 50. llama.cpp's differs in two
ways: it caps the exponent instead of the length, and its breakers are strings (any token whose
text contains one is a breaker, and multi-token breakers restart a match), so token-id breakers
reproduce it only for single-token breaker strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from entcal.decoding.base import (
    Decoder,
    InstanceBatched,
    check_known,
    format_value,
    instance_rows,
    parse_float,
    parse_int,
)
from entcal.decoding.spec import register_method

__all__ = ["DRYDecoder", "dry_penalty", "match_lengths"]

#: Longest repeat measured (text-generation-webui's cap; it keeps base^n finite and bounds work).
MAX_MATCH = 50


def match_lengths(history: Tensor, breaker: Tensor, valid: Tensor) -> Tensor:
    """For every earlier position ``i`` of each row, the length of the repeat that token
    ``history[i + 1]`` would extend: the number of tokens ``n`` (at most ``MAX_MATCH``) with
    ``history[i - j] == history[L - 1 - j]`` for ``j < n``, no breaker among the last ``n - 1``
    compared tokens of the suffix, the last token and ``history[i + 1]`` not breakers.

    ``history`` ``[N, L]`` int64, ``breaker`` and ``valid`` ``[N, L]`` bool (``valid`` False for
    padding). Returns ``[N, L - 1]`` int64 (0 where token ``i + 1`` extends nothing).
    """
    n, length = history.shape
    if length < 2:
        return history.new_zeros((n, max(length - 1, 0)))
    last = history[:, -1:]
    ok_row = valid[:, -1:] & ~breaker[:, -1:]
    # candidates: position i holds the last token, and i + 1 is a real, non-breaker token
    cont = (history[:, :-1] == last) & valid[:, :-1] & valid[:, 1:] & ~breaker[:, 1:] & ok_row
    lengths = cont.long()
    for j in range(1, MAX_MATCH):
        # stop early when no match is still growing (checked every 8 lengths: one host sync)
        if j >= length - 1 or (j % 8 == 0 and not bool(cont.any())):
            break
        # extend from i to i - j: compare history[i - j] with the suffix token history[L-1-j]
        earlier = torch.nn.functional.pad(history[:, : length - 1 - j], (j, 0), value=-1)
        earlier_ok = torch.nn.functional.pad(valid[:, : length - 1 - j], (j, 0), value=False)
        suffix = history[:, length - 1 - j : length - j]
        suffix_ok = valid[:, length - 1 - j : length - j] & ~breaker[:, length - 1 - j : length - j]
        cont = cont & earlier_ok & (earlier == suffix) & suffix_ok
        lengths += cont.long()
    return lengths


def dry_penalty(
    history: Tensor,
    vocab_size: int,
    multiplier: float | Tensor,
    base: float | Tensor,
    allowed_length: int | Tensor,
    breakers: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """The DRY penalty ``[N, V]`` (float32, finite, >= 0) to subtract from the logits.

    ``history`` ``[N, L]`` token ids (the context, oldest first); ``breakers`` ``[N, B]`` token
    ids per row (pad with -1) or ``None``; ``valid`` ``[N, L]`` bool marks real tokens (``None``:
    all). For each token ``v``, ``n(v)`` is the longest repeat it would extend
    (:func:`match_lengths`); the penalty is ``multiplier · base^(n(v) - allowed_length)`` where
    ``n(v) >= allowed_length``, else 0. Per-row parameters are numbers or tensors ``[N]``.
    """
    n = history.shape[0]
    dev = history.device
    if valid is None:
        valid = history >= 0
    if breakers is None or breakers.numel() == 0:
        is_breaker = torch.zeros_like(history, dtype=torch.bool)
    else:
        is_breaker = (history.unsqueeze(-1) == breakers.to(dev).unsqueeze(1)).any(-1)
    lengths = match_lengths(history, is_breaker, valid)
    out = torch.zeros((n, vocab_size), dtype=torch.float32, device=dev)
    if not lengths.numel():
        return out
    # the penalty of each earlier position's next token, on [N, L] (not [N, V]), then the
    # largest per token: penalties grow with the length, so the longest repeat's wins
    allowed = _col(allowed_length, n, dev, torch.float64)
    exponent = lengths.double() - allowed
    penalty = _col(multiplier, n, dev, torch.float64) * torch.pow(
        _col(base, n, dev, torch.float64), exponent
    )
    hit = (lengths > 0) & (exponent >= 0)
    # finite, so a penalized token keeps a (tiny) probability and no row is emptied
    penalty = torch.where(hit, penalty, 0.0).clamp(max=torch.finfo(torch.float32).max).float()
    nxt = history[:, 1:].clamp(0, vocab_size - 1)
    return out.scatter_reduce_(1, nxt, penalty, reduce="amax")


def _col(v: float | int | Tensor, n: int, dev: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=dev, dtype=dtype).view(-1, 1)
    return torch.full((n, 1), float(v), device=dev, dtype=dtype)


class DRYDecoder(InstanceBatched):
    """DRY repetition penalty (see the module docstring; :func:`dry_penalty`).

    The context is ``input_ids`` when the adapter passes them (``entcal.generate``, Hugging Face
    ``generate``: prompt and generated tokens), else the tokens the decoder was told about:
    the prompt through :meth:`prime` (vLLM's V1 runner passes it when a request is added; the V2
    runner does not, so there only the generated tokens count) and every sampled token through
    :meth:`observe`. ``penalty_last_n`` limits it to the last tokens; 0 means the whole context
    (llama.cpp's -1: there 0 switches DRY off).

    Spec: ``dry[:multiplier=0.8,base=1.75,allowed_length=2,penalty_last_n=0,breakers=ID+ID]``
    (text-generation-webui's defaults with the multiplier its author suggests; breakers are
    token ids joined by ``+``, since they depend on the tokenizer: e.g. the ids of ``"\\n"``,
    ``":"``, ``'"'`` and ``"*"``, llama.cpp's default breaker strings). Compose it before the
    other stages, as llama.cpp orders it: ``"dry:multiplier=0.8 | min_p=0.05"``.

    Example::

        >>> import torch
        >>> from entcal.decoding import parse
        >>> d = parse("dry:multiplier=1,base=2,allowed_length=2")
        >>> ids = torch.tensor([[5, 6, 7, 1, 5, 6]])   # "5 6" repeats; it was followed by 7
        >>> d(torch.zeros(1, 8), ids)                  # 7 extends a repeat of 2: 1·2^(2-2) = 1
        tensor([[ 0.,  0.,  0.,  0.,  0.,  0.,  0., -1.]])
    """

    requires_history: ClassVar[bool] = True
    OPTIONS = ("multiplier", "base", "allowed_length", "penalty_last_n", "breakers")

    def __init__(
        self,
        multiplier: float = 0.8,
        base: float = 1.75,
        allowed_length: int = 2,
        penalty_last_n: int = 0,
        breakers: Sequence[int] = (),
    ) -> None:
        self.multiplier = parse_float("multiplier", multiplier, lo=0.0)
        self.base = parse_float("base", base, lo=1.0)
        self.allowed_length = parse_int(
            "allowed_length", allowed_length, lo=1, range_text="an integer >= 1"
        )
        self.penalty_last_n = parse_int(
            "penalty_last_n", penalty_last_n, lo=0, range_text="an integer >= 0 (0 = all)"
        )
        self.breakers = tuple(
            parse_int("breakers", b, lo=0, range_text="token ids >= 0 joined by '+'")
            for b in breakers
        )
        self.history_: Tensor | None = None  # [N, L] int64, -1 = none (when no input_ids)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> DRYDecoder:
        check_known("dry", options, cls.OPTIONS)
        kwargs: dict = dict(options)
        if "breakers" in kwargs:
            kwargs["breakers"] = [b.strip() for b in kwargs["breakers"].split("+")]
        return cls(**kwargs)

    @property
    def spec(self) -> str:
        parts = [
            f"multiplier={format_value(self.multiplier)}",
            f"base={format_value(self.base)}",
            f"allowed_length={self.allowed_length}",
        ]
        if self.penalty_last_n:
            parts.append(f"penalty_last_n={self.penalty_last_n}")
        if self.breakers:
            parts.append("breakers=" + "+".join(str(b) for b in self.breakers))
        return "dry:" + ",".join(parts)

    # ---- context when the adapter passes no input_ids -------------------------------------
    def reset(self, batch_size: int) -> None:
        self.history_ = torch.empty((batch_size, 0), dtype=torch.long)

    def prime(self, prompts: Sequence[Sequence[int]]) -> None:
        """Start from the prompts' tokens (one list per sequence of the last :meth:`reset`)."""
        width = max((len(p) for p in prompts), default=0)
        hist = torch.full((len(prompts), width), -1, dtype=torch.long)
        for i, p in enumerate(prompts):  # once per request, not per step
            if len(p):
                hist[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        self.history_ = self._clip(hist)

    def observe(self, tokens: Tensor) -> None:
        if self.history_ is None or self.history_.shape[0] != tokens.shape[0]:
            self.reset(tokens.shape[0])
        assert self.history_ is not None
        step = tokens.detach().to("cpu", torch.long).view(-1, 1)
        self.history_ = self._clip(torch.cat([self.history_, step], dim=1))

    def _clip(self, hist: Tensor) -> Tensor:
        return hist[:, -self.penalty_last_n :] if self.penalty_last_n else hist

    def _context(self, rows: int, input_ids: Tensor | None) -> Tensor:
        if input_ids is not None:
            return self._clip(input_ids.long())
        if self.history_ is not None and self.history_.shape[0] == 1 and rows > 1:
            # one sequence scored on several rows (vLLM's speculative decoding): same context
            return self.history_.expand(rows, -1)
        if self.history_ is None or self.history_.shape[0] != rows:
            self.reset(rows)
        assert self.history_ is not None
        return self.history_

    # ---- the step -------------------------------------------------------------------------
    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        n, vocab = logits.shape
        dev = logits.device
        owners = instance_rows(decoders)
        contexts = []
        for d, idx in owners:  # per instance (vLLM: per request), not per row
            assert isinstance(d, DRYDecoder)
            sub = (
                None if input_ids is None else input_ids[torch.tensor(idx, device=input_ids.device)]
            )
            contexts.append(d._context(len(idx), sub))
        if len(owners) == 1:
            ((d, _),) = owners
            assert isinstance(d, DRYDecoder)
            history = contexts[0].to(dev)
            mult, base, allowed = d.multiplier, d.base, d.allowed_length
            brk = torch.tensor([list(d.breakers)], dtype=torch.long).expand(n, -1)
        else:
            width = max(c.shape[1] for c in contexts)
            history = torch.full((n, width), -1, dtype=torch.long)
            nb = max(len(d.breakers) for d, _ in owners)  # type: ignore[attr-defined]
            brk = torch.full((n, nb), -1, dtype=torch.long)
            params = torch.empty((n, 3), dtype=torch.float64)
            for (d, idx), c in zip(owners, contexts, strict=True):
                rows = torch.tensor(idx)
                history[rows, width - c.shape[1] :] = c.cpu()
                if d.breakers:  # type: ignore[attr-defined]
                    brk[rows, : len(d.breakers)] = torch.tensor(d.breakers)  # type: ignore[attr-defined]
                params[rows] = torch.tensor([d.multiplier, d.base, d.allowed_length],  # type: ignore[attr-defined]
                                            dtype=torch.float64)  # fmt: skip
            history = history.to(dev)
            params = params.to(dev)
            mult, base, allowed = params[:, 0], params[:, 1], params[:, 2]
        penalty = dry_penalty(history, vocab, mult, base, allowed, brk.to(dev))
        return logits - penalty


register_method("dry", DRYDecoder.from_options)
