"""Where a model runs and in which dtype: ``--device`` / ``--dtype`` values resolved and checked
against this machine, so a device that is not here fails at once, naming it."""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype"]

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """The device a ``--device`` value names, checked to exist here.

    ``auto`` is ``cuda`` when a CUDA device is available, else ``cpu``; ``cuda``, ``cuda:N`` and
    ``mps`` must be available. Raises ``ValueError`` naming the device and why otherwise (no
    traceback needed: the CLI prints it as the error).
    """
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device {device!r} is not a device; use one of {', '.join(DEVICES)}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {text!r}: no CUDA device is available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {text!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {text!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"device {text!r} is not supported; use one of {', '.join(DEVICES)}")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """The weight dtype a ``--dtype`` value names: ``float32``, ``bfloat16``, ``float16``, or
    ``auto`` (bfloat16 on a CUDA device that supports it, else float32). ``ValueError`` otherwise.

    Whatever the weights' dtype, entcal computes entropies, log-probs and every decoder on
    float32 logits (upcast before any softmax)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    text = str(dtype).strip().lower()
    if text == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if text not in DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported; use auto or one of {', '.join(DTYPES)}"
        )
    return DTYPES[text]
