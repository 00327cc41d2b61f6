"""How teacher-forced scoring runs a causal LM: the prompt once per row batch, the continuation on
its KV cache, and the output embedding applied window by window (so a 262k vocabulary never
materialises ``[B·T, V]``), checked once against the model's own logits with a full-forward
fallback."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ModelRunner", "logit_windows", "vocab_size"]


class ModelRunner:
    """Runs a causal LM on (prompt, continuation) batches, yielding logits window by window.

    Fast path: the body (``get_decoder()``) gives final hidden states, the output embedding is
    applied per window. It is checked once against the model's own logits (a model that
    transforms its logits in a way not reproduced here falls back). Fallback: the full model is
    run window by window on the KV cache.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.config = model.config
        self.vocab_size = None
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.head = (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        )
        try:
            self.body = model.get_decoder()
        except Exception:  # a model with no decoder lookup: use the full forward
            self.body = None
        if self.body is model:
            self.body = None
        self.fast = self.head is not None and self.body is not None
        self.checked = False
        pad = getattr(self.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

    def head_logits(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def prompt(self, ids: Tensor, mask: Tensor, pos: Tensor, keep: int = 1):
        """Run the prompts; return ``(cache, last_output, tail)``: the hidden state or logits of
        the last prompt position, and, when ``keep > 1``, those of the last ``keep`` positions
        ``[N, min(T, keep), ·]`` (else None); :meth:`to_logits` turns either into logits."""
        if self.fast:
            out = self.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            hidden = out.last_hidden_state
            last = hidden[:, -1]
            if not self.checked:
                self._check(ids, mask, pos, last)
            if self.fast:
                return out.past_key_values, last, hidden[:, -keep:] if keep > 1 else None
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=max(1, keep),
        )
        tail = out.logits[:, -keep:].float() if keep > 1 else None
        return out.past_key_values, out.logits[:, -1].float(), tail

    def _check(self, ids: Tensor, mask: Tensor, pos: Tensor, last: Tensor) -> None:
        self.checked = True
        ref = (
            self.model(
                input_ids=ids[:1], attention_mask=mask[:1], position_ids=pos[:1], use_cache=False
            )
            .logits[:, -1]
            .float()
        )
        ours = self.head_logits(last[:1])
        scale = ref.abs().max().clamp_min(1.0)
        if ours.shape != ref.shape or not ((ours - ref).abs().max() / scale < 1e-3):
            self.fast = False

    def continuation(self, cache, ids: Tensor, mask: Tensor, pos: Tensor, window: int):
        """Yield ``(start, outputs)`` for position windows of the continuation; outputs are hidden
        states (fast path, ``[b, w, H]``) or logits (``[b, w, V]``)."""
        if self.fast:
            out = self.body(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state
            for s in range(0, ids.shape[1], window):
                yield s, hidden[:, s : s + window]
            return
        prompt_len = mask.shape[1] - ids.shape[1]
        for s in range(0, ids.shape[1], window):
            e = min(ids.shape[1], s + window)
            out = self.model(
                input_ids=ids[:, s:e],
                attention_mask=mask[:, : prompt_len + e],
                position_ids=pos[:, s:e],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            yield s, out.logits.float()

    def to_logits(self, outputs: Tensor) -> Tensor:
        return self.head_logits(outputs) if self.fast else outputs


# --------------------------------------------------------------------------- scoring


def logit_windows(runner: ModelRunner, cache, last, inputs, mask, pos, window: int, width: int):
    """Yield ``(t0, outputs)`` over continuation steps: step 0 (from the prompt pass), then
    windows ``[1 + k·window, ...)``. Outputs are hidden states on the fast path, else logits;
    both runners of a Binoculars pair yield the same boundaries."""
    yield 0, last[:, None]
    if width == 1:
        return
    if runner.fast:
        for _, hidden in runner.continuation(cache, inputs, mask, pos, inputs.shape[1]):
            for s in range(0, hidden.shape[1], window):
                yield 1 + s, hidden[:, s : s + window]
        return
    for s, logits in runner.continuation(cache, inputs, mask, pos, window):
        yield 1 + s, logits


def vocab_size(runner: ModelRunner, last: Tensor) -> int:
    """The vocabulary of the runner's distributions (its output embedding's rows)."""
    if runner.fast:
        return (
            int(runner.head.weight.shape[0])
            if hasattr(runner.head, "weight")
            else int(runner.config.vocab_size)
        )
    return int(last.shape[-1])
