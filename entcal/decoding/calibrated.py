"""The calibrated decoder: future-entropy scaling with a learned predictor.

Rule (Cao, Valiant & Liang, "On the Entropy Calibration of Language Models", arXiv 2511.11966,
Eq. 9 of the NeurIPS version)::

    p_α(v) ∝ exp( (1 + α)·log p(v) − α·Ĥ(prefix, v) )

``Ĥ`` is a :class:`~entcal.calibrators.predictor.FutureEntropyPredictor` (trained by
``entcal train``), evaluated as torch tensors on the candidates that cover at least ``1 − 1e-4`` of
each row's mass; every other token gets the candidates' mass-weighted mean Ĥ. Nothing is
truncated: every token the model allows keeps a positive probability, so human text keeps a
finite log loss. α > 0 lowers the temperature and penalizes tokens that lead to high-entropy
continuations.

Spec: ``calibrated[:predictor=PATH,alpha=A]``

* ``predictor``: a folder written by ``entcal train`` (default: the predictor shipped for the
  embedded ``smollm2-135m``);
* ``alpha``: a number > −1, or ``fitted`` (default: the α the predictor was trained with, per
  position bucket or global as its training chose), ``global`` or ``buckets``.

The decoder is stateful (``requires_history``): it counts generated tokens per sequence
(``reset`` / ``observe``), the position feature and the α bucket. Call :meth:`bind` with the model
before generating to check the predictor was fitted for it (``entcal.generate`` and the adapters
do so where they hold the model).

Example::

    >>> from entcal.decoding import parse
    >>> d = parse("calibrated")                     # shipped SmolLM2 predictor, fitted α
    >>> d.bind(model)                               # PredictorFileError if fitted for another
    >>> d.reset(batch_size=4)
    >>> logits = d(raw_logits)                      # sample from softmax(logits)
    >>> d.observe(sampled_tokens)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from entcal.calibrators.predictor import FutureEntropyPredictor, shipped_predictor_path
from entcal.decoding.base import Decoder, check_known, format_value, parse_float
from entcal.decoding.spec import register_method

__all__ = ["CalibratedDecoder", "calibrated_logprobs", "load_predictor"]

_ALPHA_MODES = ("fitted", "global", "buckets")
_CACHE: dict[tuple[str, float], FutureEntropyPredictor] = {}
_LOCK = threading.Lock()


def load_predictor(path: str | Path | None = None) -> FutureEntropyPredictor:
    """Load (and cache, keyed by path and modification time) a predictor; ``None``: shipped one."""
    folder = Path(path).expanduser() if path is not None else shipped_predictor_path()
    if folder.name == "predictor.json":
        folder = folder.parent
    meta = folder / "predictor.json"
    key = (str(folder.resolve()), meta.stat().st_mtime if meta.exists() else -1.0)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = FutureEntropyPredictor.load(folder)
        return _CACHE[key]


def calibrated_logprobs(
    logits: Tensor,
    predictor: FutureEntropyPredictor,
    position: Tensor,
    alpha: Tensor | float,
) -> Tensor:
    """The application step as one batched op: ``log p_α`` of rows ``logits (N, V)``.

    Args:
        logits: raw next-token logits.
        predictor: the future-entropy predictor.
        position: ``(N,)`` generated-token index of each row.
        alpha: scalar or ``(N,)``.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return predictor.adjusted(logprobs, position, alpha)


