"""Compare's results on disk: strict JSON of the results, and the cache of generations and
scores (one file per decoder and prompt batch, keyed by a digest of what produced it) that lets an
interrupted run resume."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["digest", "load_cached", "save_cached", "to_json"]


def to_json(value: Any) -> Any:
    """Make ``value`` strict JSON: tensors/arrays to lists, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json(value.tolist())
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def digest(obj: Any) -> str:
    """A short stable key of a JSON-able object (sorted keys), naming a cache entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def decoder_key(spec: str, decoder: Any) -> dict:
    """The part of a cache key naming a decoder: its spec, plus what a file-reading decoder's
    output also depends on (:meth:`~entcal.decoding.base.Decoder.cache_key`) when that differs
    from the spec (so the keys of every other decoder stay as they were)."""
    key = decoder.cache_key()
    return {"decoder": spec} if key == spec else {"decoder": spec, "decoder_content": key}


def load_cached(path: Path) -> Any | None:
    """The tensors saved at ``path`` (``weights_only``: never unpickles code), or ``None`` if
    there is none or it is unreadable (it is then recomputed)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # cut short or corrupted (writes are atomic, so not by a kill)
        print(f"entcal compare: cache {path} is unreadable ({exc}); computing it again",
              file=sys.stderr, flush=True)  # fmt: skip
        return None


def save_cached(path: Path, obj: Any) -> None:
    """Write atomically (a temporary file, then a rename), so a killed run leaves no torn entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)
