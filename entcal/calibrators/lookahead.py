"""One-step lookahead calibration (the comparator of Braverman et al. 2020 style).

The future entropy of a candidate ``v`` is replaced by the *exact* entropy of the next step after
it, ``Ĥ_1(v) = H(p(· | prefix, v))``, computed for the top-``k`` candidates of each row by one
batched extra forward pass (the prefix's KV cache repeated ``k`` times). Every other token gets the
candidates' mass-weighted mean, and the same rule as the calibrated decoder applies:

    p_α(v) ∝ exp( (1 + α)·log p(v) − α·Ĥ_1(v) ).

Cao, Valiant & Liang (arXiv 2511.11966, §5) note that their guarantee holds for any δ-accurate
future-entropy estimate, one-step lookahead included (with a weaker δ).

Spec: ``lookahead:alpha=A[,k=8,model=smollm2-135m]``. The decoder needs the model: it loads
``model`` (an embedded name or folder) on first use, or uses the one given to :meth:`bind`. It
keeps its own KV cache of every sequence, fed from ``input_ids``, so it needs them on every call.
α is fitted by :func:`fit_lookahead_alpha` (same convex human-log-loss fit as the calibrated one).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from entcal.calibrators.alpha import AlphaFit, fit_alpha
from entcal.calibrators.paper_formula import adjusted_logprobs, fill_phi
from entcal.decoding.base import Decoder, check_known, format_value, parse_float, parse_int
from entcal.decoding.ops import entropy_varentropy
from entcal.decoding.spec import register_method

__all__ = ["LookaheadDecoder", "fit_lookahead_alpha", "lookahead_entropy"]

_MODELS: dict[str, Any] = {}
_MAX_ROWS = 64  # sequences per extra forward pass (bounds the repeated cache's memory)


def _cache_rows(cache, rows: Tensor, repeats: int):
    """A new ``DynamicCache`` holding ``rows`` of ``cache``, each repeated ``repeats`` times."""
    from transformers.cache_utils import DynamicCache

    data = [
        (
            layer.keys.index_select(0, rows).repeat_interleave(repeats, 0),
            layer.values.index_select(0, rows).repeat_interleave(repeats, 0),
        )
        for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=data)


@torch.inference_mode()
def lookahead_entropy(
    model, cache, mask: Tensor, candidates: Tensor, max_rows: int = _MAX_ROWS
) -> Tensor:
    """``(N, K)``: exact next-step entropy after appending each candidate to each sequence.

    Args:
        cache: the ``DynamicCache`` of the ``N`` sequences (not modified).
        mask: ``(N, T)`` attention mask of what the cache holds (0 = left padding).
        candidates: ``(N, K)`` token ids.
    """
    n, k = candidates.shape
    out = torch.empty(n, k, dtype=torch.float32, device=candidates.device)
    per = max(1, max_rows // k)
    for s in range(0, n, per):
        rows = torch.arange(s, min(n, s + per), device=candidates.device)
        sub = _cache_rows(cache, rows, k)
        m = mask.index_select(0, rows).repeat_interleave(k, 0)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
        pos = (m.sum(-1, keepdim=True) - 1).clamp_min(0)
        tok = candidates.index_select(0, rows).reshape(-1, 1)
        logits = model(
            input_ids=tok, attention_mask=m, position_ids=pos, past_key_values=sub, use_cache=True
        ).logits[:, -1]
        ent, _ = entropy_varentropy(torch.log_softmax(logits.float(), -1), overwrite=True)
        out[rows] = ent.view(-1, k)
    return out


class LookaheadDecoder(Decoder):
    """One-step lookahead calibration (see the module docstring)."""

    requires_history: ClassVar[bool] = True
    requires_input_ids: ClassVar[bool] = True  # its KV cache is fed from the history
    OPTIONS = ("alpha", "k", "model")

    def __init__(self, alpha: float, k: int = 8, model: str = "smollm2-135m") -> None:
        self.alpha = parse_float("alpha", alpha, lo=-1.0, lo_open=True)
        self.k = parse_int("k", k, lo=1, range_text="an integer >= 1")
        self.model_name = str(model)
        self._model = None
        self.reset(0)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> LookaheadDecoder:
        check_known("lookahead", options, cls.OPTIONS)
        if "alpha" not in options:
            raise ValueError(
                "lookahead needs alpha (a number > -1), e.g. 'lookahead:alpha=0.2'; "
                "fit one with entcal.calibrators.lookahead.fit_lookahead_alpha"
            )
        return cls(options["alpha"], options.get("k", 8), options.get("model", "smollm2-135m"))

    @property
    def spec(self) -> str:
        parts = [f"alpha={format_value(self.alpha)}"]
        if self.k != 8:
            parts.append(f"k={self.k}")
        if self.model_name != "smollm2-135m":
            parts.append(f"model={self.model_name}")
        return "lookahead:" + ",".join(parts)

    def bind(self, model) -> LookaheadDecoder:
        """Use this model object for the lookahead passes (instead of loading ``model=``)."""
        self._model = model
        return self

    @property
    def model(self):
        if self._model is None:
            if self.model_name not in _MODELS:
                from entcal import models

                _MODELS[self.model_name] = models.load(self.model_name)[0]
            self._model = _MODELS[self.model_name]
        return self._model

    def reset(self, batch_size: int) -> None:
        self._cache = None
        self._mask: Tensor | None = None
        self._n = batch_size

    def _extend(self, input_ids: Tensor) -> None:
        """Feed the tokens of ``input_ids`` the cache does not hold yet."""
        model = self.model
        dev = next(model.parameters()).device
        input_ids = input_ids.to(dev)
        if self._cache is not None and self._mask is not None:
            have = self._mask.shape[1]
            if input_ids.shape[1] < have or input_ids.shape[0] != self._mask.shape[0]:
                self.reset(input_ids.shape[0])  # a new batch without reset()
        if self._cache is None:
            pad = getattr(model.config, "pad_token_id", None)
            if pad is None:
                mask = torch.ones_like(input_ids)
            else:  # left padding: the leading run of pad tokens
                mask = ((input_ids != pad).long().cumsum(-1) > 0).long()
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
            self._cache, self._mask = out.past_key_values, mask
            return
        new = input_ids[:, self._mask.shape[1] :]
        if new.shape[1] == 0:
            return
        mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1] :]
        out = model(
            input_ids=new,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache, self._mask = out.past_key_values, mask

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        if input_ids is None:
            raise ValueError("the lookahead decoder needs input_ids (the tokens so far)")
        with torch.inference_mode():
            self._extend(input_ids)
            lp = torch.log_softmax(logits.float(), -1)
            k = min(self.k, lp.shape[-1])
            cand = torch.topk(lp, k, dim=-1).indices
            assert self._mask is not None
            h = lookahead_entropy(self.model, self._cache, self._mask, cand.to(self._mask.device))
            h = h.to(lp.device)
            phi = fill_phi(lp, cand, torch.isfinite(lp.gather(-1, cand)), h)
            return adjusted_logprobs(lp, phi, self.alpha)


def _generator(seed: int, *parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + sum(p * 7919**i for i, p in enumerate(parts, 1)))
    return g


def _offsets(n_cont: int, k: int, gen: torch.Generator) -> list[int]:
    k = min(k, n_cont)
    return sorted(torch.randperm(n_cont, generator=gen)[:k].tolist(), reverse=True)


@torch.inference_mode()
def fit_lookahead_alpha(
    model,
    pairs,
    positions_per_pair: int = 32,
    k: int = 8,
    seed: int = 0,
    bucket_edges: tuple[int, ...] = (),
) -> AlphaFit:
    """Fit α of the lookahead decoder by minimizing human log loss at positions of ``pairs``."""
    from entcal.calibrators.montecarlo import expand_cache, hf_step_fn, rollout_entropy

    device = next(model.parameters()).device
    step = hf_step_fn(model)
    lps, phis, targets, positions = [], [], [], []
    for i, pair in enumerate(pairs):
        gen = _generator(seed, 77, i)
        ids = torch.tensor(list(pair.prompt_ids) + list(pair.continuation_ids), device=device)
        n_prompt = len(pair.prompt_ids)
        offs = _offsets(len(pair.continuation_ids), positions_per_pair, gen)
        out = model(input_ids=ids[None, : n_prompt + max(offs)], use_cache=True)
        all_lp = torch.log_softmax(out.logits[0].float(), -1)
        for o in offs:
            length = n_prompt + o
            lp = all_lp[length - 1]
            cand = torch.topk(lp, k).indices
            h = rollout_entropy(step, expand_cache(out.past_key_values, length, k), cand, 1)
            phis.append(
                fill_phi(lp[None], cand[None], torch.ones(1, k, dtype=torch.bool), h[None].float())
            )
            lps.append(lp[None])
            targets.append(int(ids[length]))
            positions.append(o)
    lp_all = torch.cat(lps)
    return fit_alpha(
        lp_all,
        torch.cat(phis),
        torch.tensor(targets, device=lp_all.device),
        torch.tensor(positions, device=lp_all.device),
        bucket_edges,
    )


register_method("lookahead", LookaheadDecoder.from_options)
