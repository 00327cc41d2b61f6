"""List decoding with a probability threshold, after Chang (arXiv 2303.13112).

Instead of committing to one token per step, a list decoder keeps a *list* of candidate
continuations and defers the choice of output to the end. At each step every candidate ``s`` is
extended by every token ``v`` it keeps:

    keep (s, v)  iff  p(v | s) ≥ θ                     (per-step threshold, optional)
               and  log p(s) + log p(v | s) ≥ b        (bound on the total log-probability, optional)

and the list is capped at ``max_list`` candidates per prompt (the highest total log-probability
survive). With a per-step threshold a candidate keeps at most ⌊1/θ⌋ children, and a candidate whose
next-token distribution is diffuse keeps none: it is pruned. At the end the output is the candidate
with the highest total log-probability, or the best one under a user ``verifier``.

Chang models the candidates that have left the correct answer as a branching process: if each
erroneous candidate keeps R children on average and the correct one spawns β erroneous children
per step, the expected number of erroneous candidates after t steps is β(1 − Rᵗ)/(1 − R), bounded
for R < 1 and exponential for R > 1 (see :mod:`entcal.studies.branching`, which measures β and R with
this same engine).

Implementation: all candidates of all prompts are rows of one batch. Each step is one forward
pass of one token per row over a shared ``DynamicCache``; when the list changes, the cache rows are
gathered (``Cache.reorder_cache``) so that every child inherits its parent's keys and values. The
children are found with a top-k prefilter (k = ⌊1/θ⌋ bounds the count) and the per-prompt cap with
one sort (:mod:`entcal.studies.list_rules`), so nothing loops over rows or over the vocabulary.

Example::

    >>> from entcal import models
    >>> from entcal.studies.list_decoder import ListDecoder
    >>> model, tok = models.load("smollm2-135m")
    >>> dec = ListDecoder(model, tok, theta=0.2, max_list=8, max_new_tokens=16)
    >>> out = dec.decode(["The capital of France is"])
    >>> tok.decode(out.best[0]).strip(), round(out.best_score[0], 2), len(out.candidates[0])
    ('Paris.', -2.53, 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from entcal.studies.list_rules import cap_per_group, check_list_params, select_children

__all__ = ["ListDecodeResult", "ListDecoder"]


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a parameter-free module
        return torch.device("cpu")


class _Rows:
    """Candidates being extended together: one KV cache, one 2-D attention mask (left padding)."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_id: int):
        from transformers import DynamicCache

        self.model = model
        device = model_device(model)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # building the input batch, once per call
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        self.mask = mask.to(device)
        ids = ids.to(device)
        config = getattr(model, "config", None)
        try:
            # With the config, sliding-window layers (Gemma 3) get their own cache layers.
            self.cache = DynamicCache(config=config)
        except Exception:
            self.cache = DynamicCache()
        position_ids = (self.mask.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        self.first_logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def clone(self) -> _Rows:
        """An independent copy (same prompts, same cache): a sweep reuses one prefill."""
        import copy

        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)
        twin.mask = self.mask.clone()
        return twin

    def gather(self, index: torch.Tensor) -> None:
        """Make row i of the new batch a copy of old row index[i] (children inherit the cache)."""
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; return the (R, V) float32 next-token log-probabilities."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        position_ids = self.mask.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)


@dataclasses.dataclass
class ListDecodeResult:
    """What :meth:`ListDecoder.decode` returns; one entry per prompt in every list.

    Attributes:
        candidates: the final list of each prompt: generated token ids (an EOS, if emitted, is
            the last token), best first.
        scores: total log-probability (nats) of each candidate, same order.
        best: the chosen candidate (verifier's best, ties by total log-probability).
        best_score: its total log-probability.
        list_sizes: the number of live candidates after each step.
        extinct: True when every candidate was pruned (no token passed the rule) before
            ``max_new_tokens``; the final list is then the last non-empty one.
    """

    candidates: list[list[list[int]]]
    scores: list[list[float]]
    best: list[list[int]]
    best_score: list[float]
    list_sizes: list[list[int]]
    extinct: list[bool]


