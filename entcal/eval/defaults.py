"""Defaults and choices of ``entcal compare``, free of torch so that the CLI can show them instantly."""

from __future__ import annotations

__all__ = ["DEFAULT_DECODERS", "ENGINES", "TRANSFORMERS_ONLY_DEFAULTS"]

#: What can generate in a comparison (the first is the default).
ENGINES = ("transformers", "vllm", "ray")

#: The decoders ``entcal compare`` (and ``make run``) compares unless told otherwise: the
#: untruncated baseline, a temperature, the usual truncations, the calibrated decoder (the
#: shipped predictor of the embedded model) and the decoder anchored to the prompt's log loss.
DEFAULT_DECODERS = (
    "ancestral; temperature=0.9; top_p=0.95; min_p=0.05; typical=0.9; eta=0.0009; calibrated; "
    "anchored"
)
#: Default decoders that read the prompt through the model (``requires_input_ids``), which the
#: vLLM and Ray engines cannot give a logits processor: left out of their defaults.
TRANSFORMERS_ONLY_DEFAULTS = ("anchored",)
