"""entcal decoders inside vLLM: per-request specs, validation, and the processor to register.

Usage (offline)::

    from vllm import LLM, SamplingParams
    from entcal.decoding.vllm.processor import EntcalLogitsProcessor

    llm = LLM(model=path, logits_processors=[EntcalLogitsProcessor])
    params = SamplingParams(max_tokens=64, extra_args={"entcal": "temperature=0.8,top_p=0.95"})

Usage (server)::

    entcal serve                      # or:
    vllm serve PATH --logits-processors entcal.decoding.vllm.processor:EntcalLogitsProcessor \\
        --logprobs-mode processed_logprobs --generation-config vllm

    # request body: {"prompt": ..., "vllm_xargs": {"entcal": "min_p=0.1"}}

With entcal installed, the ``vllm.logits_processors`` entry point
(:mod:`entcal.decoding.vllm.plugin`) registers the processor in every engine even without the
flag; listing it explicitly is still recommended: vLLM then keeps real sampled token ids (not
async placeholders) in the lists stateful decoders (mirostat) read.

**Which runner.** :class:`EntcalLogitsProcessor` subclasses both of vLLM's logits-processor
interfaces; when an engine builds it, the constructor's arguments tell which model runner is
asking (V1 runner: ``(vllm_config, device, is_pin_memory)``, Model Runner V2:
``(vllm_config, req_states)``) and it returns the matching adapter:
:class:`entcal.decoding.vllm.v1.EntcalV1LogitsProcessor` or
:class:`entcal.decoding.vllm.v2.EntcalV2LogitsProcessor`. vLLM on CPU always runs the V1 runner.

**Neutral vLLM fields.** An entcal spec replaces vLLM's own temperature and truncation, so a
request carrying one must leave these :class:`~vllm.SamplingParams` fields at their neutral
values, else it is rejected (HTTP 400 naming the field):

=====================  ===========  ==============================================================
field                  neutral      why
=====================  ===========  ==============================================================
temperature            1.0          the decoder owns the temperature (0 would mean vLLM greedy)
top_p                  1.0          truncation belongs to the decoder
top_k                  0 (or -1)    truncation belongs to the decoder
min_p                  0.0          truncation belongs to the decoder
repetition_penalty     1.0          the V1 runner applies penalties *after* the decoder
presence_penalty       0.0          (the V2 runner before it): refused rather than runner-dependent
frequency_penalty      0.0
=====================  ===========  ==============================================================

Constraints that only remove or bias tokens of the model's distribution (``logit_bias``,
``allowed_token_ids``, ``bad_words``, ``min_tokens``, structured outputs) are allowed: both
runners apply them *before* the decoder, which then sees the constrained logits. ``seed``,
``n``, ``logprobs``, ``stop`` and ``max_tokens`` are unaffected.

**Where the decoder runs.** The processor declares ``is_argmax_invariant() == False``. In the V1
runner this places it in the stage that sees the raw float32 logits, before penalties, before
vLLM's temperature and min-p, and also for all-greedy batches; Model Runner V2 calls every custom
processor at the same point ("before temperature, min_p and top-k/top-p"). The alternative
(``True``) would run it *after* vLLM's temperature and min-p and skip it whenever every request of
a step is greedy; it would also be false: entcal rules may change the argmax (locally typical
sampling drops the most probable token when it is atypical, and registered methods are
arbitrary). With the neutral fields above, vLLM's own temperature and truncation are then no-ops
for entcal rows, so the sampled distribution is exactly ``softmax(decoder(raw logits))``, and
``--logprobs-mode processed_logprobs`` reports log-probabilities under it.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

from entcal.decoding.base import Decoder
from entcal.decoding.spec import parse

__all__ = [
    "EXTRA_ARGS_KEY",
    "NEUTRAL_FIELDS",
    "EntcalLogitsProcessor",
    "EntcalPluginLogitsProcessor",
    "EntcalRequestError",
    "new_request_decoder",
    "request_spec",
    "validate_request",
]

_log = logging.getLogger(__name__)

#: Key of the spec in ``SamplingParams.extra_args`` and in the OpenAI body's ``vllm_xargs``.
EXTRA_ARGS_KEY = "entcal"
_PARAM = f"vllm_xargs.{EXTRA_ARGS_KEY}"

#: vLLM sampling fields that must stay at these values when a request carries an entcal spec.
NEUTRAL_FIELDS: dict[str, tuple[float, ...]] = {
    "temperature": (1.0,),
    "top_p": (1.0,),
    "top_k": (0, -1),
    "min_p": (0.0,),
    "repetition_penalty": (1.0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
}


try:
    from vllm.exceptions import VLLMValidationError as _ErrorBase

    _VLLM_ERRORS = True
except Exception:  # vLLM absent or too old: a plain ValueError still names the parameter
    _ErrorBase = ValueError  # type: ignore[assignment,misc]
    _VLLM_ERRORS = False


class EntcalRequestError(_ErrorBase):  # type: ignore[misc,valid-type]
    """A request's entcal spec is invalid or conflicts with vLLM's own sampling fields.

    It is vLLM's ``VLLMValidationError`` carrying ``parameter``, so the OpenAI server answers
    HTTP 400 with ``error.param`` set (``vllm_xargs.entcal`` or the conflicting field) and keeps
    serving; offline, ``LLM.generate`` raises it before anything runs.
    """

    def __init__(self, message: str, parameter: str, value: Any = None) -> None:
        if _VLLM_ERRORS:
            super().__init__(message, parameter=parameter, value=value)
        else:
            super().__init__(f"{message} (parameter={parameter})")
            self.parameter = parameter
            self.value = value


def request_spec(sampling_params: Any) -> str | None:
    """The entcal spec of a request (``extra_args["entcal"]``), or ``None`` if it has none."""
    extra: Mapping[str, Any] | None = getattr(sampling_params, "extra_args", None)
    if not extra or EXTRA_ARGS_KEY not in extra:
        return None
    spec = extra[EXTRA_ARGS_KEY]
    if not isinstance(spec, str):
        raise EntcalRequestError(
            f"parameter {_PARAM} must be a decoder spec string such as "
            f"'temperature=0.8,top_p=0.95', got {type(spec).__name__} {spec!r}",
            parameter=_PARAM,
            value=spec,
        )
    return spec


@functools.lru_cache(maxsize=512)
def _prototype(spec: str) -> Decoder:
    # Parsing may be costly (``calibrated`` loads a predictor file): once per distinct spec.
    # Errors are not cached (lru_cache only stores returned values).
    return parse(spec)


def validate_request(sampling_params: Any) -> Decoder | None:
    """Check a request: its spec parses and vLLM's own sampling fields are neutral.

    Returns the parsed (shared, prototype) decoder, or ``None`` for a request without a spec.
    Raises :class:`EntcalRequestError` naming the offending parameter.
    """
    spec = request_spec(sampling_params)
    if spec is None:
        return None
    try:
        decoder = _prototype(spec)
    except Exception as exc:  # ValueError, or e.g. an unreadable predictor file named by the spec
        raise EntcalRequestError(
            f"parameter {_PARAM}: invalid entcal decoder spec {spec!r}: {exc}",
            parameter=_PARAM,
            value=spec,
        ) from None
    problem = _unsupported_in_vllm(spec)
    if problem:
        raise EntcalRequestError(
            f"parameter {_PARAM}: decoder {spec!r} cannot run inside vLLM: {problem}",
            parameter=_PARAM,
            value=spec,
        )
    for field, neutral in NEUTRAL_FIELDS.items():
        value = getattr(sampling_params, field, neutral[0])
        if value is None or any(_same(value, n) for n in neutral):
            continue
        allowed = " or ".join(repr(n) for n in neutral)
        raise EntcalRequestError(
            f"parameter {field}={value!r} conflicts with {_PARAM}={spec!r}: an entcal decoder "
            f"replaces vLLM's temperature and truncation, so {field} must stay {allowed} "
            f"(put the rule in the spec instead, e.g. "
            f"'temperature=0.8,top_p=0.95')",
            parameter=field,
            value=value,
        )
    return decoder


@functools.lru_cache(maxsize=512)
def _unsupported_in_vllm(spec: str) -> str | None:
    """Why a decoder cannot work as a vLLM logits processor, or ``None``.

    vLLM hands a processor the logits only, never the token history as a tensor; a decoder that
    needs ``input_ids`` (e.g. ``lookahead``, which runs its own model over the history) says so
    when called without them. Probed once per spec on a tiny row; other errors are not this
    check's business.
    """
    import torch

    probe = copy.copy(_prototype(spec))
    try:
        if getattr(probe, "requires_history", False):
            probe.reset(1)
        probe(torch.zeros(1, 16))
    except Exception as exc:
        if "input_ids" in str(exc):
            return f"it needs the token history (input_ids), which vLLM does not pass ({exc})"
    return None


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-9)


def new_request_decoder(sampling_params: Any, model_config: Any = None) -> Decoder | None:
    """The decoder instance serving one request (``None``: leave the row untouched).

    Stateless decoders are immutable and shared between requests with the same spec; a stateful
    one (``requires_history``: mirostat, calibrated) gets its own shallow copy, reset for one
    sequence and bound to ``model_config`` (the engine's Hugging Face config: ``calibrated``
    picks its shipped predictor by it), so heavy read-only parts (a predictor's weights) are
    shared and state is not. Requests reach the engine only after :func:`validate_request`; a
    failure here is logged and the row left untouched rather than stopping the engine.
    """
    try:
        proto = validate_request(sampling_params)
    except Exception as exc:  # already rejected at admission; never crash the engine loop
        _log.error("entcal: request reached the engine with a bad spec (%s); row untouched", exc)
        return None
    if proto is None:
        return None
    if getattr(proto, "requires_history", False):
        decoder = copy.copy(proto)
        decoder.reset(1)
        if model_config is not None:
            try:
                decoder.bind(model_config)
            except Exception as exc:
                _log.error("entcal: decoder %s does not fit this model (%s); row untouched",
                           proto, exc)  # fmt: skip
                return None
        return decoder
    return proto


def _explicitly_listed(vllm_config: Any) -> bool:
    """True if the engine's ``logits_processors`` list names an entcal processor (not the
    entry-point plugin itself)."""
    model_config = getattr(vllm_config, "model_config", None)
    listed = getattr(model_config, "logits_processors", None) or ()
    for item in listed:
        if isinstance(item, str):
            module, _, name = item.partition(":")
            if module.startswith("entcal.") and name != "plugin":
                return True
        elif isinstance(item, type) and issubclass(item, _Base) and item is not _plugin_class():
            return True
    return False


def _plugin_class() -> type:
    return EntcalPluginLogitsProcessor


def _interfaces() -> tuple[type, ...]:
    bases: list[type] = []
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1

        bases.append(V1)
    except ImportError:
        pass
    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

        bases.append(V2)
    except ImportError:
        pass
    if not bases:
        raise ImportError("no vLLM logits-processor interface is importable")
    return tuple(bases)


class _Base:
    """Marker base of entcal's vLLM processors (adapters and the dispatching class)."""


