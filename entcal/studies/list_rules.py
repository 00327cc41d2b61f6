"""The keep rules of threshold list decoding, as batched tensor ops (no model, no forward pass).

A candidate ``s`` keeps its extension ``v`` iff p(v | s) ≥ θ and/or log p(s) + log p(v | s) ≥ b
(:func:`select_children`, all rows at once with a top-⌊1/θ⌋ prefilter, exact counts), and each
prompt keeps at most ``max_list`` candidates (:func:`cap_per_group`, one sort for all prompts).
:func:`check_list_params` validates θ, b and the cap. Shared by the list decoder
(:mod:`entcal.studies.list_decoder`) and the branching measurement
(:mod:`entcal.studies.branching`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["cap_per_group", "check_list_params", "select_children"]


def check_list_params(
    theta: float | None, min_total_logprob: float | None, max_list: int
) -> tuple[float | None, float | None, int]:
    """Validate list-decoding parameters; raise ``ValueError`` naming the bad one."""
    if theta is None and min_total_logprob is None:
        raise ValueError("give theta (per-step threshold) and/or min_total_logprob (total bound)")
    if theta is not None:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise ValueError(f"theta must be a number in (0, 1), got {theta!r}")
        if not (0.0 < float(theta) < 1.0) or math.isnan(theta):
            raise ValueError(f"theta must lie in the open interval (0, 1), got {theta}")
        theta = float(theta)
    if min_total_logprob is not None:
        if isinstance(min_total_logprob, bool) or not isinstance(min_total_logprob, (int, float)):
            raise ValueError(f"min_total_logprob must be a number <= 0, got {min_total_logprob!r}")
        if math.isnan(min_total_logprob) or min_total_logprob > 0:
            raise ValueError(
                f"min_total_logprob is a log-probability bound and must be <= 0, "
                f"got {min_total_logprob}"
            )
        min_total_logprob = float(min_total_logprob)
    if isinstance(max_list, bool) or not isinstance(max_list, int) or max_list < 1:
        raise ValueError(f"max_list (the list cap) must be an integer >= 1, got {max_list!r}")
    return theta, min_total_logprob, max_list


def select_children(
    logprobs: torch.Tensor,
    total: torch.Tensor,
    *,
    theta: float | None,
    min_total_logprob: float | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept extensions of every row: p(v|s) ≥ θ and/or total + log p(v|s) ≥ bound.

    Args:
        logprobs: (R, V) next-token log-probabilities of each row.
        total: (R,) total log-probability of each row so far.
        theta, min_total_logprob: the keep rules (``None`` = unused).
        k: how many of each row's most probable tokens to look at. With a per-step threshold
            k = ⌊1/θ⌋ misses nothing (at most 1/θ tokens have p ≥ θ); with only a total bound
            the list cap is the useful k.

    Returns:
        ``(counts, parent, token, token_logprob)``: ``counts`` (R,) is the exact number of kept
        tokens of each row (over the whole vocabulary, even beyond k); the other three list the
        kept children among each row's top k, row-major.
    """
    k = max(1, min(k, logprobs.shape[-1]))
    top_lp, top_tok = logprobs.topk(k, dim=-1)
    keep = torch.isfinite(top_lp)
    full = torch.isfinite(logprobs) if theta is None else None
    if theta is not None:
        log_theta = math.log(theta)
        keep &= top_lp >= log_theta
    if min_total_logprob is not None:
        keep &= total[:, None] + top_lp >= min_total_logprob
    if theta is None:
        # Only a total bound: the count can exceed k, so count over the whole vocabulary.
        full = full & (total[:, None] + logprobs >= min_total_logprob)
        counts = full.sum(-1)
    else:
        counts = keep.sum(-1)
    parent, col = keep.nonzero(as_tuple=True)
    return counts, parent, top_tok[parent, col], top_lp[parent, col]


def cap_per_group(group: torch.Tensor, key: torch.Tensor, cap: int) -> torch.Tensor:
    """Boolean mask keeping, within each group, the ``cap`` items of largest ``key``.

    One stable sort by key then one by group: the rank of an item inside its group is its sorted
    position minus the position where its group starts.
    """
    n = group.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=group.device)
    order = key.argsort(descending=True, stable=True)
    order = order[group[order].argsort(stable=True)]
    g_sorted = group[order]
    pos = torch.arange(n, device=group.device)
    is_start = torch.ones(n, dtype=torch.bool, device=group.device)
    is_start[1:] = g_sorted[1:] != g_sorted[:-1]
    start = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), 0).values
    keep = torch.zeros(n, dtype=torch.bool, device=group.device)
    keep[order] = (pos - start) < cap
    return keep
