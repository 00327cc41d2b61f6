"""Mixed batches: apply row i's decoder to row i in one vectorized pass per method kind."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from entcal.decoding.base import Decoder
from entcal.decoding.ops import check_logits

__all__ = ["apply_rows"]


def apply_rows(
    logits: Tensor, decoders: Sequence[Decoder | None], input_ids: Tensor | None = None
) -> Tensor:
    """Process ``logits[i]`` with ``decoders[i]`` (``None`` leaves the row untouched).

    Rows are grouped by decoder class, and each class processes its rows at once with per-row
    parameter tensors (the chain: one pass with neutral values, e.g. ``top_p=1``, for rows that do
    not use a stage; mirostat: the state rows of all its instances stacked). There is no Python
    loop over rows on the tensor path. Returns a new float32 tensor; the input is not modified.
    """
    check_logits(logits)
    n = logits.shape[0]
    if len(decoders) != n:
        raise ValueError(f"apply_rows: {len(decoders)} decoders for {n} logits rows")
    x = logits.float()
    groups: dict[type, list[int]] = {}
    for i, d in enumerate(decoders):
        if d is None:
            continue
        if not isinstance(d, Decoder):
            raise ValueError(f"apply_rows: row {i} has {type(d).__name__}, expected a Decoder")
        groups.setdefault(type(d), []).append(i)
    if len(groups) == 1:
        ((cls, idx),) = groups.items()
        if len(idx) == n:
            with torch.no_grad():
                return cls._apply_group([decoders[i] for i in idx], x, input_ids)  # type: ignore[misc]
    out = x.clone()
    with torch.no_grad():
        for cls, idx in groups.items():
            rows_t = torch.tensor(idx, device=x.device)
            sub_ids = None if input_ids is None else input_ids.index_select(0, rows_t)
            res = cls._apply_group(
                [decoders[i] for i in idx],  # type: ignore[misc]
                x.index_select(0, rows_t),
                sub_ids,
            )
            out.index_copy_(0, rows_t, res)
    return out
