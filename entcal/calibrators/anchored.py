"""The ``anchored`` decoder: hold a generation's entropy at the log loss of its own prompt.

Rule (per sequence and generated step ``t``)::

    ℓ = L_prompt + δ                        # the target: the prompt's log loss, nats/token
    m_t = EMA_16(H_1 … H_t)                 # running mean of the raw next-token entropy
    a_t = α_0 + g · max(0, m_t − ℓ − c)     # the gate term 0 for the first K steps (warm-up)
    α_t = a_t                               # (predictor=shipped: min(a_t, α_t^calibrated))
    p_t(v) ∝ p(v)^(1 + α_t)

``L_prompt`` is the mean negative log-likelihood of the prompt's last :data:`PROMPT_WINDOW`
tokens under the model (:func:`prompt_log_loss`), ``δ`` (``offset``) how much lower the model's
log loss on the rest of a human document sits (its context is longer), ``H_t`` the raw
distribution's entropy at step ``t`` and ``m_t`` its bias-corrected exponential moving average
(window 16, as :mod:`entcal.calibrators.state`).

Why: a model is entropy-calibrated when the entropy of its generations equals its log loss on
human text of the same kind (Cao, Valiant & Liang, "On the Entropy Calibration of Language
Models", arXiv 2511.11966); sampled text drifts above it as it grows. The ``calibrated``
decoder predicts that excess from the generation's state with a predictor fitted on one corpus,
and the predictor's level shifts from one kind of text to another (it reads the human text of a
technical handbook as derailing, and over-sharpens there). The prompt is human text of the very
kind being continued, so its own log loss is a reference that moves with the domain: on
SmolLM2-135M the gap between a continuation's log loss and its prompt's (last 64 tokens) was
−0.22, −0.28, −0.20, −0.11 and −0.27 nats/token on five corpora (pydoc train and test, *The
Debian Administrator's Handbook*, Jane Austen, Newton's *Opticks*; 96 documents each), where
the predictor's level spread over 0.8 nats/token (docs/results/anchored-smollm2-135m.md). The
sharpening is Cao et al.'s future-entropy-scaled model (Eq. 9) without its per-candidate term,
its scale ``α_t`` set by a feedback on the measured excess instead of a prediction. Nothing is
truncated: every token the model allows keeps a positive probability.

The veto (``predictor=shipped`` or a folder): the two signals err on different texts. The prompt
anchor opens on human text whose entropy runs above its prompt's (a per-document spread of
0.4–0.6 nats/token), the predictor on human text of a domain it was not fitted on; a generation
that derails opens both. With a predictor, ``α_t`` is the smaller of the two: the ``calibrated``
decoder's own ``α_t`` (that predictor, its fitted gate) caps the anchor's. It cut the human
log-loss cost (pydoc test: +0.0126 to −0.0001; the handbook: +0.0090 to +0.0059), but where the
predictor's gate seldom opens on generations it blocks the correction too (EntCE on pydoc test
+0.090 to +0.205, on Newton's *Opticks* +0.132 to +0.650), so it is not the default
(docs/results/anchored-smollm2-135m.md).

Spec: ``anchored[:target=prompt|L,offset=δ,predictor=none|shipped|PATH,strength=g,threshold=c,base=α_0,warmup=K]``

* ``target``: ``prompt`` (default) reads ``L_prompt`` from the prompt, which needs the model
  and the token history: :func:`entcal.generate` and teacher-forced scoring (``entcal
  compare``) hand the decoder the log loss from their own pass over the prompts
  (:meth:`prime_prompt_nll`); elsewhere (transformers' ``generate`` through
  :mod:`entcal.decoding.hf` with ``model=``) the decoder runs the bound model once over each new
  batch's prompts. A number (nats/token, ``> 0``) is ``ℓ`` itself,
  with no model and no history, so the same spec gives the same distribution everywhere, vLLM
  included; compute it with :func:`prompt_log_loss` or, from vLLM's ``prompt_logprobs``, with
  :func:`target_from_prompt_logprobs`;
* ``offset`` (``δ``, nats/token, default :data:`DEFAULT_OFFSET`): added to ``L_prompt``
  (``target=prompt`` only);
* ``predictor``: ``none`` (default: the anchor alone, any model), or the veto's predictor:
  ``shipped`` (the one shipped for the bound model, or, unbound, the one whose vocabulary
  matches the logits) or a folder written by ``entcal train``;
* ``strength`` (``g ≥ 0``), ``threshold`` (``c``, nats/token), ``base`` (``α_0 ≥ 0``),
  ``warmup`` (``K``, integer ``≥ 0``): the gate; defaults fitted on SmolLM2-135M so that the
  pydoc training split's own generations have EntCE ≈ 0, without the veto (:data:`DEFAULTS`)
  and with it (:data:`DEFAULTS_VETO`; there +0.08 in the fitting probe but +0.19 through
  ``entcal compare``) (docs/results/anchored-smollm2-135m.md).

Errors: an option out of range is a ``ValueError`` naming it; ``target=prompt`` with no bound
model, or with no ``input_ids`` at the first step (vLLM), is a ``ValueError`` that says to pass a
number instead; a missing or malformed predictor folder fails at parse, and binding to a model
with no shipped predictor (``predictor=shipped``) raises ``PredictorFileError``. A row of all
``-inf`` stays all ``-inf``.

Example::

    >>> import torch
    >>> from entcal.decoding import parse
    >>> d = parse("anchored:target=2.0,strength=1,threshold=0,warmup=0")
    >>> d.reset(batch_size=1)
    >>> flat = torch.zeros(1, 16)                   # entropy log 16 = 2.77 nats: α = 0.77
    >>> out = d(flat).log_softmax(-1)
    >>> torch.allclose(out, flat.log_softmax(-1))   # a flat row stays flat however sharpened
    True
    >>> d.observe(torch.tensor([3]))
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from entcal.calibrators.calibrated import CalibratedDecoder
from entcal.calibrators.derailment import gate_alpha, log_softmax_keep_dead, sharpen
from entcal.calibrators.predictor_file import PredictorFileError
from entcal.calibrators.state import row_entropy
from entcal.decoding.base import (
    InstanceBatched,
    check_known,
    format_value,
    instance_rows,
    parse_float,
    parse_int,
)
from entcal.generation import keeps_logits, left_pad, prompt_nll

__all__ = [
    "DEFAULT_OFFSET",
    "PROMPT_WINDOW",
    "AnchoredDecoder",
    "entropy_ema",
    "prompt_log_loss",
    "target_from_prompt_logprobs",
]

#: Prompt tokens whose mean negative log-likelihood is ``L_prompt``.
PROMPT_WINDOW = 64
#: ``δ``: mean continuation log loss minus prompt log loss (last 64 tokens), SmolLM2-135M,
#: pydoc training split (96 documents, 128-token prompts, 256-token continuations).
DEFAULT_OFFSET = -0.22
#: EMA window (steps) of the raw entropy: decay ``1 − 1/16``, bias-corrected.
EMA_WINDOW = 16
#: The fitted gates (SmolLM2-135M, pydoc training split; see the module docstring): the anchor
#: alone (``predictor=none``, the default) and with the predictor's veto (``predictor=shipped``
#: or a path).
DEFAULTS = {"strength": 0.2, "threshold": 0.15, "base": 0.0, "warmup": 8}
DEFAULTS_VETO = {"strength": 0.4, "threshold": 0.0, "base": 0.0, "warmup": 8}
#: ``predictor`` by default: none (the veto lost the anchor's transfer: *Opticks*, below).
DEFAULT_PREDICTOR = "none"


@torch.inference_mode()
def prompt_log_loss(
    model: Any,
    prompts: Tensor | Sequence[Sequence[int]],
    window: int = PROMPT_WINDOW,
    pad_token_id: int | None = None,
) -> Tensor:
    """``L_prompt (N,)`` float32 (nats/token): the mean negative log-likelihood under ``model``
    of each prompt's last ``window`` tokens (fewer if the prompt is shorter; the first token has
    no prediction).

    ``prompts``: token-id lists (unpadded: exact), or an ``(N, T)`` long tensor of prompts left
    padded with ``pad_token_id`` (default: the model config's; a leading run of it is padding,
    and with no pad id known nothing is). One forward pass over the prompts on the model's device.
    Raises ``ValueError`` for a prompt with fewer than 2 tokens.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    dev = next(model.parameters()).device
    if not isinstance(prompts, Tensor):
        ids, mask = left_pad(prompts, 0)  # the mask says which tokens are real
        ids, mask = ids.to(dev), mask.to(dev)
    else:
        ids = prompts.to(dev)
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad_token_id is None:
            mask = torch.ones_like(ids)
        else:
            mask = ((ids != pad_token_id).long().cumsum(-1) > 0).long()
    real = mask.sum(-1)
    if bool((real < 2).any()):
        rows = (real < 2).nonzero().flatten().tolist()
        raise ValueError(
            f"prompt_log_loss: row(s) {rows[:10]} have fewer than 2 prompt tokens, so no "
            "log loss to read; give a number as the target instead"
        )
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    t = ids.shape[1]
    kept = min(t, window + 1)  # positions whose logits are needed: (N, kept, V), not (N, T, V)
    extra = {}
    if keeps_logits(model):
        extra["logits_to_keep"] = kept
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).logits
    return _mean_nll(*prompt_nll(logits, ids, mask, window))


