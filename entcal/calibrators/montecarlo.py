"""Monte-Carlo future entropy (Algorithm 2 of Cao, Valiant & Liang, arXiv 2511.11966).

The k-step future entropy of a prefix after choosing token ``v`` is estimated by sampling a
continuation ``Ŷ_1..Ŷ_{k-1}`` and summing the *exact* entropies of the next-token distributions
along it,

    Ĥ_k(prefix, v) = Σ_{s=1}^{k} H( q(· | prefix, v, Ŷ_{<s}) ),

an unbiased estimate of ``E[Σ_s −log q(Ŷ_s | ...)]`` with lower variance than summed surprisals.
``q`` is the raw model, or the adjusted model ``p_α`` of a previous round (the paper's fixed point:
future entropy is that of the process actually sampled).

All candidates of one prefix run as one batch: the prefix's KV cache is computed once, copied,
cropped to the prefix and repeated over the candidates (``DynamicCache.batch_repeat_interleave``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from entcal.decoding.ops import entropy_varentropy

__all__ = [
    "StepFn",
    "choose_candidates",
    "hf_step_fn",
    "rollout_entropy",
]

# step(tokens (B,), state) -> (log-probs of the next token (B, V), new state)
StepFn = Callable[[Tensor, object], tuple[Tensor, object]]
# adjust(log-probs (B, V), position (B,)) -> log-probs of the distribution actually sampled
AdjustFn = Callable[[Tensor, Tensor], Tensor]


def hf_step_fn(model) -> StepFn:
    """A :data:`StepFn` over a Hugging Face causal LM whose state is its ``DynamicCache``."""

    def step(tokens: Tensor, cache):
        out = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values

    return step


def expand_cache(cache, length: int, repeats: int):
    """A copy of a batch-1 ``DynamicCache`` cropped to ``length`` tokens and repeated ``repeats`` times."""
    new = copy.deepcopy(cache)
    extra = new.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"the cache holds {new.get_seq_length()} tokens, fewer than {length}")
    if extra:
        new.crop(-extra)  # negative: remove that many tokens (transformers >= 5)
    new.batch_repeat_interleave(repeats)
    return new


@torch.inference_mode()
def rollout_entropy(
    step: StepFn,
    state,
    first_tokens: Tensor,
    horizon: int,
    generator: torch.Generator | None = None,
    adjust: AdjustFn | None = None,
    position: int = 0,
) -> Tensor:
    """Sum of exact next-token entropies along one sampled continuation per row.

    Args:
        step: the model as a :data:`StepFn`; ``state`` its state for the batch (one row per
            entry of ``first_tokens``, all sharing the prefix).
        first_tokens: ``(B,)`` the chosen tokens ``v`` (repeat a token for several samples).
        horizon: k, the number of next-token distributions summed (k ≥ 1).
        adjust: turns raw log-probs into those of the sampled process (the adjusted model).
        position: generated-token index of ``v`` (positions of later steps follow).

    Returns:
        ``(B,)`` float64 sums of entropies (nats).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    total = torch.zeros(first_tokens.shape[0], dtype=torch.float64, device=first_tokens.device)
    tokens = first_tokens
    for s in range(horizon):
        logprobs, state = step(tokens, state)
        if adjust is not None:
            pos = torch.full_like(tokens, position + 1 + s)
            logprobs = adjust(logprobs, pos)
        ent, _ = entropy_varentropy(logprobs)
        total += ent.double()
        if s + 1 < horizon:
            tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
    return total


def choose_candidates(
    logprobs: Tensor,
    human: int | None,
    top_k: int,
    n_tail: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Candidates of one row ``(V,)``: top-k, the human token, ``n_tail`` tail samples (∝ p).

    Tail tokens are drawn from the distribution outside the top-k, so they are the tokens
    ancestral sampling would actually pick there. Returns unique ids (top-k first).
    """
    top = torch.topk(logprobs, min(top_k, logprobs.shape[-1])).indices
    parts = [top]
    if human is not None:
        parts.append(torch.tensor([human], device=logprobs.device))
    if n_tail > 0:
        tail = logprobs.exp().clone()
        tail[top] = 0.0
        if human is not None:
            tail[human] = 0.0
        avail = int((tail > 0).sum())
        if avail > 0:
            parts.append(
                torch.multinomial(tail, min(n_tail, avail), replacement=False, generator=generator)
            )
    ids = torch.cat(parts)
    # Unique, keeping first occurrences (top-k order first).
    seen: dict[int, None] = dict.fromkeys(ids.tolist())
    return torch.tensor(list(seen), device=logprobs.device, dtype=torch.long)


@torch.inference_mode()
def batched_rollout_entropy(
    model,
    prefixes: list[list[int]],
    candidates: Tensor,
    positions: Tensor,
    horizon: int,
    generator: torch.Generator | None = None,
    adjust: AdjustFn | None = None,
) -> Tensor:
    """:func:`rollout_entropy` for ``P`` different prefixes at once, ``C`` candidates each.

    The prefixes (token ids, of any lengths) run once, left padded, as one batch; their KV cache
    is repeated over the candidates, so one decode step serves all ``P·C`` rollouts.

    Args:
        model: a Hugging Face causal LM.
        prefixes: ``P`` token-id lists (each non-empty).
        candidates: ``(P, C)`` the chosen tokens ``v`` after each prefix.
        positions: ``(P,)`` generated-token index of ``v`` (the α bucket / position feature).
        horizon: k, the number of next-token distributions summed along each rollout.
        adjust: turns raw log-probs into those of the sampled process (the adjusted model).

    Returns:
        ``(P, C)`` float64 sums of entropies (nats).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    p, c = candidates.shape
    if len(prefixes) != p or not all(prefixes):
        raise ValueError(f"need {p} non-empty prefixes, got {len(prefixes)}")
    from entcal.generation import left_pad

    device = candidates.device
    pad = model.config.pad_token_id
    ids, mask = left_pad(prefixes, int(pad) if isinstance(pad, int) else 0)
    ids, mask = ids.to(device), mask.to(device)
    pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    # Prefixes of one length need no mask; with one, attention copies every KV head per step
    # (grouped-query attention without the fused path), about 4x slower on CPU.
    attn = mask if bool((mask == 0).any()) else None
    out = model(
        input_ids=ids, attention_mask=attn, position_ids=pos_ids, use_cache=True, logits_to_keep=1
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(c)
    if attn is not None:
        attn = attn.repeat_interleave(c, dim=0)
    next_pos = pos_ids[:, -1].repeat_interleave(c) + 1
    position = positions.to(device).repeat_interleave(c)
    tokens = candidates.reshape(-1)
    total = torch.zeros(p * c, dtype=torch.float64, device=device)
    for s in range(horizon):
        if attn is not None:
            attn = torch.cat([attn, attn.new_ones(p * c, 1)], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=attn,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_pos = next_pos + 1
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        if adjust is not None:
            logprobs = adjust(logprobs, position + 1 + s)
        total += entropy_varentropy(logprobs)[0].double()
        if s + 1 < horizon:
            tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)[:, 0]
    return total.reshape(p, c)