class CalibratedDecoder(Decoder):
    """Future-entropy-calibrated sampling (see the module docstring for rule and spec)."""

    requires_history: ClassVar[bool] = True
    OPTIONS = ("predictor", "alpha")

    def __init__(self, predictor: str | Path | None = None, alpha: str | float = "fitted") -> None:
        self.predictor_path = None if predictor is None else str(predictor)
        self.predictor = load_predictor(predictor)
        if isinstance(alpha, str) and alpha.strip() in _ALPHA_MODES:
            self.alpha: str | float = alpha.strip()
        else:
            self.alpha = parse_float(
                "alpha", alpha, lo=-1.0, lo_open=True,
                range_text="a number > -1, or one of fitted, global, buckets",
            )  # fmt: skip
        info = self.predictor.meta_.get("alpha") or {}
        if self.alpha in ("global", "buckets", "fitted") and not info:
            raise ValueError(
                f"predictor {self.predictor_path or 'shipped'} stores no fitted alpha; "
                "pass alpha=NUMBER"
            )
        self.pos_: Tensor | None = None

    @classmethod
    def from_options(cls, options: dict[str, str]) -> CalibratedDecoder:
        check_known("calibrated", options, cls.OPTIONS)
        return cls(options.get("predictor"), options.get("alpha", "fitted"))

    @property
    def spec(self) -> str:
        parts = []
        if self.predictor_path is not None:
            parts.append(f"predictor={self.predictor_path}")
        if self.alpha != "fitted":
            a = self.alpha
            parts.append(f"alpha={a if isinstance(a, str) else format_value(a)}")
        return "calibrated" + (":" + ",".join(parts) if parts else "")

    def bind(self, model) -> CalibratedDecoder:
        """Check that the predictor was fitted for ``model`` (raises ``PredictorFileError``)."""
        self.predictor.check_model(model)
        return self

    # ---- state ------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.pos_ = torch.zeros(batch_size, dtype=torch.long)

    def observe(self, tokens: Tensor) -> None:
        if self.pos_ is not None:
            self.pos_ = self.pos_ + 1

    def _positions(self, n: int, device: torch.device) -> Tensor:
        if self.pos_ is None or self.pos_.shape[0] != n:
            self.reset(n)
        assert self.pos_ is not None
        self.pos_ = self.pos_.to(device)
        return self.pos_

    def alpha_rows(self, position: Tensor) -> Tensor:
        """α of each row at these positions."""
        if isinstance(self.alpha, float):
            return torch.full(position.shape, self.alpha, device=position.device)
        info = self.predictor.meta_["alpha"]
        mode = self.alpha
        if mode == "fitted":
            mode = info.get("default", "global")
        if mode == "global":
            return torch.full(position.shape, float(info["global"]), device=position.device)
        return self.predictor.alpha_for(position)

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        pos = self._positions(logits.shape[0], logits.device)
        return calibrated_logprobs(logits, self.predictor, pos, self.alpha_rows(pos))

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # Rows of different instances (vLLM: one per request) in one pass per distinct predictor.
        dev = logits.device
        n = logits.shape[0]
        rows_of: dict[int, list[int]] = {}
        insts: dict[int, CalibratedDecoder] = {}
        for i, d in enumerate(decoders):
            assert isinstance(d, CalibratedDecoder)
            insts.setdefault(id(d), d)
            rows_of.setdefault(id(d), []).append(i)
        pos = torch.empty(n, dtype=torch.long, device=dev)
        alpha = torch.empty(n, dtype=torch.float32, device=dev)
        by_pred: dict[int, list[int]] = {}
        for key, d in insts.items():
            idx = torch.tensor(rows_of[key], device=dev)
            p = d._positions(len(rows_of[key]), dev)
            pos.index_copy_(0, idx, p)
            alpha.index_copy_(0, idx, d.alpha_rows(p).float())
            by_pred.setdefault(id(d.predictor), []).extend(rows_of[key])
        if len(by_pred) == 1:
            return calibrated_logprobs(logits, decoders[0].predictor, pos, alpha)  # type: ignore[attr-defined]
        out = torch.empty_like(logits, dtype=torch.float32)
        preds = {id(d.predictor): d.predictor for d in insts.values()}
        for key, rows in by_pred.items():
            idx = torch.tensor(sorted(rows), device=dev)
            out.index_copy_(
                0,
                idx,
                calibrated_logprobs(logits.index_select(0, idx), preds[key], pos[idx], alpha[idx]),
            )
        return out


register_method("calibrated", CalibratedDecoder.from_options)