def _mean_nll(nll: Tensor, real: Tensor) -> Tensor:
    """Each row's mean of ``nll`` over its ``real`` positions (``[N]`` float32)."""
    return ((nll * real).sum(-1) / real.sum(-1)).float()


def target_from_prompt_logprobs(
    prompt_logprobs: Sequence[Any],
    prompt_token_ids: Sequence[int],
    offset: float = DEFAULT_OFFSET,
    window: int = PROMPT_WINDOW,
) -> float:
    """``ℓ = L_prompt + offset`` (nats/token) from vLLM's ``prompt_logprobs``: the number to pass
    as ``anchored:target=...`` in a vLLM request, equal to what ``target=prompt`` reads in
    transformers (up to the engines' rounding).

    ``prompt_logprobs``: a ``RequestOutput.prompt_logprobs`` (a request with
    ``prompt_logprobs=0``): per prompt position ``None`` (the first) or a mapping from token id to
    an object with a ``logprob`` (or a float); ``prompt_token_ids``: the request's prompt ids.
    Raises ``ValueError`` if no position carries the prompt token's log-prob.

        >>> target_from_prompt_logprobs([None, {7: -2.0}, {3: -1.0}], [1, 7, 3], offset=0.0)
        1.5
    """
    nll = []
    for pos, tok in zip(prompt_logprobs, prompt_token_ids, strict=True):
        if pos is None:
            continue
        entry = pos[tok]
        nll.append(-float(getattr(entry, "logprob", entry)))
    if not nll:
        raise ValueError(
            "prompt_logprobs holds no log-prob of a prompt token (request prompt_logprobs=0 and "
            "a prompt of at least 2 tokens)"
        )
    last = nll[-window:]
    return sum(last) / len(last) + offset


