"""The ``vllm.logits_processors`` entry point of entcal, guarded so it never stops an engine.

vLLM loads every class registered under the entry-point group ``vllm.logits_processors`` into
every engine it starts, and an import error there aborts the engine ("Failed to load
LogitsProcessor plugin"). entcal registers :data:`plugin` (see ``pyproject.toml``)::

    [project.entry-points."vllm.logits_processors"]
    entcal = "entcal.decoding.vllm.plugin:plugin"

so that, with entcal installed, ``vllm serve MODEL`` already honours
``{"vllm_xargs": {"entcal": "<spec>"}}``. The guard:

* if entcal's processor imports, :data:`plugin` is it (a subclass of both vLLM processor
  interfaces; the engine's model runner picks the adapter, see
  :mod:`entcal.decoding.vllm.processor`). When the engine *also* lists entcal's processor
  explicitly (``LLM(logits_processors=[...])``, ``--logits-processors``, ``entcal serve``),
  the plugin instance stands aside so the decoder is applied once, not twice.
* if anything fails to import, :data:`plugin` is an inert processor: it leaves every logit
  alone, and its ``validate_params`` rejects requests that carry an ``entcal`` spec with the
  reason (HTTP 400), so such requests fail loudly instead of being sampled unprocessed.
  :data:`load_error` holds the reason.
"""

from __future__ import annotations

import logging

__all__ = ["load_error", "plugin"]

_log = logging.getLogger(__name__)

#: Why entcal's processor could not be loaded (``None`` when it loaded).
load_error: str | None = None


def _interfaces() -> tuple[type, ...]:
    """The vLLM logits-processor base classes importable here (V1 runner, Model Runner V2)."""
    bases: list[type] = []
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1

        bases.append(V1)
    except Exception:  # an older or broken vLLM: leave that interface out
        pass
    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

        bases.append(V2)
    except Exception:
        pass
    return tuple(bases)


def _make_inert(reason: str) -> type:
    """A processor that changes nothing and rejects entcal requests with ``reason``."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def apply(self, logits, ctx=None):
        return logits

    def is_argmax_invariant(self) -> bool:
        return True  # changes nothing, so vLLM may skip it for greedy batches

    def update_state(self, batch_update) -> None:
        pass

    def add_request(self, req_idx, sampling_params) -> bool:
        return False

    def apply_staged_writes(self) -> None:
        pass

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if "entcal" in extra:
            raise ValueError(
                "parameter 'entcal' (vllm_xargs / SamplingParams.extra_args) cannot be "
                f"served: entcal's vLLM logits processor failed to load ({reason})"
            )

    namespace = {
        "__init__": __init__,
        "apply": apply,
        "is_argmax_invariant": is_argmax_invariant,
        "update_state": update_state,
        "add_request": add_request,
        "apply_staged_writes": apply_staged_writes,
        "validate_params": validate_params,
        "__doc__": f"entcal's processor is unavailable here: {reason}",
        "__module__": __name__,
    }
    return type("EntcalUnavailableLogitsProcessor", _interfaces() or (object,), namespace)


try:
    from entcal.decoding.vllm.processor import EntcalPluginLogitsProcessor as plugin
except Exception as exc:  # never let an import problem stop a vLLM engine
    load_error = f"{type(exc).__name__}: {exc}"
    _log.warning("entcal: vLLM logits processor disabled: %s", load_error)
    try:
        plugin = _make_inert(load_error)
    except Exception:  # pragma: no cover - vLLM itself is broken beyond our reach
        plugin = object  # type: ignore[assignment,misc]
