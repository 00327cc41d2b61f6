"""Adapter for vLLM's Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor``).

Model Runner V2 (the default of GPU vLLM >= 0.32 for dense models) has its own interface: state
lives in *request slots* (``add_request(slot, params)`` (re)initializes a recycled slot), and
``apply(logits, ctx)`` gets the whole step with ``ctx.expanded_idx_mapping`` (logits row ->
slot; several rows per request under speculative decoding) and ``ctx.idx_mapping_np`` (batch
position -> slot, on the host). There are no moves to track. V2 calls custom processors after
bias, penalties and bad words and before temperature, min-p and top-k/top-p: the same raw-logits
position the V1 adapter asks for (see :mod:`entcal.decoding.vllm.processor`).

Register :class:`entcal.decoding.vllm.processor.EntcalLogitsProcessor`; it returns this adapter
when Model Runner V2 builds it.

Stateful decoders (mirostat) are told the token sampled from their previous distribution: at the
next step that token is the one fed to the model, ``ctx.input_ids[row]``, when the sequence grew by
exactly one token past the prompt (``ctx.seq_lens_upper_bound_np`` is exact without speculative
decoding). Under speculative decoding every draft row of a request uses the request's state as of
its last committed token.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from entcal.decoding.base import Decoder
from entcal.decoding.rows import apply_rows_at, log_failed_rows
from entcal.decoding.vllm.request import VLLMProcessor, new_request_decoder, validate_request

__all__ = ["EntcalV2LogitsProcessor"]

_log = logging.getLogger(__name__)


class EntcalV2LogitsProcessor(VLLMProcessor, LogitsProcessor):
    """entcal decoders chosen per request, in vLLM's Model Runner V2."""

    def __init__(
        self, vllm_config: Any, req_states: LogitsProcRequestState, *, active: bool = True
    ) -> None:
        self.active = active
        # the engine's Hugging Face config: model-aware decoders (calibrated) bind to it
        self.model_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        self.req_states = req_states
        self.device = torch.device(req_states.device)
        n = int(req_states.max_num_reqs)
        self._decoder: list[Decoder | None] = [None] * n  # by slot
        self._uses = np.zeros(n, dtype=bool)
        self._stateful = np.zeros(n, dtype=bool)
        # sequence length when the slot's decoder last produced a distribution (0: never)
        self._applied_len = np.zeros(n, dtype=np.int64)
        self._version = 0
        self._plan_key: tuple[int, bytes] | None = None
        self._plan: tuple[list[Decoder], torch.Tensor | None] = ([], None)
        self.failures = 0

    # ---- vLLM interface -------------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        decoder = new_request_decoder(sampling_params, self.model_config) if self.active else None
        self._decoder[req_idx] = decoder
        self._uses[req_idx] = decoder is not None
        self._stateful[req_idx] = decoder is not None and decoder.requires_history
        self._applied_len[req_idx] = 0
        self._version += 1
        return decoder is not None

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots_np = np.asarray(ctx.idx_mapping_np)
        if not self._uses[slots_np].any():
            return logits
        try:
            return self._apply(logits, ctx, slots_np)
        except Exception as exc:  # a whole-batch fault (not one row's): leave the rows untouched
            self.failures += 1
            _log.exception("entcal: processing a batch failed (%s); rows left untouched", exc)
            return logits

    # ---- internals ------------------------------------------------------------------------
    def _apply(self, logits: torch.Tensor, ctx: LogitsContext, slots_np: np.ndarray):
        expanded = logits.shape[0] != slots_np.shape[0]
        if expanded:  # speculative decoding: several rows per request (rare; one host copy)
            row_slots = ctx.expanded_idx_mapping.cpu().numpy()
        else:
            row_slots = slots_np
        key = (self._version, row_slots.tobytes())
        if key != self._plan_key:
            self._plan = self._make_plan(row_slots)
            self._plan_key = key
        decoders, rows = self._plan
        if not expanded and self._stateful[slots_np].any():
            self._observe(ctx, slots_np)
        out, failed = apply_rows_at(logits, rows, decoders)
        if failed:
            self._retire({int(row_slots[pos]): why for pos, why in failed.items()})
        return out

    def _retire(self, slots: dict[int, str]) -> None:
        """A request whose row failed is left raw from now on (its decoder missed a step)."""
        self.failures += 1
        log_failed_rows(_log, slots, "the row of request slot")
        for slot in slots:
            self._decoder[slot] = None
            self._uses[slot] = False
            self._stateful[slot] = False
        self._version += 1

    def _make_plan(self, row_slots: np.ndarray) -> tuple[list[Decoder], torch.Tensor | None]:
        """Per-row decoders for this row layout; rebuilt only when the layout or slots change."""
        uses = self._uses[row_slots]
        idx = np.flatnonzero(uses)
        decoders = [self._decoder[s] for s in row_slots[idx].tolist()]
        if idx.shape[0] == row_slots.shape[0]:
            return decoders, None  # type: ignore[return-value]
        return decoders, torch.as_tensor(idx, dtype=torch.long, device=self.device)  # type: ignore[return-value]

    def _observe(self, ctx: LogitsContext, slots_np: np.ndarray) -> None:
        seq_lens = np.asarray(ctx.seq_lens_upper_bound_np)[: slots_np.shape[0]]
        prompt_len = np.asarray(self.req_states.prompt_len.np)[slots_np]
        stateful = self._stateful[slots_np]
        applied = self._applied_len[slots_np]
        # the fed token was sampled from this slot's previous distribution
        grew = stateful & (applied > 0) & (seq_lens == applied + 1) & (seq_lens > prompt_len)
        for pos in np.flatnonzero(grew).tolist():
            decoder = self._decoder[int(slots_np[pos])]
            assert decoder is not None
            decoder.observe(ctx.input_ids[pos : pos + 1])
        self._applied_len[slots_np[stateful]] = seq_lens[stateful]
