"""Mixed batches: apply row i's decoder to row i in one vectorized pass per method kind."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from entcal.decoding.base import Decoder
from entcal.decoding.ops import checked_row_max, faulty_rows, keep_dead_rows

__all__ = ["apply_rows", "apply_rows_at", "apply_rows_isolated"]


def apply_rows(
    logits: Tensor, decoders: Sequence[Decoder | None], input_ids: Tensor | None = None
) -> Tensor:
    """Process ``logits[i]`` with ``decoders[i]`` (``None`` leaves the row untouched).

    Rows are grouped by decoder class, and each class processes its rows at once with per-row
    parameter tensors (the chain: one pass with neutral values, e.g. ``top_p=1``, for rows that do
    not use a stage; mirostat: the state rows of all its instances stacked). There is no Python
    loop over rows on the tensor path. Returns a new float32 tensor; the input is not modified.

    Raises ``ValueError`` naming the rows that hold NaN or ``+inf`` (see
    :func:`apply_rows_isolated` for a batch that must go on without them).
    """
    row_max, extent = checked_row_max(logits)
    # (every row maximum finite: no row is all -inf, nothing to restore)
    out, failed = _apply(
        logits, decoders, input_ids, None if extent is not None else row_max, isolate=False
    )
    assert not failed
    return out


def apply_rows_isolated(
    logits: Tensor, decoders: Sequence[Decoder | None], input_ids: Tensor | None = None
) -> tuple[Tensor, dict[int, str]]:
    """:func:`apply_rows` for a serving loop: a fault stays in its own rows.

    A row whose logits hold NaN or ``+inf``, and the rows of a decoder kind whose processing
    raised, are returned unchanged; every other row gets its own decoder. Returns
    ``(logits [N, V] float32, {row: reason})`` for the rows left unprocessed. Their decoders did
    not run this step, so a stateful one is out of step with its sequence: callers should stop
    applying it (the vLLM adapters leave that request's rows raw from then on, and log it).
    """
    row_max, bad = faulty_rows(logits)  # shape and dtype errors concern the whole batch
    failed: dict[int, str] = {}
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        failed = {i: "NaN or +inf logits" for i in rows if decoders[i] is not None}
        decoders = [None if bad_i else d for d, bad_i in zip(decoders, bad.tolist(), strict=True)]
    out, more = _apply(logits, decoders, input_ids, row_max, isolate=True)
    failed.update(more)
    return out, failed


def apply_rows_at(
    logits: Tensor, rows: Tensor | None, decoders: Sequence[Decoder]
) -> tuple[Tensor, dict[int, str]]:
    """:func:`apply_rows_isolated` on the batch rows ``rows`` (``None``: all) of an engine's
    logits, written back in place in their dtype; failures keyed by batch row."""
    if rows is None:
        return apply_rows_isolated(logits, decoders)
    sub, failed = apply_rows_isolated(logits.index_select(0, rows), decoders)
    out = logits.index_copy_(0, rows, sub.to(logits.dtype))
    return out, {int(rows[i]): why for i, why in failed.items()}


def log_failed_rows(log: logging.Logger, failed: dict[int, str], what: str) -> None:
    """One error per failed row, saying what happens to its request (the adapters' wording)."""
    for key, why in failed.items():
        log.error(
            "entcal: %s %d failed (%s); that request is sampled from the raw distribution "
            "from now on, every other row keeps its decoder", what, key, why,
        )  # fmt: skip


def _apply(
    logits: Tensor,
    decoders: Sequence[Decoder | None],
    input_ids: Tensor | None,
    row_max: Tensor | None,
    *,
    isolate: bool,
) -> tuple[Tensor, dict[int, str]]:
    # row_max: the rows' maxima, for keep_dead_rows; None when no row is all -inf
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
    failed: dict[int, str] = {}
    if len(groups) == 1 and not isolate:
        ((cls, idx),) = groups.items()
        if len(idx) == n:
            with torch.no_grad():
                out = cls._apply_group([decoders[i] for i in idx], x, input_ids)  # type: ignore[misc]
            return _restore_dead(out, row_max), failed
    out = x.clone()
    with torch.no_grad():
        for cls, idx in groups.items():
            rows_t = torch.tensor(idx, device=x.device)
            sub_ids = None if input_ids is None else input_ids.index_select(0, rows_t)
            try:
                res = cls._apply_group(
                    [decoders[i] for i in idx],  # type: ignore[misc]
                    x.index_select(0, rows_t),
                    sub_ids,
                )
            except Exception as exc:
                if not isolate:
                    raise
                failed.update({i: f"{cls.__name__} raised {exc!r}" for i in idx})
                continue
            out.index_copy_(0, rows_t, res)
    return _restore_dead(out, row_max), failed


def _restore_dead(out: Tensor, row_max: Tensor | None) -> Tensor:
    """:func:`keep_dead_rows`, unless the caller knows no row is all ``-inf`` (``None``)."""
    return out if row_max is None else keep_dead_rows(out, row_max)
