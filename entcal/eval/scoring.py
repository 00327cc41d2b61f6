"""Batched teacher-forced scoring: per-token entropy, varentropy, log-prob and rank.

For each text (a prompt and a continuation, as token ids) and each continuation position ``t``,
with ``p_t`` the next-token distribution given the prompt and ``y_<t``:

* ``logprob[t] = log p_t(y_t)`` (``-inf`` when ``p_t`` excludes ``y_t``, as truncation does),
* ``entropy[t] = H(p_t) = -Σ_v p_t(v) log p_t(v)`` (0 log 0 = 0),
* ``varentropy[t] = Σ_v p_t(v) (log p_t(v))² - H(p_t)²``, the variance of the surprisal,
* ``rank[t] = 1 + #{v : logit_t(v) > logit_t(y_t)}`` (raw model only; GLTR / log-rank detectors),

under the raw model and under every given decoder's processed distribution
``softmax(decoder(logits_t))`` — the distribution a decoder actually samples from, which is what
Cao, Valiant & Liang (arXiv 2511.11966) score human text with and what the AEP of Mudumbai & Bell
(arXiv 2405.13798) is stated for.

Cost and memory: one forward pass of the model body per text (the prompt once per row batch,
shared by every continuation set scored against it through a copied KV cache), then the output
embedding applied to windows of positions so that no more than ``memory_budget`` bytes of
``[rows, vocab]`` float32 temporaries exist at once (Gemma 3's vocabulary is 262144 wide:
``[B*T, V]`` logits of a run would take gigabytes). Statistics are vectorised over the window;
only decoders whose ``requires_history`` is True are applied step by step (their state depends
on the tokens seen).

Example::

    >>> from entcal import models
    >>> from entcal.eval.scoring import score
    >>> model, tok = models.load("smollm2-135m")
    >>> s = score(model, [[1, 504, 3]], [[1171, 314]], decoders={"t=0.8": lambda x, ids=None: x / 0.8})
    >>> s.raw.logprob.round(decimals=3), s.processed["t=0.8"].entropy.round(decimals=3)  # [1, 2], nats
    (tensor([[-15.8360,  -6.1630]]), tensor([[2.2590, 2.4720]]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from entcal.decoding.ops import entropy_varentropy
from entcal.eval.model_runner import ModelRunner, logit_windows, vocab_size
from entcal.eval.scores import ScoreRequest, TextScores, TokenStats
from entcal.generation import left_pad, prompt_nll
from entcal.models import context_length

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ScoreRequest",
    "TextScores",
    "TokenStats",
    "distribution_stats",
    "score",
    "score_many",
]

# Bytes of [rows, vocab] float32 temporaries a window may use (logits, log-probs, probs and the
# products; decoders' own temporaries come on top of that).
DEFAULT_MEMORY_BUDGET = 1 << 30
# How many [rows, vocab] float32 tensors the statistics of one window hold at their peak.
_TEMPORARIES = 4


# --------------------------------------------------------------------------- the statistics


def distribution_stats(
    logits: Tensor, targets: Tensor, *, rank: bool = False, what: str = "logits"
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Statistics of ``softmax(logits)`` rows at ``targets``.

    Args:
        logits: ``[N, V]`` (any float dtype; computed in float32). ``-inf`` entries are
            excluded tokens.
        targets: ``[N]`` token ids.
        rank: also return the 1-based rank of each target.
        what: name used in error messages.

    Returns:
        ``(logprob, entropy, varentropy, rank_or_None)``, each ``[N]``.

    Raises:
        ValueError: a row holds NaN, or no finite logit.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, -1, keepdim=True)
    if not torch.isfinite(lse).all():
        bad = int((~torch.isfinite(lse)).squeeze(-1).nonzero()[0, 0])
        raise ValueError(
            f"{what}: row {bad} holds NaN or no finite value (cannot form a distribution)"
        )
    lp = logits - lse
    target_lp = lp.gather(-1, targets[:, None]).squeeze(-1)
    ranks = None
    if rank:
        chosen = logits.gather(-1, targets[:, None])
        ranks = (logits > chosen).sum(-1) + 1
    entropy, varentropy = entropy_varentropy(lp, overwrite=True)  # lp is this call's scratch
    return target_lp, entropy, varentropy, ranks


def _as_rows(seqs: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    rows = []
    for i, s in enumerate(seqs):
        row = s.tolist() if isinstance(s, Tensor) else list(s)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in row):
            row = [int(x) for x in row]
        rows.append(row)
        if what == "prompt" and not row:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (BOS)")
    return rows


def _right_pad(rows: list[list[int]], pad: int, width: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
    return ids, mask


def score(
    model,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    decoders: Mapping[str, Callable] | None = None,
    **kwargs,
) -> TextScores:
    """Score ``continuations[i]`` after ``prompts[i]`` under the raw model and each decoder.

    See :func:`score_many` for the keyword arguments.
    """
    return score_many(model, prompts, [ScoreRequest(continuations, decoders or {})], **kwargs)[0]


def score_many(
    model,
    prompts: Sequence[Sequence[int]],
    requests: Sequence[ScoreRequest],
    *,
    observer=None,
    batch_size: int = 8,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | str = False,
) -> list[TextScores]:
    """Score several continuation sets against the same prompts, running each prompt once.

    Args:
        model: a Hugging Face causal LM (or :class:`entcal.synthetic.MarkovChainLM`).
        prompts: ``B`` prompts as token ids (each non-empty; BOS included as the tokenizer adds
            it).
        requests: continuation sets, each with ``B`` continuations and its decoders.
        observer: optional second causal LM with the same tokenizer: adds Binoculars'
            cross-entropy term ``observer_cross_entropy``.
        batch_size: texts per forward pass (>= 1).
        memory_budget: bytes of ``[rows, vocab]`` float32 temporaries per window (>= 1 MiB).
        progress: show a progress bar (a string is used as its description).

    Returns:
        One :class:`TextScores` per request, tensors on the CPU.

    Raises:
        ValueError: mismatched lengths, empty prompts, texts longer than the model's context,
            a parameter out of range, or NaN logits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_budget < (1 << 20):
        raise ValueError(f"memory_budget must be >= 1 MiB (1048576 bytes), got {memory_budget}")
    prompt_rows = _as_rows(prompts, "prompt")
    n = len(prompt_rows)
    if n == 0:
        raise ValueError("no prompts to score")
    if not requests:
        return []
    runner = ModelRunner(model)
    obs_runner = ModelRunner(observer) if observer is not None else None
    sets = []
    for k, req in enumerate(requests):
        rows = _as_rows(req.continuations, "continuation")
        if len(rows) != n:
            raise ValueError(
                f"request {k}: {len(rows)} continuations for {n} prompts (need one per prompt)"
            )
        width = max(len(r) for r in rows)
        if width == 0:
            raise ValueError(f"request {k}: every continuation is empty")
        sets.append(rows)
    longest = max(len(p) for p in prompt_rows) + max(max(len(r) for r in s) for s in sets)
    for r in (runner, obs_runner):
        limit = context_length(r.config) if r is not None else None
        if limit is not None and longest > limit:
            raise ValueError(
                f"prompt + continuation of {longest} tokens exceeds the model's context of "
                f"{limit} positions"
            )
    with torch.inference_mode():
        return _score(
            runner, obs_runner, prompt_rows, sets, requests, batch_size, memory_budget, progress
        )