def entropy_ema(ema_sum: Tensor, count: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the bias-corrected EMA of the raw entropy: ``(m_t, new sum)``, all ``(N,)``.

    ``ema_sum``: the decayed sum ``Σ d^(t−s) H_s`` of the ``count`` steps seen; ``entropy``:
    ``H_t``. ``m_t = (d·sum + H_t) / ((1 − d^(count+1)) / (1 − d))`` with ``d = 1 − 1/16``:
    the weighted mean of what was seen, so early steps are not pulled toward 0.
    """
    d = 1.0 - 1.0 / EMA_WINDOW
    new = d * ema_sum + entropy
    norm = (1.0 - d ** (count.to(entropy.dtype) + 1.0)) / (1.0 - d)
    return new / norm, new


class AnchoredDecoder(InstanceBatched):
    """Entropy held at the prompt's log loss (see the module docstring for rule and spec)."""

    requires_history: ClassVar[bool] = True
    OPTIONS = ("target", "offset", "predictor", "strength", "threshold", "base", "warmup")
    #: What vLLM's admission check says to do instead of target=prompt.
    vllm_hint: ClassVar[str] = (
        "give the target as a number: target=<mean -logprob of the prompt's last 64 tokens "
        f"(vLLM's prompt_logprobs) + offset, {DEFAULT_OFFSET} by default>"
    )

    def __init__(
        self,
        target: str | float = "prompt",
        offset: float | str | None = None,
        strength: float | str | None = None,
        threshold: float | str | None = None,
        base: float | str | None = None,
        warmup: int | str | None = None,
        predictor: str | None = DEFAULT_PREDICTOR,
    ) -> None:
        if isinstance(target, str) and target.strip() == "prompt":
            self.target: float | None = None
        else:
            self.target = parse_float(
                "target", target, lo=0.0, lo_open=True, range_text="'prompt' or a number > 0"
            )
        if offset is not None and self.target is not None:
            raise ValueError(
                "anchored: offset applies to target=prompt only; with target=L give the level "
                "itself (L already includes any offset)"
            )
        self.offset = DEFAULT_OFFSET if offset is None else parse_float("offset", offset)
        text = DEFAULT_PREDICTOR if predictor is None else str(predictor).strip()
        if not text:
            raise ValueError("anchored: predictor must be 'shipped', 'none' or a predictor folder")
        self.predictor = None if text == "none" else text
        #: the veto: a ``calibrated`` decoder over the predictor (its fitted gate), or None
        self._veto = (
            None
            if self.predictor is None
            else CalibratedDecoder(None if self.predictor == "shipped" else self.predictor)
        )
        fitted = self.defaults
        self.strength = parse_float("strength", _given(strength, fitted["strength"]), lo=0.0)
        self.threshold = parse_float("threshold", _given(threshold, fitted["threshold"]))
        self.base = parse_float("base", _given(base, fitted["base"]), lo=0.0)
        self.warmup = parse_int(
            "warmup", _given(warmup, fitted["warmup"]), lo=0, range_text="an integer >= 0"
        )
        self._model_ref: Any = None
        self.reset(0)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> AnchoredDecoder:
        check_known("anchored", options, cls.OPTIONS)
        return cls(**{k: options[k] for k in cls.OPTIONS if k in options})

    @property
    def requires_input_ids(self) -> bool:  # type: ignore[override]
        """``target=prompt`` reads the prompt from ``input_ids`` (vLLM gives none)."""
        return self.target is None

    @property
    def defaults(self) -> dict[str, float]:
        """The fitted gate this instance's unspecified options take (with or without the
        predictor's veto)."""
        return DEFAULTS_VETO if self._veto is not None else DEFAULTS

    @property
    def spec(self) -> str:
        parts = []
        if self.target is not None:
            parts.append(f"target={format_value(self.target)}")
        elif self.offset != DEFAULT_OFFSET:
            parts.append(f"offset={format_value(self.offset)}")
        if (self.predictor or "none") != DEFAULT_PREDICTOR:
            parts.append(f"predictor={self.predictor or 'none'}")
        for key in ("strength", "threshold", "base", "warmup"):
            value = getattr(self, key)
            if value != self.defaults[key]:
                parts.append(f"{key}={format_value(value)}")
        return "anchored" + (":" + ",".join(parts) if parts else "")

    def cache_key(self) -> str:
        """Every parameter spelled out, defaults included (a result cached under ``anchored``
        must not answer for a release whose fitted defaults differ)."""
        target = "prompt" if self.target is None else format_value(self.target)
        values = ",".join(
            f"{k}={format_value(getattr(self, k))}"
            for k in ("offset", "strength", "threshold", "base", "warmup")
        )
        key = f"anchored:target={target},{values},window={PROMPT_WINDOW},ema={EMA_WINDOW}"
        return key if self._veto is None else f"{key},veto={self._veto.cache_key()}"

    def __copy__(self) -> AnchoredDecoder:
        # vLLM copies a prototype per request: each copy needs its own veto (its state is per
        # sequence), not the prototype's shared among requests
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if self._veto is not None:
            new._veto = copy.copy(self._veto)
        return new

    # ---- model and state ----------------------------------------------------------------------
    def bind(self, model: Any) -> AnchoredDecoder:
        """Keep (a weak reference to) ``model`` for reading the prompt's log loss, and pick the
        veto's predictor for it (:class:`~entcal.calibrators.predictor_file.PredictorFileError`
        if ``predictor=shipped`` and none is shipped for this model: then pass
        ``predictor=none``, or a folder written by ``entcal train``)."""
        if self._veto is not None:
            try:
                self._veto.bind(model)
            except PredictorFileError as e:
                raise PredictorFileError(
                    f"anchored: {e} (or use the prompt anchor alone: predictor=none, the default)"
                ) from e
        if self.target is None:
            try:
                self._model_ref = weakref.ref(model)
            except TypeError:
                self._model_ref = lambda: model
        return self

    def reset(self, batch_size: int) -> None:
        self._levels: Tensor | None = None  # ℓ per row, once known
        self._prompts: list[list[int]] | None = None  # unpadded prompts, when an adapter gives them
        self._sum = torch.zeros(batch_size)
        self._count = torch.zeros(batch_size, dtype=torch.long)
        self._pending: Tensor | None = None  # this step's new EMA sum, committed by observe
        if self._veto is not None:
            self._veto.reset(batch_size)

    def prime(self, prompts: Sequence[Sequence[int]]) -> None:
        """The prompts of the sequences of the last :meth:`reset`, unpadded: ``target=prompt``
        reads its level from them instead of from the padded ``input_ids`` (``entcal.generate``
        and teacher-forced scoring pass them)."""
        self._prompts = [list(p) for p in prompts]
        if self._veto is not None:
            self._veto.prime(prompts)

    @property
    def prompt_nll_window(self) -> int:
        """``target=prompt`` reads the log loss of the prompt's last :data:`PROMPT_WINDOW`
        tokens: :func:`entcal.generate` hands it over from its prefill, teacher-forced scoring
        from its prompt pass."""
        return PROMPT_WINDOW if self.target is None else 0

    def prime_prompt_nll(self, nll: Tensor, real: Tensor) -> None:
        """Take ``L_prompt`` from the adapter's prompt log-likelihoods (see
        :meth:`~entcal.decoding.Decoder.prime_prompt_nll`) instead of a forward pass of its own.
        Rows with no predicted prompt token are left to that pass, which raises its error."""
        nll, real = nll[:, -PROMPT_WINDOW:], real[:, -PROMPT_WINDOW:]
        rows_match = nll.shape[0] == self._count.shape[0]
        if self.target is None and rows_match and bool((real.sum(-1) > 0).all()):
            self._levels = _mean_nll(nll, real) + self.offset

    def observe(self, tokens: Tensor) -> None:
        if self._pending is not None:
            self._sum, self._pending = self._pending, None
            self._count = self._count + 1
        if self._veto is not None:
            self._veto.observe(tokens)

    def _targets(self, n: int, input_ids: Tensor | None, device: torch.device) -> Tensor:
        if self._count.shape[0] != n:
            if bool((self._count > 0).any()):
                raise ValueError(
                    f"anchored: got {n} rows, but the decoder's state holds "
                    f"{self._count.shape[0]} sequences in progress; call reset(batch_size) "
                    "before a new generation"
                )
            self.reset(n)
        if self._levels is None:
            if self.target is not None:
                # (a target beyond float32 reads as inf: the gate never opens)
                full = torch.full((n,), self.target, dtype=torch.float64)
                self._levels = full.float().to(device)
            else:
                model = self._model_ref() if self._model_ref is not None else None
                primed = self._prompts is not None and len(self._prompts) == n
                if model is None or (input_ids is None and not primed):
                    raise ValueError(
                        "anchored: target=prompt reads the prompt's log loss, which needs the "
                        "model (bind it: entcal.generate, entcal compare, or "
                        "entcal.decoding.hf.logits_processor(spec, model=model)) and the token "
                        "history; elsewhere (vLLM) give a number: "
                        "target=<mean -log p of the prompt's last 64 tokens + offset>"
                    )
                source = self._prompts if primed else input_ids
                self._levels = (prompt_log_loss(model, source) + self.offset).to(device)
        if self._sum.device != device:
            self._sum, self._count = self._sum.to(device), self._count.to(device)
        if self._levels.device != device:  # (levels handed over by an adapter)
            self._levels = self._levels.to(device)
        return self._levels

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Any], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        n = logits.shape[0]
        dev = logits.device
        lp = log_softmax_keep_dead(logits)
        entropy = row_entropy(lp)
        # rows of several instances (vLLM: one per request) stacked by instance, processed
        # together; one instance (transformers' generate) needs no reordering
        groups = instance_rows(decoders)
        sizes = [len(idx) for _, idx in groups]
        rows = None
        if len(groups) > 1:
            rows = torch.tensor([r for _, idx in groups for r in idx], device=dev)
            entropy = entropy.index_select(0, rows)
            if input_ids is not None:
                input_ids = input_ids.index_select(0, rows)
        chunks = [None] * len(groups) if input_ids is None else list(input_ids.split(sizes))
        level = torch.cat([d._targets(k, c, dev) for (d, _), k, c in zip(groups, sizes, chunks)])
        count = torch.cat([d._count for d, _ in groups])
        ema, new = entropy_ema(torch.cat([d._sum for d, _ in groups]), count, entropy)
        for (d, _), part in zip(groups, new.split(sizes)):
            d._pending = part
        params = [(d.strength, d.threshold, d.base, d.warmup) for d, _ in groups]
        owner = torch.repeat_interleave(
            torch.arange(len(groups), device=dev), torch.tensor(sizes, device=dev)
        )
        if rows is not None:
            inverse = torch.empty_like(rows)
            inverse[rows] = torch.arange(n, device=dev)
            level, count, ema, owner = (t[inverse] for t in (level, count, ema, owner))
        # built in float64 on the CPU (a value beyond float32 reads as ±inf), then moved
        table = torch.tensor([p[:3] for p in params], dtype=torch.float64).float().to(dev)[owner]
        warm = torch.tensor([min(p[3], 2**62) for p in params], dtype=torch.long).to(dev)[owner]
        strength = torch.where(count < warm, 0.0, table[:, 0])
        alpha = gate_alpha(ema - level, strength, table[:, 1], table[:, 2])
        vetoed = [i for i, d in enumerate(decoders) if d._veto is not None]
        if vetoed:
            # where the predictor reads the state as derailed too: α = min(α, α_calibrated)
            sel = None if len(vetoed) == n else torch.tensor(vetoed, device=dev)
            pick = (lambda t: t) if sel is None else (lambda t: t.index_select(0, sel))
            veto = CalibratedDecoder.alphas(
                [decoders[i]._veto for i in vetoed], pick(lp), pick(logits)
            )
            capped = torch.minimum(pick(alpha), veto)
            alpha = capped if sel is None else alpha.index_copy(0, sel, capped)
        return sharpen(lp, alpha, out=lp)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value
