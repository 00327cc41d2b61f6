"""Per-row plumbing every op shares: broadcasting parameters to rows, the validation of
logits (NaN, +inf, all -inf rows), and the block reductions of the prefilters."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")
F32_MAX = torch.finfo(torch.float32).max

#: Tokens per block of the block prefilters (top-k, top-p, typical): a reduction over blocks
#: is cheap, and only the few blocks that can matter are gathered.
BLOCK = 32


def rows(value: float | int | Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A per-row parameter as a tensor ``[n]`` on ``device`` (a number is broadcast)."""
    if isinstance(value, Tensor):
        t = value.to(device=device, dtype=dtype)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"per-row parameter has shape {tuple(t.shape)}, expected ({n},)")
        return t
    if dtype.is_floating_point and abs(value) > torch.finfo(dtype).max:
        value = math.inf if value > 0 else -math.inf  # e.g. top_n_sigma=1e300: inf (off)
    return torch.full((n,), value, device=device, dtype=dtype)


def faulty_rows(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(row maxima [N], rows holding NaN or +inf [N] bool)`` of ``[N, V]`` logits.

    Raises ``ValueError`` if the tensor is not 2-D floating point (a fault of the whole batch).
    """
    mx = _row_max(logits)
    return mx, _faulty_max(mx)


def _row_max(logits: Tensor) -> Tensor:
    """Row maxima ``[N]`` of 2-D floating-point logits (``ValueError`` otherwise); amax
    propagates NaN, so the one reduction finds both NaN and +inf rows."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    return logits.amax(dim=-1)


def _faulty_max(mx: Tensor) -> Tensor:
    """Rows whose maximum is NaN or +inf."""
    return torch.isnan(mx) | (mx == float("inf"))


def finite_extent(row_max: Tensor) -> float | None:
    """``max |row_max|`` if every row maximum is finite, else ``None`` (some row holds NaN or
    +inf, or is all ``-inf``), in one synchronization: the common case of the checks below costs
    two small ops instead of six (at batch 1 those ops, not the row, were most of a call)."""
    if row_max.numel() == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(row_max)).tolist()  # (aminmax propagates NaN)
    if math.isfinite(lo) and math.isfinite(hi):
        return max(-lo, hi)
    return None


def keep_dead_rows(out: Tensor, row_max: Tensor) -> Tensor:
    """Rows whose input was all ``-inf`` (``row_max`` ``-inf``) come back all ``-inf``, whatever
    a decoder computed for them (a softmax over such a row is NaN): the contract every decoder
    keeps, enforced by :meth:`Decoder.__call__` and :func:`entcal.decoding.apply_rows`."""
    dead = row_max == float("-inf")
    if bool(dead.any()):  # (not amin: a NaN row beside a dead one would hide it)
        out = out.masked_fill(dead.to(out.device)[:, None], float("-inf"))
    return out


def check_logits(logits: Tensor) -> Tensor:
    """Validate ``[N, V]`` logits and return their row maxima ``[N]``.

    Raises ``ValueError`` naming the rows that contain NaN or ``+inf`` (a softmax over them is
    undefined). Rows that are entirely ``-inf`` are allowed (every op leaves them unchanged).
    """
    return checked_row_max(logits)[0]


def checked_row_max(logits: Tensor) -> tuple[Tensor, float | None]:
    """:func:`check_logits`, also returning :func:`finite_extent` of the row maxima (``None``
    when some row is all ``-inf``, then :func:`keep_dead_rows` has work to do, or there are
    no rows)."""
    mx = _row_max(logits)
    extent = finite_extent(mx)
    if extent is not None:  # the common case
        return mx, extent
    bad = _faulty_max(mx)  # (dead rows, all -inf, are not faults)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        nan_rows = [i for i in idx if bool(torch.isnan(logits[i]).any())]
        inf_rows = [i for i in idx if i not in nan_rows]
        parts = []
        if nan_rows:
            parts.append(f"NaN logits in batch row(s) {nan_rows[:10]}")
        if inf_rows:
            parts.append(f"+inf logits in batch row(s) {inf_rows[:10]}")
        raise ValueError(
            "logits: " + "; ".join(parts) + " (logits must be finite or -inf for masked tokens)"
        )
    return mx, None


