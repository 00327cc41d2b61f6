"""The ``calibrated`` decoder: sharpen the next-token distribution where the generation derails.

Rule (per sequence and step ``t``)::

    D̂_t = FutureEntropyPredictor(state_t)            # excess future entropy rate, nats/token
    s_t = D̂_t + λ · max(0, ℓ − r_t)                  # lifted if the text started low
    α_t = α_0 + g_b(t) · max(0, s_t − c)               # base α_0; the gate: threshold c,
    p_t(v) ∝ p(v)^(1 + α_t)                            # strength g_b of t's position bucket b

(``r_t``: the text's early level of ``D̂``; ``ℓ``: a low quantile of the same over the training
domain's human texts; ``λ``: the lift, 0 unless fitted; :mod:`entcal.calibrators.derailment`.)

This is the future-entropy-scaled model of Cao, Valiant & Liang ("On the Entropy Calibration of
Language Models", arXiv 2511.11966, Eq. 9 of the NeurIPS version),
``p_α(v) ∝ exp((1 + α_t)·log p(v) − α_t·Ĥ(prefix, v))``, with the scale ``α_t`` a function of the
generation's state instead of a constant per step: a small constant ``α_0`` (their global
calibration, a temperature ``1/(1 + α_0)``) for what no state reveals, such as the offset of the
first steps before any history exists, plus a gated part that grows where the generation
derails. The per-candidate term ``Ĥ(prefix, v)`` is left out: with state-dependent α it did not
lower the log-loss cost at equal calibration (docs/results/calibrated-design.md). Human text seldom
reaches states where ``s_t > c``, so beyond the base's mild temperature its log loss changes
little (more on human text that opens low and changes register, which the lift reads as a shifted
domain: docs/results/calibrated-design.md §6); a sampled generation that starts to derail is pulled back, so its entropy stays at the
human level instead of drifting up. Nothing is truncated: every token the model allows keeps a
positive probability.

The per-row math (``D̂`` from the predictor's exported weights, ``α``, the sharpening) lives in the
pure functions of :mod:`entcal.calibrators.derailment`; this module holds the per-sequence state
and the choice of predictor and gate.

The base ``α_0``, the strengths ``g_b`` and the threshold ``c`` are fitted by ``entcal train`` so
that entropy calibration error (EntCE) is 0 in every position bucket on the training split's own
generations, at the lowest human log-loss cost (:mod:`entcal.calibrators.strength`), and stored with the
predictor.

Spec: ``calibrated[:predictor=PATH,scale=S,strength=G,threshold=C,base=A,warmup=K,lift=L]``

* ``predictor``: a folder written by ``entcal train`` (default: the predictor shipped for the
  model the decoder is bound to; unbound, the shipped one whose vocabulary matches the logits);
* ``scale`` (``≥ 0``, default 1): multiplies the whole ``α_t``, base and strengths (0 is the
  raw model; the ``entcal frontier`` sweep);
* ``strength`` (``≥ 0``): one strength for every bucket instead of the fitted ones;
* ``threshold`` (nats/token): instead of the fitted one;
* ``base`` (``≥ 0``): ``α_0`` instead of the fitted one (0 = the gate alone);
* ``warmup`` (integer ``≥ 0``): the gate stays closed for the first ``K`` generated steps
  (``α_t = α_0`` there), whose state has too little history to be read, instead of the
  predictor's (0 in files written before it existed);
* ``lift`` (``λ`` in ``[0, 1]``): how much of a text's shortfall below the human level ``ℓ`` is
  added to ``D̂`` (:func:`~entcal.calibrators.derailment.lifted_excess`; its early level ``r_t``
  is the mean ``D̂`` of its first 16 steps after the warm-up), instead of the predictor's (0 in
  files written before it existed). Needs a predictor whose gate records ``ℓ``
  (``reference_level``, written by ``entcal train --lift``), else ``ValueError``.

The decoder is stateful (``requires_history``): per sequence it keeps the moving averages of
:mod:`entcal.calibrators.state`, fed by ``reset``/``observe`` (transformers' ``generate`` through
:mod:`entcal.decoding.hf`, vLLM through its adapters, teacher-forced scoring alike). It sees only
the logits rows of generated steps, never the prompt's, so a spec gives the same distribution in
transformers and in vLLM.

Example::

    >>> import torch
    >>> from entcal import models
    >>> from entcal.decoding import parse
    >>> model, tok = models.load("smollm2-135m")
    >>> d = parse("calibrated").bind(model)   # PredictorFileError if none fits this model
    >>> d.reset(batch_size=1)
    >>> raw = model(torch.tensor([tok("The capital of France is").input_ids])).logits[:, -1]
    >>> out = d(raw)                          # [1, 49152]: sample from softmax(out)
    >>> g, c, base = d.gate()                 # no derailment yet: α = α_0, the base alone
    >>> torch.allclose(out.log_softmax(-1), ((1 + base) * raw.log_softmax(-1)).log_softmax(-1))
    True
    >>> d.observe(out.argmax(-1))             # the sampled tokens [N] advance the state
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from entcal.calibrators.derailment import (
    gate_alpha,
    lifted_excess,
    log_softmax_keep_dead,
    sharpen,
    step_strength,
)
from entcal.calibrators.predictor import FutureEntropyPredictor
from entcal.calibrators.predictor_file import shipped_predictor_for
from entcal.calibrators.state import StateTracker, step_stats
from entcal.decoding.base import (
    Decoder,
    check_known,
    format_value,
    instance_rows,
    parse_float,
    parse_int,
)
from entcal.decoding.spec import register_method

__all__ = ["CalibratedDecoder", "load_predictor"]

_IN_MEMORY = "<in memory>"
_CACHE: dict[tuple[str, float], FutureEntropyPredictor] = {}
_LOCK = threading.Lock()


def load_predictor(path: str | Path) -> FutureEntropyPredictor:
    """Load (and cache, keyed by path and modification time) a predictor folder."""
    folder = Path(path).expanduser()
    if folder.name == "predictor.json":
        folder = folder.parent
    meta = folder / "predictor.json"
    key = (str(folder.resolve()), meta.stat().st_mtime if meta.exists() else -1.0)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = FutureEntropyPredictor.load(folder)
        return _CACHE[key]


@dataclasses.dataclass(frozen=True)
class _GateTensors:
    """One decoder instance's gate on a device: ``strength (B,)``, ``edges (B − 1,)`` long, and
    0-d ``threshold``, ``base``, ``warmup`` (long), ``lift``, ``level``."""

    strength: Tensor
    threshold: Tensor
    base: Tensor
    edges: Tensor
    warmup: Tensor
    lift: Tensor
    level: Tensor


class CalibratedDecoder(Decoder):
    """Gated future-entropy-calibrated sampling (see the module docstring for rule and spec)."""

    requires_history: ClassVar[bool] = True
    OPTIONS = ("predictor", "scale", "strength", "threshold", "base", "warmup", "lift")

    def __init__(
        self,
        predictor: str | Path | None = None,
        strength: float | str | None = None,
        threshold: float | str | None = None,
        scale: float | str = 1.0,
        base: float | str | None = None,
        warmup: int | str | None = None,
        lift: float | str | None = None,
    ) -> None:
        self.lift = None if lift is None else parse_float("lift", lift, lo=0.0, hi=1.0)
        self.warmup = (
            None
            if warmup is None
            else parse_int("warmup", warmup, lo=0, range_text="an integer >= 0")
        )
        self.strength = None if strength is None else parse_float("strength", strength, lo=0.0)
        self.base = None if base is None else parse_float("base", base, lo=0.0)
        self.threshold = None if threshold is None else parse_float("threshold", threshold)
        self.scale = parse_float("scale", scale, lo=0.0)
        self.predictor_path = None if predictor is None else str(predictor)
        # A named predictor is loaded (and checked) now: a bad file fails before any step.
        self._predictor = None if predictor is None else load_predictor(predictor)
        self.tracker: StateTracker | None = None
        self._strengths: list[float] | None = None
        self._reference_level: float | None = None  # (training: the gate's ℓ before it is saved)
        if self._predictor is not None:
            self.lift_weights()  # (and a lift it cannot serve: ValueError at parse, not at a step)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> CalibratedDecoder:
        check_known("calibrated", options, cls.OPTIONS)
        return cls(
            options.get("predictor"), options.get("strength"), options.get("threshold"),
            options.get("scale", 1.0), options.get("base"), options.get("warmup"),
            options.get("lift"),
        )  # fmt: skip

    @classmethod
    def from_predictor(
        cls,
        predictor: FutureEntropyPredictor,
        strength: Sequence[float] | None = None,
        threshold: float | None = None,
        base: float | None = None,
        warmup: int | None = None,
        lift: float | None = None,
        reference_level: float | None = None,
    ) -> CalibratedDecoder:
        """A decoder over an in-memory predictor (training), optionally with another gate: one
        strength per position bucket of the predictor's ``bucket_edges``, a threshold, a base, a
        warm-up, a lift and its human reference level. Its
        spec records the gate (so decoders with different gates differ) but does not parse back:
        no file."""
        n_buckets = len(predictor.gate_["bucket_edges"]) + 1
        if strength is not None:
            strength = [float(g) for g in strength]
            if len(strength) != n_buckets or not all(math.isfinite(g) and g >= 0 for g in strength):
                raise ValueError(
                    f"strength needs {n_buckets} finite values >= 0 (one per position bucket), "
                    f"got {strength}"
                )
        self = cls(warmup=warmup, lift=lift)
        if reference_level is not None:
            reference_level = parse_float("reference_level", reference_level)
        self._predictor = predictor
        self._reference_level = reference_level
        self._strengths = strength
        self.threshold = None if threshold is None else parse_float("threshold", threshold)
        self.base = None if base is None else parse_float("base", base, lo=0.0)
        self.predictor_path = _IN_MEMORY
        return self

    @property
    def spec(self) -> str:
        parts = []
        if self.predictor_path is not None:
            parts.append(f"predictor={self.predictor_path}")
        if self._strengths is not None:
            parts.append("strengths=" + "/".join(format_value(g) for g in self._strengths))
        if self.scale != 1.0:
            parts.append(f"scale={format_value(self.scale)}")
        for key, value in (
            ("strength", self.strength), ("threshold", self.threshold), ("base", self.base),
            ("warmup", self.warmup), ("lift", self.lift), ("level", self._reference_level),
        ):  # fmt: skip
            if value is not None:
                parts.append(f"{key}={format_value(value)}")
        return "calibrated" + (":" + ",".join(parts) if parts else "")

    def cache_key(self) -> str:
        """The spec plus a digest of the bound predictor: its file's JSON (the tensors' SHA-256,
        standardization, horizon, features; not the training report) and its gate."""
        pred = self._predictor
        if pred is None:
            return self.spec
        meta = getattr(pred, "meta_", {})
        content = {k: v for k, v in meta.items() if k not in ("report", "scores")}
        content["gate"] = pred.gate_
        blob = json.dumps(content, sort_keys=True, default=float).encode()
        return f"{self.spec}#{hashlib.sha256(blob).hexdigest()[:16]}"

    # ---- the predictor ------------------------------------------------------------------------
    def bind(self, model) -> CalibratedDecoder:
        """Use the predictor fitted for ``model`` (a model or its config): the shipped one if no
        ``predictor=`` was given, else check that the given one fits. Raises
        :class:`~entcal.calibrators.predictor_file.PredictorFileError` if none does. Binding
        again to the same model is a no-op (``compare`` binds before generating, so a mismatch
        fails before any work, and ``generate`` binds whatever it is given)."""
        bound = getattr(self, "_bound_to", None)
        if self._predictor is not None and bound is not None and bound() is model:
            return self
        if self.predictor_path is None:
            self._predictor = load_predictor(shipped_predictor_for(model))
        else:
            assert self._predictor is not None
        self._predictor.check_model(model)  # type: ignore[union-attr]
        self.lift_weights()  # a lift the predictor cannot serve fails now, not at a step
        try:  # a weak reference: a decoder kept around must not keep the model alive
            self._bound_to = weakref.ref(model)
        except TypeError:  # not weakly referenceable: check again next time
            self._bound_to = None
        return self

    def predictor_for(self, vocab_size: int) -> FutureEntropyPredictor:
        """The predictor (resolved by vocabulary size if the decoder was never bound)."""
        if self._predictor is None:
            self._predictor = load_predictor(shipped_predictor_for(vocab_size=vocab_size))
        pred = self._predictor
        if pred.vocab_size is not None and pred.vocab_size != vocab_size:
            raise ValueError(
                f"logits have {vocab_size} columns but the predictor "
                f"{getattr(pred, 'path_', '')} was fitted for a vocabulary of {pred.vocab_size} "
                f"(model {pred.meta_.get('fingerprint', {}).get('name')!r})"
            )
        return pred

    def gate(self) -> tuple[list[float], float, float]:
        """``(strength per bucket, threshold, base)`` in use: the spec's, else the predictor's
        (strengths and base multiplied by ``scale``)."""
        assert self._predictor is not None
        fitted = self._predictor.gate_
        g = getattr(self, "_strengths", None) or fitted["strength"]
        if self.strength is not None:
            g = [self.strength] * len(fitted["strength"])
        c = fitted["threshold"] if self.threshold is None else self.threshold
        base = fitted.get("base", 0.0) if self.base is None else self.base
        return [x * self.scale for x in g], c, base * self.scale

    def warmup_steps(self) -> int:
        """Generated steps at the start whose gate stays closed: the spec's, else the
        predictor's."""
        if self.warmup is not None:
            return self.warmup
        assert self._predictor is not None
        return int(self._predictor.gate_.get("warmup", 0))

    def lift_weights(self) -> tuple[float, float]:
        """``(λ, ℓ)``: the lift (the spec's, else the predictor's) and the human reference level
        it lifts to (nats/token: the one given to :meth:`from_predictor`, else the predictor's
        gate's ``reference_level``; 0 when ``λ = 0``). Raises ``ValueError`` for a lift over a
        predictor that records no reference level."""
        assert self._predictor is not None
        gate = self._predictor.gate_
        lift = float(gate.get("lift", 0.0)) if self.lift is None else self.lift
        level = self._reference_level
        if level is None:
            level = gate.get("reference_level")
        if lift == 0.0:
            return 0.0, 0.0
        if level is None:
            raise ValueError(
                f"calibrated: lift={format_value(lift)} needs the human reference level of the "
                f"predictor's gate (reference_level), which {getattr(self._predictor, 'path_', 'this predictor')} "
                "does not record (fit one with 'entcal train --gate-of PREDICTOR --lift L')"
            )
        return lift, float(level)

    # ---- state --------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.tracker = None
        self._gate_cache = None

    def observe(self, tokens: Tensor) -> None:
        if self.tracker is not None:
            self.tracker.commit()

    def _tracker(self, pred: FutureEntropyPredictor, n: int, device: torch.device) -> StateTracker:
        tr = self.tracker
        if tr is not None and tr.batch_size != n and bool((tr.count > 0).any()):
            raise ValueError(
                f"calibrated: got {n} rows, but the decoder's state holds {tr.batch_size} "
                "sequences in progress; call reset(batch_size) before a new generation"
            )
        if tr is None or tr.batch_size != n:
            tr = StateTracker(pred.projection_.dim)
            tr.reset(n, device)
            self.tracker = tr
        tr.to(device)
        return tr

    def _gate_tensors(self, pred: FutureEntropyPredictor, device: torch.device) -> _GateTensors:
        """This instance's gate as tensors on ``device``, built once per predictor and device (a
        step reads them without a host-to-device copy)."""
        cache = getattr(self, "_gate_cache", None)
        if cache is None or cache[0] is not pred or cache[1] != device:
            g, c, base = self.gate()
            lift, level = self.lift_weights()

            def scalar(x: float, dtype=torch.float32) -> Tensor:
                return torch.tensor(x, dtype=dtype, device=device)

            gate = _GateTensors(
                strength=torch.tensor(g, dtype=torch.float32, device=device),
                threshold=scalar(c),
                base=scalar(base),
                edges=torch.tensor(pred.gate_["bucket_edges"], dtype=torch.long, device=device),
                warmup=scalar(self.warmup_steps(), torch.long),
                lift=scalar(lift),
                level=scalar(level),
            )
            cache = (pred, device, gate)
            self._gate_cache = cache
        return cache[2]

    # ---- the step -----------------------------------------------------------------------------
    def _alpha(self, lp: Tensor, logits: Tensor) -> Tensor:
        """``α_t (N,)`` of this instance's rows (advancing the per-sequence reference as a step
        does); ``lp``: their log-probabilities, ``logits``: the rows as given."""
        n, vocab = logits.shape
        pred = self.predictor_for(vocab)
        tracker = self._tracker(pred, n, logits.device)
        feats = tracker.features(step_stats(lp, pred.projection_on(logits.device)))
        gate = self._gate_tensors(pred, logits.device)
        g = step_strength(gate.strength, tracker.count, gate.edges, gate.warmup)
        derail, share = lifted_excess(
            pred.predict_tensor(feats), tracker.count, tracker.reference_sum, gate.warmup,
            gate.lift, gate.level,
        )  # fmt: skip
        tracker.add_reference(share)
        return gate_alpha(derail, g, gate.threshold, gate.base)

    @classmethod
    def alphas(cls, decoders: Sequence[Decoder], lp: Tensor, logits: Tensor) -> Tensor:
        """``α_t (N,)`` for the rows of a mixed batch, row ``i`` by ``decoders[i]``, each instance
        advancing its own sequences' state (what a step does, without the sharpening:
        ``anchored`` caps its own α with it). ``lp``: the rows' log-probabilities ``(N, V)``."""
        first = decoders[0]
        if all(d is first for d in decoders):
            # one instance, all rows: no grouping (the common case in transformers' generate)
            assert isinstance(first, CalibratedDecoder)
            return first._alpha(lp, logits)
        n, vocab = logits.shape
        dev = logits.device
        instances = instance_rows(decoders)  # [(instance, its rows)]
        rows_of = {id(d): rows for d, rows in instances}
        by_pred: dict[int, list[CalibratedDecoder]] = {}
        for d, _ in instances:
            assert isinstance(d, CalibratedDecoder)
            by_pred.setdefault(id(d.predictor_for(vocab)), []).append(d)
        alpha = torch.empty(n, dtype=torch.float32, device=dev)
        for group in by_pred.values():
            pred = group[0].predictor_for(vocab)
            idx = [i for d in group for i in rows_of[id(d)]]
            sel = torch.tensor(idx, device=dev)
            rows = lp.index_select(0, sel)
            stats = step_stats(rows, pred.projection_on(dev))
            trackers = [d._tracker(pred, len(rows_of[id(d)]), dev) for d in group]
            feats, count, reference = StateTracker.stacked_features(trackers, stats)
            # per instance: its gate (strengths per bucket, threshold, base, warm-up, lift);
            # per row: its instance's
            gates = [d._gate_tensors(pred, dev) for d in group]
            owner = torch.repeat_interleave(
                torch.arange(len(group), device=dev),
                torch.tensor([len(rows_of[id(d)]) for d in group], device=dev),
            )

            def per_row(field: str, gates=gates, owner=owner) -> Tensor:
                return torch.stack([getattr(g, field) for g in gates])[owner]

            warm = per_row("warmup")
            g = step_strength(per_row("strength"), count, gates[0].edges, warm)
            derail, share = lifted_excess(
                pred.predict_tensor(feats), count, reference, warm, per_row("lift"),
                per_row("level"),
            )  # fmt: skip
            StateTracker.add_stacked_reference(trackers, share)
            a = gate_alpha(derail, g, per_row("threshold"), per_row("base"))
            alpha.index_copy_(0, sel, a)
        return alpha

    def _process(self, logits: Tensor, input_ids: Tensor | None) -> Tensor:
        lp = log_softmax_keep_dead(logits)
        return sharpen(lp, self._alpha(lp, logits), out=lp)  # lp is this call's own tensor

    @classmethod
    def _apply_group(
        cls, decoders: Sequence[Decoder], logits: Tensor, input_ids: Tensor | None
    ) -> Tensor:
        # Rows of several instances (vLLM: one per request) in one pass per predictor: their
        # states are stacked, processed together, and each instance keeps its rows' stats.
        lp = log_softmax_keep_dead(logits)
        return sharpen(lp, cls.alphas(decoders, lp, logits), out=lp)


register_method("calibrated", CalibratedDecoder.from_options)
