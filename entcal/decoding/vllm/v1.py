"""Adapter for vLLM's V1 model runner (``vllm.v1.sample.logits_processor.LogitsProcessor``).

This is the interface vLLM uses on CPU and with ``VLLM_USE_V2_MODEL_RUNNER=0``. Register
:class:`entcal.decoding.vllm.processor.EntcalLogitsProcessor`, which builds this adapter when the
V1 runner asks; see that module for the per-request spec, the neutral vLLM fields and where in
the sampler the decoder runs.

Bookkeeping follows vLLM's ``BatchUpdate`` semantics (``vllm/v1/sample/logits_processor/
interface.py``): the persistent batch changes between steps by *removed* rows, *added* rows
``(index, params, prompt_ids, output_ids)`` (``output_ids`` is the request's live, growing list),
and *moved* rows ``(a, b, UNIDIRECTIONAL)`` (a's request goes to b, a is emptied) or
``(a, b, SWAP)``; they are processed in the order removed, added, moved. :class:`RowTable` keeps
``row -> entry`` for the rows that carry an entcal spec and a version counter, so the per-row
decoder list handed to :func:`entcal.decoding.apply_rows` is rebuilt only when the batch changes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from entcal.decoding.base import Decoder
from entcal.decoding.rows import apply_rows_at, log_failed_rows
from entcal.decoding.vllm.request import VLLMProcessor, new_request_decoder, validate_request

__all__ = ["EntcalV1LogitsProcessor", "RowEntry", "RowTable"]

_log = logging.getLogger(__name__)

T = TypeVar("T")


class RowTable(Generic[T]):
    """``batch row -> entry`` under vLLM's V1 ``BatchUpdate`` semantics.

    ``make_entry(params, prompt_ids, output_ids)`` builds the entry of an added request, or
    returns ``None`` for a request this processor leaves alone. ``version`` increases whenever
    the mapping or the batch size changes.
    """

    def __init__(self, make_entry: Callable[[Any, list[int] | None, list[int]], T | None]):
        self.make_entry = make_entry
        self.entries: dict[int, T] = {}
        self.batch_size = 0
        self.version = 0

    def update(self, batch_update: BatchUpdate | None) -> bool:
        """Apply one step's changes; returns whether anything changed."""
        if batch_update is None:
            return False
        entries = self.entries
        changed = batch_update.batch_size != self.batch_size
        for index in batch_update.removed:
            changed |= self._drop(entries.pop(index, None)) is not None
        for index, params, prompt_ids, output_ids in batch_update.added:
            # An added request may replace whatever still sat at its index.
            old = entries.pop(index, None)
            self._drop(old)
            entry = self.make_entry(params, prompt_ids, output_ids)
            if entry is not None:
                entries[index] = entry
            changed |= old is not None or entry is not None
        for a, b, direction in batch_update.moved:
            ea = entries.pop(a, None)
            eb = entries.pop(b, None)
            if ea is not None:
                entries[b] = ea
            if eb is not None:
                if direction == MoveDirectionality.SWAP:
                    entries[a] = eb
                else:  # a -> b overwrote b's request
                    self._drop(eb)
            changed |= ea is not None or eb is not None
        self.batch_size = batch_update.batch_size
        if changed:
            self.version += 1
        return changed

    def _drop(self, entry: T | None) -> T | None:
        """Hook for an entry leaving the batch (the processor parks stateful ones)."""
        return entry


@dataclass
class RowEntry:
    """One request's row state: its decoder and, for stateful decoders, the live output list."""

    decoder: Decoder
    output_ids: list[int]
    stateful: bool
    # len(output_ids) when the decoder last produced a distribution for this request (-1: never)
    seen: int = -1


class _Table(RowTable[RowEntry]):
    """RowTable that remembers stateful decoders of removed rows by their output list.

    A preempted request leaves the batch and later comes back as a new "added" row carrying the
    same ``output_ids`` list object; its mirostat state is restored instead of restarted.
    """

    PARK_LIMIT = 1024

    def __init__(self, make_entry):
        super().__init__(make_entry)
        self.parked: OrderedDict[int, RowEntry] = OrderedDict()

    def _drop(self, entry):
        if entry is not None and entry.stateful:
            self.parked[id(entry.output_ids)] = entry
            while len(self.parked) > self.PARK_LIMIT:
                self.parked.popitem(last=False)
        return entry

    def unpark(self, output_ids: list[int]) -> RowEntry | None:
        entry = self.parked.pop(id(output_ids), None)
        # the entry holds its list, so the id cannot have been reused by another list
        return entry if entry is not None and entry.output_ids is output_ids else None


