"""entcal: entropy-calibrated text generation.

Sub-packages: ``entcal.decoding`` (sampling processors and their HF / vLLM adapters),
``entcal.calibrators`` (the future-entropy predictor, alpha fit, simpler calibrators),
``entcal.eval`` (calibration error, typical-set checks, detectability, diversity).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "generate"]


def __getattr__(name: str):
    # `entcal.generate` is imported on first use so that `import entcal` (and `entcal --help`)
    # stays free of torch and transformers.
    if name == "generate":
        from entcal.generation import generate

        return generate
    raise AttributeError(f"module 'entcal' has no attribute {name!r}")