def _score(runner, obs_runner, prompt_rows, sets, requests, batch_size, memory_budget, progress):
    n = len(prompt_rows)
    device = runner.device
    results: list[TextScores] = []
    for rows, req in zip(sets, requests):
        width = max(len(r) for r in rows)
        tokens, mask = _right_pad(rows, 0, width)

        def stats(with_rank: bool, w=width) -> TokenStats:
            z = torch.zeros(n, w)
            return TokenStats(
                z.clone(),
                z.clone(),
                z.clone(),
                torch.zeros(n, w, dtype=torch.long) if with_rank else None,
            )

        results.append(
            TextScores(
                tokens=tokens,
                mask=mask,
                raw=stats(req.rank),
                processed={name: stats(False) for name in req.decoders},
                observer_cross_entropy=torch.zeros(n, width) if obs_runner is not None else None,
                features=None,
            )
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n * len(sets),
            unit="text",
            desc=progress if isinstance(progress, str) else "scoring",
            leave=False,
        )
    nll_window = max(
        (
            getattr(d, "prompt_nll_window", 0)
            for req in requests
            for d in req.decoders.values()
            if getattr(d, "requires_history", False)
        ),
        default=0,
    )
    try:
        for start in range(0, n, batch_size):
            idx = slice(start, min(n, start + batch_size))
            p_ids, p_mask = left_pad(prompt_rows[idx], runner.pad_id)
            p_pos = (p_mask.cumsum(-1) - 1).clamp_min(0)
            p_len = p_mask.sum(-1)
            p_ids, p_mask, p_pos = p_ids.to(device), p_mask.to(device), p_pos.to(device)
            cache, last, tail = runner.prompt(p_ids, p_mask, p_pos, keep=nll_window + 1)
            # the prompts' log loss for decoders that read it (anchored), from this same pass
            # (the [B, window, V] logits are dropped at once: only [B, window] is kept)
            prompt_losses = None
            if tail is not None:
                prompt_losses = prompt_nll(runner.to_logits(tail), p_ids, p_mask, nll_window)
            del tail
            obs = None
            if obs_runner is not None:
                od = obs_runner.device
                obs = obs_runner.prompt(p_ids.to(od), p_mask.to(od), p_pos.to(od))[:2]
            for res, req in zip(results, requests):
                _score_rows(
                    runner,
                    obs_runner,
                    res,
                    req,
                    idx,
                    prompt_rows[idx],
                    p_ids,
                    p_mask,
                    p_len,
                    cache,
                    last,
                    obs,
                    memory_budget,
                    prompt_losses,
                )
                if bar is not None:
                    bar.update(idx.stop - idx.start)
    finally:
        if bar is not None:
            bar.close()
    return results


