"""The :class:`Decoder` base class and the spec-option helpers shared by all decoders."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from entcal.decoding.ops import checked_row_max, keep_dead_rows

__all__ = [
    "Decoder",
    "HistoryDriver",
    "InstanceBatched",
    "format_value",
    "instance_rows",
    "parse_float",
    "parse_int",
]


class Decoder:
    """A sampling rule: maps next-token logits ``[N, V]`` to processed logits ``[N, V]``.

    Masked tokens are ``-inf``; the sampling distribution is ``softmax`` of the result. Calling a
    decoder never modifies its input, always returns float32, raises ``ValueError`` on NaN or
    ``+inf`` logits, and returns a row whose logits are all ``-inf`` unchanged (all ``-inf``: no
    token can be sampled from it; :func:`entcal.generate` reports that as an error).

    Subclasses implement :meth:`_process` and :attr:`spec`; stateful ones (``requires_history``)
    also :meth:`reset` and :meth:`observe`. A decoder declares what it needs instead of failing
    when it lacks it: ``requires_history`` (per-sequence state), ``requires_input_ids`` (the token
    history as a tensor: vLLM rejects such a decoder at admission, since it gives a processor
    none), :meth:`bind` (the model). :meth:`_apply_group` lets a subclass process rows of a
    mixed batch that use different instances of it in one vectorized pass
    (see :func:`entcal.decoding.apply_rows`).
    """

    #: True if the result depends on ``input_ids`` or on per-sequence state (mirostat,
    #: calibrated). Stateless decoders can be applied to flattened ``[B*T, V]`` logits at once.
    requires_history: ClassVar[bool] = False
    #: True if a call needs ``input_ids`` (the token history as a tensor) and cannot work from
    #: ``reset``/``prime``/``observe`` alone (``lookahead`` runs its model over the history).
    #: vLLM passes no history, so its admission check rejects such decoders.
    requires_input_ids: ClassVar[bool] = False

    def __call__(self, logits: Tensor, input_ids: Tensor | None = None) -> Tensor:
        row_max, extent = checked_row_max(logits)
        with torch.no_grad():
            out = self._process_checked(logits.float(), input_ids, row_max, extent)
        return out if extent is not None else keep_dead_rows(out, row_max)

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _process_checked(
        self, logits: Tensor, input_ids: Tensor | None, row_max: Tensor, extent: float | None
    ) -> Tensor:
        """:meth:`_process` on logits the call has validated; ``row_max`` ``[N]`` holds each
        row's maximum and ``extent`` their :func:`~entcal.decoding.ops.finite_extent`, which
        the validation computed (a decoder that needs them overrides this instead of computing
        them again)."""
        return self._process(logits, input_ids)

    # ---- the model (a no-op for decoders that do not depend on it) -----------------------
    def bind(self, model: Any) -> Decoder:
        """Adopt or check the model (or its config) before any step; returns ``self``.

        Model-aware decoders override it (``calibrated`` picks and checks its predictor,
        ``lookahead`` runs the model); every adapter calls it once the model is known.
        """
        return self

    # ---- state (no-ops for stateless decoders) -------------------------------------------
    def reset(self, batch_size: int) -> None:
        """Start ``batch_size`` new sequences (stateful decoders reinitialize their state)."""

    def observe(self, tokens: Tensor) -> None:
        """Tell the decoder which tokens ``[N]`` were sampled (or teacher-forced) this step."""

    def prime(self, prompts: Sequence[Sequence[int]]) -> None:
        """Tell the decoder the prompt tokens of each sequence of the last :meth:`reset`.

        Only adapters that pass no ``input_ids`` call it (vLLM, when a request is added);
        decoders that read the context (DRY) use it, the others ignore it."""

    @property
    def prompt_nll_window(self) -> int:
        """How many of the prompt's last tokens' negative log-likelihoods the decoder reads
        (``anchored``'s ``target=prompt``: 64); 0 (the default) for decoders that read none.
        An adapter that runs the model over the prompts anyway (:func:`entcal.generate`'s
        prefill) hands them over with :meth:`prime_prompt_nll`, sparing the decoder a forward
        pass of its own."""
        return 0

    def prime_prompt_nll(self, nll: Tensor, real: Tensor) -> None:
        """The prompts' per-token negative log-likelihoods, after :meth:`reset` and
        :meth:`prime`: ``nll`` ``[N, W]`` float32 (nats) of each sequence's last ``W`` prompt
        positions (at most the largest window asked for in the batch, fewer when its prompts
        are shorter; a decoder reads its own last :attr:`prompt_nll_window` columns), ``real``
        ``[N, W]`` bool marking the positions that hold a predicted prompt token (not left
        padding, not the first token). A no-op unless the decoder asks
        (:attr:`prompt_nll_window`)."""

    # ---- identity -------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string; ``entcal.decoding.parse(d.spec) == d``."""
        raise NotImplementedError

    def cache_key(self) -> str:
        """What the decoder's output depends on besides its inputs: the spec, and for a decoder
        that reads a file (``calibrated``'s predictor) also what the file held when it was bound.
        Result caches (``entcal compare``) key on it, so a retrained predictor at the same path is
        not answered from a stale entry."""
        return self.spec

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decoder):
            return NotImplemented
        return type(self) is type(other) and self.spec == other.spec

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))

    # ---- mixed batches --------------------------------------------------------------------
    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        """Process rows ``logits[i]`` with ``decoders[i]`` (all instances of ``cls``).

        Default: one call per distinct decoder (equal specs for stateless decoders, the same
        instance for stateful ones). Subclasses override it with a single vectorized pass.
        """
        groups = instance_rows(decoders, key=lambda d: id(d) if d.requires_history else d.spec)
        if len(groups) == 1:
            return decoders[0]._process(logits, input_ids)
        out = torch.empty_like(logits)
        for owner, idx in groups:
            rows_t = torch.tensor(idx, device=logits.device)
            sub_ids = None if input_ids is None else input_ids.index_select(0, rows_t)
            out.index_copy_(0, rows_t, owner._process(logits.index_select(0, rows_t), sub_ids))
        return out