def _is_v1_call(args: tuple, kwargs: dict) -> bool:
    """V1 runner: ``(vllm_config, device, is_pin_memory)``; V2: ``(vllm_config, req_states)``."""
    if "req_states" in kwargs:
        return False
    if "device" in kwargs or "is_pin_memory" in kwargs:
        return True
    return len(args) >= 3


class EntcalLogitsProcessor(_Base, *_interfaces()):  # type: ignore[misc]
    """entcal's vLLM logits processor: register this class (or its FQCN
    ``entcal.decoding.vllm.processor:EntcalLogitsProcessor``).

    Constructing it returns the adapter of the model runner that builds it (see the module
    docstring); :meth:`validate_params` runs at request admission in vLLM's frontend.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if _is_v1_call(args, kwargs):
            from entcal.decoding.vllm.v1 import EntcalV1LogitsProcessor as impl
        else:
            from entcal.decoding.vllm.v2 import EntcalV2LogitsProcessor as impl
        return impl(*args, **kwargs, active=cls._active(args, kwargs))

    @classmethod
    def _active(cls, args: tuple, kwargs: dict) -> bool:
        return True

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Reject a bad spec or non-neutral vLLM sampling fields (HTTP 400 naming the field)."""
        validate_request(sampling_params)

    # Never called (``__new__`` returns an adapter); present so the ABCs see no abstract
    # method left and vLLM's class checks (issubclass) pass.
    def apply(self, logits, ctx=None):  # pragma: no cover
        raise NotImplementedError

    def is_argmax_invariant(self) -> bool:  # pragma: no cover
        return False

    def update_state(self, batch_update) -> None:  # pragma: no cover
        raise NotImplementedError


class EntcalPluginLogitsProcessor(EntcalLogitsProcessor):
    """The entry-point flavour: stands aside (changes nothing) in an engine whose
    ``logits_processors`` list already names entcal's processor, so decoders apply once."""

    @classmethod
    def _active(cls, args: tuple, kwargs: dict) -> bool:
        vllm_config = args[0] if args else kwargs.get("vllm_config")
        return not _explicitly_listed(vllm_config)
