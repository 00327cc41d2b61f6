"""vLLM requests carrying an entcal spec: where the spec lives, admission checks, and the decoder
instance that serves each request.

A request names its decoder in ``SamplingParams.extra_args["entcal"]`` (the OpenAI body's
``vllm_xargs.entcal``). :func:`validate_request` runs at admission, in vLLM's frontend: a spec
that does not parse, a decoder that needs what vLLM does not give a processor, or a vLLM sampling
field left non-neutral raises :class:`EntcalRequestError` (HTTP 400 naming the field; the server
keeps serving). :func:`new_request_decoder` gives the engine-side instance. The runner adapters
(:mod:`entcal.decoding.vllm.v1`, :mod:`entcal.decoding.vllm.v2`) and the registered class
(:mod:`entcal.decoding.vllm.processor`) import this module; it imports neither.
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
    "EntcalRequestError",
    "VLLMProcessor",
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
    problem = _unsupported_in_vllm(decoder)
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


def _unsupported_in_vllm(decoder: Decoder) -> str | None:
    """Why a decoder cannot work as a vLLM logits processor, or ``None``.

    vLLM hands a processor the logits and, per request, the sampled tokens, never the token
    history as a tensor: a decoder that declares ``requires_input_ids`` (``lookahead``, which runs
    its own model over the history) cannot run there.
    """
    if decoder.requires_input_ids:
        hint = getattr(decoder, "vllm_hint", "")
        why = "it needs the token history (input_ids), which vLLM does not pass"
        return f"{why}; {hint}" if hint else why
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
    if proto.requires_history:
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


class VLLMProcessor:
    """Marker base of entcal's vLLM processors (adapters and the dispatching class)."""