def _score_rows(
    runner,
    obs_runner,
    res,
    req,
    idx,
    prompts,
    p_ids,
    p_mask,
    p_len,
    cache,
    last,
    obs,
    memory_budget,
    prompt_losses=None,
):
    device = runner.device
    tokens = res.tokens[idx].to(device)
    c_mask = res.mask[idx]
    b, width = tokens.shape
    mask = torch.cat([p_mask, c_mask.to(device=device, dtype=p_mask.dtype)], dim=1)
    pos = p_len.to(device)[:, None] + torch.arange(width, device=device)[None]
    # The input that predicts continuation token t is token t-1 (the prompt's last for t = 0):
    # the continuation pass runs the continuation minus its last token.
    inputs, in_mask, in_pos = tokens[:, :-1], mask[:, :-1], pos[:, :-1]
    vocab = vocab_size(runner, last)
    window = max(1, max(1, memory_budget // (vocab * 4 * _TEMPORARIES)) // b)
    stateful = {k: d for k, d in req.decoders.items() if getattr(d, "requires_history", False)}
    stateless = {k: d for k, d in req.decoders.items() if k not in stateful}
    for d in stateful.values():
        d.reset(b)
        d.prime(prompts)  # the prompts without padding (decoders that read them: anchored)
        # (a duck-typed decoder may lack the hook)
        if prompt_losses is not None and getattr(d, "prompt_nll_window", 0) > 0:
            d.prime_prompt_nll(*prompt_losses)
    history = torch.cat([p_ids, tokens], dim=1)
    prompt_width = p_ids.shape[1]
    # The prompt cache is shared by every request: each continuation runs on a copy.
    main = logit_windows(runner, copy.deepcopy(cache), last, inputs, in_mask, in_pos, window, width)
    other = None
    if obs_runner is not None:
        o_cache, o_last = obs
        od = obs_runner.device
        other = logit_windows(
            obs_runner,
            copy.deepcopy(o_cache),
            o_last,
            inputs.to(od),
            in_mask.to(od),
            in_pos.to(od),
            window,
            width,
        )
    last_index = (c_mask.sum(-1) - 1).clamp_min(0).to(device)
    feats = None
    for t0, out in main:
        t1 = t0 + out.shape[1]
        if runner.fast:
            feats = _take_features(feats, out, t0, last_index)
        logits = runner.to_logits(out)
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = tokens[:, t0:t1].reshape(-1)
        lp, ent, var, rk = distribution_stats(flat, tgt, rank=req.rank, what="model logits")
        _put(res.raw, idx, t0, t1, b, lp, ent, var, rk)
        for name, dec in stateless.items():
            proc = dec(flat, None)
            lp, ent, var, _ = distribution_stats(proc, tgt, what=f"decoder {name!r}")
            _put(res.processed[name], idx, t0, t1, b, lp, ent, var, None)
        for name, dec in stateful.items():
            # State depends on the tokens seen: one step at a time, observing the real token.
            for j in range(t1 - t0):
                t = t0 + j
                proc = dec(logits[:, j], history[:, : prompt_width + t])
                lp, ent, var, _ = distribution_stats(proc, tokens[:, t], what=f"decoder {name!r}")
                _put(res.processed[name], idx, t, t + 1, b, lp, ent, var, None)
                dec.observe(tokens[:, t])
        if other is not None:
            o0, o_out = next(other)
            if o0 != t0 or o_out.shape[1] != t1 - t0:  # same windows by construction
                raise RuntimeError("observer windows out of step with the model's")
            ce = _cross_entropy(obs_runner.to_logits(o_out).to(device), logits)
            res.observer_cross_entropy[idx, t0:t1] = ce.cpu()
    if feats is not None:
        if res.features is None:
            res.features = torch.zeros(res.tokens.shape[0], feats.shape[-1])
        res.features[idx] = feats.cpu()
    # Padded positions hold 0 everywhere (they were scored with pad tokens as targets).
    pad = ~c_mask
    for st in [res.raw, *res.processed.values()]:
        for t in (st.logprob, st.entropy, st.varentropy, st.rank):
            if t is not None:
                t[idx][pad] = 0
    if res.observer_cross_entropy is not None:
        res.observer_cross_entropy[idx][pad] = 0


def _put(st: TokenStats, idx: slice, t0: int, t1: int, b: int, lp, ent, var, rk) -> None:
    st.logprob[idx, t0:t1] = lp.reshape(b, -1).cpu()
    st.entropy[idx, t0:t1] = ent.reshape(b, -1).cpu()
    st.varentropy[idx, t0:t1] = var.reshape(b, -1).cpu()
    if rk is not None and st.rank is not None:
        st.rank[idx, t0:t1] = rk.reshape(b, -1).cpu()


def _take_features(feats, hidden: Tensor, t0: int, last_index: Tensor):
    """Keep, per text, the final hidden state that predicts its last token (window position
    ``last_index - t0``): the text embedding MAUVE clusters, at no extra forward pass."""
    b, w, _ = hidden.shape
    rel = last_index - t0
    hit = (rel >= 0) & (rel < w)
    if not bool(hit.any()):
        return feats
    if feats is None:
        feats = torch.zeros(b, hidden.shape[-1], device=hidden.device)
    rows = hit.nonzero().squeeze(-1)
    feats[rows] = hidden[rows, rel[rows]].float()
    return feats


def _cross_entropy(o_logits: Tensor, logits: Tensor) -> Tensor:
    """``[b, w]``: ``-Σ_v softmax(observer)_v log_softmax(model)_v``; both vocabularies are cut
    to the smaller one (as Fast-DetectGPT does for models whose vocabularies differ)."""
    v = min(o_logits.shape[-1], logits.shape[-1])
    o = torch.softmax(o_logits[..., :v].float(), -1)
    m = torch.log_softmax(logits[..., :v].float(), -1)
    m = torch.where(o > 0, m, 0.0)
    return -(o * m).sum(-1)
