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

from typing import Any

from entcal.decoding.vllm.request import (
    EXTRA_ARGS_KEY,
    NEUTRAL_FIELDS,
    EntcalRequestError,
    VLLMProcessor,
    new_request_decoder,
    request_spec,
    validate_request,
)

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
        elif (
            isinstance(item, type)
            and issubclass(item, VLLMProcessor)
            and item is not _plugin_class()
        ):
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


def _is_v1_call(args: tuple, kwargs: dict) -> bool:
    """V1 runner: ``(vllm_config, device, is_pin_memory)``; V2: ``(vllm_config, req_states)``."""
    if "req_states" in kwargs:
        return False
    if "device" in kwargs or "is_pin_memory" in kwargs:
        return True
    return len(args) >= 3


class EntcalLogitsProcessor(VLLMProcessor, *_interfaces()):  # type: ignore[misc]
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