class EntcalV1LogitsProcessor(VLLMProcessor, LogitsProcessor):
    """entcal decoders chosen per request, in vLLM's V1 model runner.

    Each step, rows whose request carries ``extra_args["entcal"]`` are processed together by one
    :func:`entcal.decoding.apply_rows` call (one vectorized pass per decoder kind); other rows are
    left exactly as they are. Stateful decoders (mirostat) are told the token sampled from their
    previous distribution, read from the request's live output list, before each step.
    """

    def __init__(
        self,
        vllm_config: Any,
        device: torch.device,
        is_pin_memory: bool,
        *,
        active: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.active = active
        # the engine's Hugging Face config: model-aware decoders (calibrated) bind to it
        self.model_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        self.table = _Table(self._new_entry)
        self._plan_version = -1
        self._rows: torch.Tensor | None = None  # entcal rows, or None when every row is
        self._decoders: list[Decoder] = []
        self._stateful: list[RowEntry] = []
        self._warned_placeholder = False
        self.failures = 0  # steps whose processing raised (logged; rows left untouched)

    # ---- vLLM interface -------------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        validate_request(sampling_params)

    def is_argmax_invariant(self) -> bool:
        # False: run on the raw float32 logits, before penalties and vLLM's temperature/min_p,
        # and on all-greedy batches too. See entcal.decoding.vllm.processor.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.active:
            self.table.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.table.entries:
            return logits
        try:
            return self._apply(logits)
        except Exception as exc:  # a whole-batch fault (not one row's): leave the rows untouched
            self.failures += 1
            _log.exception("entcal: processing a batch failed (%s); rows left untouched", exc)
            return logits

    # ---- internals ------------------------------------------------------------------------
    def _new_entry(self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]):
        parked = self.table.unpark(output_ids)
        if parked is not None:
            return parked
        decoder = new_request_decoder(params, self.model_config)
        if decoder is None:
            return None
        stateful = decoder.requires_history
        if stateful and prompt_ids:
            decoder.prime([prompt_ids])  # context-reading decoders (DRY) start from the prompt
        return RowEntry(decoder, output_ids, stateful)

    def _plan(self, n_rows: int) -> None:
        """Rebuild the per-row decoder list after a batch change (not on every step)."""
        idx = sorted(i for i in self.table.entries if i < n_rows)
        entries = [self.table.entries[i] for i in idx]
        self._decoders = [e.decoder for e in entries]
        self._stateful = [e for e in entries if e.stateful]
        if len(idx) == n_rows:
            self._rows = None
        else:
            self._rows = torch.tensor(idx, dtype=torch.long, device=self.device)
        self._plan_version = self.table.version

    def _observe(self) -> None:
        """Feed each stateful decoder the token sampled from its previous distribution."""
        for entry in self._stateful:
            out = entry.output_ids
            n = len(out)
            if 0 <= entry.seen < n:
                token = out[entry.seen]
                if token >= 0:
                    entry.decoder.observe(torch.tensor([token], device=self.device))
                elif not self._warned_placeholder:
                    self._warned_placeholder = True
                    _log.warning(
                        "entcal: output token ids hold async-scheduling placeholders; stateful "
                        "decoders skip those steps. Register entcal's processor explicitly "
                        "(logits_processors=[...]) so vLLM fills in the real ids."
                    )
            entry.seen = n

    def _apply(self, logits: torch.Tensor) -> torch.Tensor:
        n_rows = logits.shape[0]
        if self._plan_version != self.table.version or (
            self._rows is None and len(self._decoders) != n_rows
        ):
            self._plan(n_rows)
        if not self._decoders:
            return logits
        if self._stateful:
            self._observe()
        out, failed = apply_rows_at(logits, self._rows, self._decoders)
        if failed:
            self._retire(failed)
        return out

    def _retire(self, rows: dict[int, str]) -> None:
        """A request whose row failed is left raw from now on (its decoder missed a step)."""
        self.failures += 1
        log_failed_rows(_log, rows, "batch row")
        for row in rows:
            self.table.entries.pop(row, None)
        self.table.version += 1