class ListDecoder:
    """Threshold list decoder with a list cap and deferred choice (Chang, arXiv 2303.13112).

    Keeps every extension with p(v | s) ≥ ``theta`` (and/or a total log-probability ≥
    ``min_total_logprob``), at most ``max_list`` live candidates per prompt (highest total
    log-probability first), for ``max_new_tokens`` steps or until every candidate has emitted EOS.
    The output is chosen at the end: the highest total log-probability, or, with ``verifier``, the
    candidate the verifier scores highest (``verifier(token_ids) -> float | bool``; ties are broken
    by total log-probability).

    Args:
        model: a causal LM as :func:`entcal.models.load` returns (any module with the Hugging Face
            ``forward(input_ids, attention_mask, position_ids, past_key_values, use_cache)``).
        tokenizer: optional; needed to decode string prompts and for the default EOS/pad ids.
        theta: per-step probability threshold in (0, 1), or None.
        min_total_logprob: bound (≤ 0, nats) on a candidate's total log-probability, or None.
        max_list: list cap per prompt, ≥ 1.
        max_new_tokens: steps, ≥ 1.
        eos_token_id: token that finishes a candidate; ``"auto"`` takes the tokenizer's (or the
            model config's), None disables.
        verifier: optional callable scoring a finished list's candidates.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        theta: float | None = 0.1,
        min_total_logprob: float | None = None,
        max_list: int = 16,
        max_new_tokens: int = 32,
        eos_token_id: int | str | None = "auto",
        verifier: Callable[[list[int]], float | bool] | None = None,
    ):
        self.theta, self.min_total_logprob, self.max_list = check_list_params(
            theta, min_total_logprob, max_list
        )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if verifier is not None and not callable(verifier):
            raise ValueError("verifier must be a callable token_ids -> float | bool")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.verifier = verifier
        if eos_token_id == "auto":
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
            if isinstance(eos_token_id, (list, tuple)):
                eos_token_id = eos_token_id[0] if eos_token_id else None
        self.eos_token_id = eos_token_id

    def _k(self) -> int:
        if self.theta is not None:
            return math.floor(1.0 / self.theta + 1e-9)
        return self.max_list

    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer")
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("a prompt is empty")
            out.append(ids)
        if not out:
            raise ValueError("no prompts given")
        return out

    @torch.inference_mode()
    def decode(self, prompts) -> ListDecodeResult:
        """List-decode one prompt or a batch (strings or token-id lists), all in one batch."""
        prompt_ids = self._encode(prompts)
        n_groups = len(prompt_ids)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else pad
        rows = _Rows(self.model, prompt_ids, pad)
        device = rows.mask.device
        group = torch.arange(n_groups, device=device)
        total = torch.zeros(n_groups, device=device)
        seqs = torch.zeros((n_groups, 0), dtype=torch.long, device=device)
        logprobs = rows.first_logprobs
        finished: list[tuple[int, list[int], float]] = []
        sizes: list[list[int]] = [[] for _ in range(n_groups)]
        extinct = [False] * n_groups
        k = self._k()
        for _ in range(self.max_new_tokens):
            _, parent, token, tok_lp = select_children(
                logprobs,
                total,
                theta=self.theta,
                min_total_logprob=self.min_total_logprob,
                k=k,
            )
            child_total = total[parent] + tok_lp
            keep = cap_per_group(group[parent], child_total, self.max_list)
            parent, token, child_total = parent[keep], token[keep], child_total[keep]
            child_group = group[parent]
            child_seqs = torch.cat([seqs[parent], token[:, None]], dim=1)
            alive_groups = torch.bincount(child_group, minlength=n_groups)
            for g in (alive_groups == 0).nonzero().flatten().tolist():
                if not extinct[g] and not any(f[0] == g for f in finished):
                    # Every candidate of this prompt was pruned: its last list is its answer.
                    extinct[g] = True
                    rows_g = (group == g).nonzero().flatten().tolist()
                    finished.extend((g, seqs[r].tolist(), float(total[r])) for r in rows_g)
            if self.eos_token_id is not None:
                done = token == self.eos_token_id
                for r in done.nonzero().flatten().tolist():
                    finished.append(
                        (int(child_group[r]), child_seqs[r].tolist(), float(child_total[r]))
                    )
                live = ~done
                parent, token, child_total = parent[live], token[live], child_total[live]
                child_group, child_seqs = child_group[live], child_seqs[live]
            counts = torch.bincount(child_group, minlength=n_groups).tolist()
            for g in range(n_groups):
                sizes[g].append(counts[g])
            if parent.numel() == 0:
                break
            rows.gather(parent)
            group, total, seqs = child_group, child_total, child_seqs
            logprobs = rows.step(token)
        else:
            group_l = group.tolist()
            finished.extend(
                (group_l[r], seqs[r].tolist(), float(total[r])) for r in range(len(group_l))
            )
        return self._choose(finished, n_groups, sizes, extinct)

    def _choose(self, finished, n_groups, sizes, extinct) -> ListDecodeResult:
        cands: list[list[list[int]]] = [[] for _ in range(n_groups)]
        scores: list[list[float]] = [[] for _ in range(n_groups)]
        for g, ids, score in sorted(finished, key=lambda f: -f[2]):
            cands[g].append(ids)
            scores[g].append(score)
        best, best_score = [], []
        for g in range(n_groups):
            if not cands[g]:
                best.append([])
                best_score.append(float("-inf"))
                continue
            if self.verifier is None:
                i = 0
            else:
                marks = [float(self.verifier(c)) for c in cands[g]]
                # Highest verifier score; among equals the first, i.e. the most probable.
                i = max(range(len(marks)), key=lambda j: (marks[j], -j))
            best.append(cands[g][i])
            best_score.append(scores[g][i])
        return ListDecodeResult(cands, scores, best, best_score, sizes, extinct)