class InstanceBatched(Decoder):
    """A stateful decoder whose one implementation is the vectorized pass over the rows of all
    its instances (:meth:`_apply_group`); a call is that pass over its own rows."""

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        return type(self)._apply_group([self] * logits.shape[0], logits, input_ids)


class HistoryDriver:
    """Drives a decoder's :meth:`~Decoder.reset` / :meth:`~Decoder.observe` from the ``input_ids``
    an adapter sees at each step (transformers' ``generate`` passes the whole history).

    A call continues the previous one only if its ``input_ids`` are the previous call's plus one
    token per row (the ids themselves are compared, not only the shapes); that new token is then
    passed to ``observe``. Any other call (a new ``generate``, even one whose prompt happens to be
    one token longer) resets the decoder for the batch. Stateless decoders are left alone.
    """

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self._last_ids: Tensor | None = None

    def step(self, input_ids: Tensor) -> Tensor | None:
        """Bring the decoder's state up to ``input_ids`` ``[N, T]``; returns the tokens ``[N]``
        just observed, or ``None`` when the call started new sequences."""
        last = self._last_ids
        self._last_ids = input_ids.detach().clone()
        if (
            last is not None
            and input_ids.shape == (last.shape[0], last.shape[1] + 1)
            and torch.equal(input_ids[:, :-1], last)
        ):
            tokens = input_ids[:, -1]
            if self.decoder.requires_history:
                self.decoder.observe(tokens)
            return tokens
        if self.decoder.requires_history:
            self.decoder.reset(int(input_ids.shape[0]))
        return None


def instance_rows(
    decoders: Sequence[Decoder], key: Callable[[Decoder], Hashable] = id
) -> list[tuple[Decoder, list[int]]]:
    """The distinct decoders of a mixed batch, each with its rows (in first-seen order).

    By default distinct means distinct instances (stateful kinds vectorize over instances, each
    holding the state of its rows); ``key`` groups otherwise (e.g. equal specs), the first
    decoder of each group standing for it."""
    out: dict[Hashable, tuple[Decoder, list[int]]] = {}
    for i, d in enumerate(decoders):
        out.setdefault(key(d), (d, []))[1].append(i)
    return list(out.values())


# ---- option parsing helpers (used by every decoder's factory) -----------------------------


def parse_float(
    key: str,
    text: str | float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    range_text: str | None = None,
) -> float:
    """Parse ``text`` as a finite float in the given range, else ``ValueError`` naming ``key``."""
    rng = range_text or _range_text(lo, hi, lo_open, hi_open)
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={text!r} is not a number; {key} must be {rng}") from None
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        raise ValueError(f"{key}={text} is out of range; {key} must be {rng}")
    return v


def parse_int(key: str, text: str | int, *, lo: int, range_text: str) -> int:
    """Parse ``text`` as an integer ``>= lo``, else ``ValueError`` naming ``key``."""
    if isinstance(text, bool):
        raise ValueError(f"{key}={text!r} is not an integer; {key} must be {range_text}")
    if isinstance(text, int):
        v = text
    else:
        try:
            v = int(str(text).strip())
        except ValueError:
            raise ValueError(
                f"{key}={text!r} is not an integer; {key} must be {range_text}"
            ) from None
    if v < lo:
        raise ValueError(f"{key}={text} is out of range; {key} must be {range_text}")
    return v


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def format_value(v: float | int) -> str:
    """Canonical text of an option value: ints as is, floats as the shortest round-trip repr."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def check_known(method: str, options: Mapping[str, str], known: Sequence[str]) -> None:
    """``ValueError`` for an option of ``method`` that is not in ``known``."""
    for key in options:
        if key not in known:
            raise ValueError(
                f"unknown option {key!r} for decoder {method!r}; valid options: {', '.join(known)}"
            )