def blocks(t: Tensor, fill: float) -> Tensor:
    """``t [r, V]`` as ``[r, ceil(V / BLOCK), BLOCK]`` (a view unless ``V % BLOCK``: then padded)."""
    r, v = t.shape
    pad = (-v) % BLOCK
    if pad:
        t = torch.nn.functional.pad(t, (0, pad), value=fill)
    return t.reshape(r, -1, BLOCK)


#: Most tokens :func:`sorted_rows` sorts as one 1-D integer tensor (measured crossover: 1.5M
#: tokens still 1.5x faster, 8.4M 1.8x slower).
SORTED_ROWS_MAX = 1 << 21


def sorted_rows(x: Tensor) -> Tensor:
    """``torch.sort(x, dim=-1).values`` of ``[r, V]`` logits (ascending), the same values.

    On a CPU, float32 rows are sorted as one 1-D tensor of int64 keys, ``row * 2^32`` plus an
    order-preserving image of each float's bits, instead of row by row: torch's CPU float sort
    compares NaN-aware, and a 1-D integer sort runs faster (2 threads: one 262144-token row
    ~4.5 ms against ~22 ms, 3 rows 25 against 47 ms). A comparison sort, its cost per token
    grows with the length, so beyond ``SORTED_ROWS_MAX`` tokens (8 rows of 262144: 740
    against 410 ms at 32) rows go to ``torch.sort``, as do other dtypes and devices. Only the
    order of ``-0.0`` and ``+0.0`` may differ (``-0.0`` first), which no softmax or sum sees.
    NaN must not occur: a NaN with its sign bit set (x86's default) would sort first, where
    ``torch.sort`` puts NaN last (top-p leaves rows holding a NaN untouched before this).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() > SORTED_ROWS_MAX:
        return torch.sort(x, dim=-1).values
    r, v = x.shape
    bits = x.contiguous().view(torch.int32).long()
    # non-negative floats above all negative ones; among negatives, larger magnitude first
    keys = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    keys += (torch.arange(r, device=x.device) << 32).view(-1, 1)
    keys = keys.view(-1).sort().values.view(r, v) & 0xFFFFFFFF
    bits = torch.where(keys >= 1 << 31, keys - (1 << 31), -1 - keys)
    return bits.to(torch.int32).view(torch.float32)


def kth_largest(logits: Tensor, k: int | Tensor) -> Tensor:
    """Value of the k-th largest logit per row ``[N, 1]`` (k >= 1, clipped to V; one number
    for every row, or ``[N]``).

    For small k, ``topk`` runs on the k blocks (of ``BLOCK`` tokens) with the largest maxima
    only: any token among the row's k largest lies in such a block, and those blocks hold k
    values at least as large as the k-th, so the k largest *values* are unchanged.
    """
    v = logits.shape[-1]
    if isinstance(k, Tensor):
        k = k.clamp(1, v)
        kmax = int(k.max())
    else:
        kmax = k = min(max(k, 1), v)
    if kmax == 1:
        return logits.amax(dim=-1, keepdim=True)
    x = logits
    if 4 * kmax * BLOCK <= v:
        kb = blocks(logits, NEG_INF)
        ids = kb.amax(-1).topk(kmax, dim=-1, sorted=False).indices
        x = kb.gather(1, ids.unsqueeze(-1).expand(-1, -1, BLOCK)).flatten(1)
    if not isinstance(k, Tensor) or bool((k == kmax).all()):
        return x.topk(kmax, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    vals = x.topk(kmax, dim=-1, sorted=True).values
    return vals.gather(-1, (k - 1).view(-1, 1))


def largest(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(logits, k, sorted=True)`` by way of the k blocks with the largest maxima
    (those hold the k largest values; one reduction over blocks replaces a full-row top-k)."""
    v = logits.shape[-1]
    if v % BLOCK or 4 * k * BLOCK > v:
        return torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    kb = logits.view(logits.shape[0], -1, BLOCK)
    blocks = kb.amax(-1).topk(k, dim=-1, sorted=False).indices  # [N, k]
    gathered = kb.gather(1, blocks.unsqueeze(-1).expand(-1, -1, BLOCK)).flatten(1)
    values, pos = gathered.topk(k, dim=-1, largest=True, sorted=True)
    return values, blocks.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK


def min_keep_guard(logits: Tensor, min_keep: int | Tensor) -> Tensor:
    """``[N, V]`` bool: True for tokens *outside* the top ``min_keep`` (ties at the edge kept)."""
    n = logits.shape[0]
    k = rows(min_keep, n, logits.device, torch.long)
    return logits < kth_largest(logits, k)
