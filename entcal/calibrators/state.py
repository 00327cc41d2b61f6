"""The state of a generation, as batched tensors: what the calibrated decoder knows at each step.

A logits processor sees one logits row per sequence and step, in transformers' ``generate`` and in
vLLM alike (vLLM shows it no prompt logits). From the rows it has seen, the state keeps per
sequence:

* the raw next-token entropy ``H_t`` and its reference level ``ref_t``, the mean of the first
  :data:`REFERENCE_STEPS` generated steps (the first one is the model's entropy at the end of the
  human prompt; a level that both runtimes can compute);
* exponential moving averages (EMAs, windows :data:`WINDOWS`) of ``H_t`` and of ``z_t``, a
  low-dimensional projection of the model's final hidden state. ``z_t`` is read back from the
  logits row: logits are ``W h`` with ``W`` the LM head, so ``h`` is the least-squares solution
  on a fixed subset of token columns (:class:`HiddenProjection`), exact to float32 rounding.

The features of a row (:func:`feature_names`) are then the entropy and its EMAs relative to the
reference, and the EMAs of ``z``. The position is left out: the decoder's strength depends on the
position bucket instead (:mod:`entcal.calibrators.strength`), and with it the predictor gated
late human-like states more often at the same calibration. They are computed by the same code at sampling time
(:class:`StateTracker`, one row per sequence) and at training time (:func:`sequence_features`,
whole ``[N, T]`` sequences), so what the predictor was fitted on is exactly what it sees.

Why these features (measured on SmolLM2-135M, docs/results/calibrated-design.md): the absolute
entropy level separates derailed rollout states from human states within one corpus (AUROC 0.93)
but not across corpora (human text of another domain sits at the level of derailed pydoc text);
the hidden-state EMAs separate them within pydoc (AUROC 0.96) and carry over to prose the
predictor never saw.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "REFERENCE_STEPS",
    "WINDOWS",
    "HiddenProjection",
    "StateTracker",
    "StepStats",
    "feature_names",
    "row_entropy",
    "sequence_features",
    "state_features",
    "step_stats",
]

#: EMA windows (steps): decay ``1 − 1/w``, bias-corrected so early steps average what was seen.
WINDOWS = (16, 64)
#: The reference level is the mean raw entropy of the first this many generated steps.
REFERENCE_STEPS = 8


@dataclasses.dataclass
class HiddenProjection:
    """``z = matrix · (lp[tokens] − mean(lp[tokens])) − offset``: ``(r,)`` standardized principal
    components of the final hidden state, read from a log-prob (or logit) row.

    Subtracting the row mean removes the log-normalizer (and any constant shift of the logits),
    so ``z`` is the same for raw logits and log-probs.

    Attributes:
        tokens: ``(S,)`` long, the token columns used (S ≥ hidden size).
        matrix: ``(r, S)`` float32.
        offset: ``(r,)`` float32.
    """

    tokens: Tensor
    matrix: Tensor
    offset: Tensor

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def to(self, device: torch.device | str) -> HiddenProjection:
        return HiddenProjection(
            self.tokens.to(device), self.matrix.to(device), self.offset.to(device)
        )

    def __call__(self, logprobs: Tensor) -> Tensor:
        """``(N, r)`` projections of rows ``logprobs (N, V)``.

        Masked (``-inf``) columns are replaced by the row's smallest finite value (an
        approximation, only for rows under constraints); an all-``-inf`` row gives ``-offset``.
        """
        cols = logprobs.index_select(-1, self.tokens)
        finite = torch.isfinite(cols)
        if not bool(finite.all()):
            low = torch.where(finite, cols, torch.inf).amin(-1, keepdim=True)
            low = torch.where(torch.isfinite(low), low, 0.0)
            cols = torch.where(finite, cols, low)
        cols = cols - cols.mean(-1, keepdim=True)
        return cols @ self.matrix.T - self.offset

    @classmethod
    @torch.no_grad()
    def fit(
        cls, lm_head: Tensor, hidden: Tensor, dim: int = 32, n_tokens: int = 2048
    ) -> HiddenProjection:
        """Fit from the LM head ``(V, d)`` and sample final hidden states ``(n, d)``.

        The principal axes of ``hidden`` (centred), scaled to unit variance, composed with the
        least-squares inverse of the row-centred LM head on ``n_tokens`` evenly spaced columns.
        Signs are fixed (largest loading positive), so the same inputs give the same table.
        """
        w = lm_head.detach().double()
        vocab, d = w.shape
        if not 1 <= dim <= d:
            raise ValueError(f"projection dim must lie in [1, {d}], got {dim}")
        n_tokens = min(max(n_tokens, d), vocab)
        tokens = torch.linspace(0, vocab - 1, n_tokens, dtype=torch.float64).round().long()
        tokens = torch.unique(tokens)
        ws = w[tokens]
        inverse = torch.linalg.pinv(ws - ws.mean(0))  # (d, S): h from centred log-prob columns
        h = hidden.detach().double().reshape(-1, d)
        mean = h.mean(0)
        _, s, vt = torch.linalg.svd(h - mean, full_matrices=False)
        axes = vt[:dim]  # (r, d)
        signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
        scale = (s[:dim] / math.sqrt(max(1, h.shape[0] - 1))).clamp_min(1e-8)
        axes = axes * signs / scale[:, None]
        # The centred columns recover h only up to its component that the centring removes (the
        # mean LM-head row direction); fit the offset on the recovered states, not on h itself.
        matrix = axes @ inverse
        cols = h @ ws.T
        recovered = (cols - cols.mean(-1, keepdim=True)) @ matrix.T
        offset = recovered.mean(0)
        return cls(tokens, matrix.float(), offset.float())


@dataclasses.dataclass
class StepStats:
    """Per-row statistics of one step's raw distribution: entropy ``(N,)`` (nats) and the hidden
    projection ``z (N, r)``."""

    entropy: Tensor
    z: Tensor


def row_entropy(logprobs: Tensor) -> Tensor:
    """``(N,)`` entropy (nats) of normalized rows ``logprobs (N, V)`` (``-inf`` allowed)."""
    plogp = logprobs.exp().mul_(logprobs)  # in place: one [N, V] buffer
    # masked tokens give 0·(-inf) = NaN, which nansum skips: they contribute 0
    return -plogp.nansum(-1)


def step_stats(logprobs: Tensor, projection: HiddenProjection) -> StepStats:
    """:class:`StepStats` of normalized rows ``logprobs (N, V)`` (float32; ``-inf`` allowed)."""
    return StepStats(row_entropy(logprobs), projection(logprobs))


def feature_names(dim: int) -> list[str]:
    """Names of the state features, in order, for a projection of ``dim`` components."""
    names = ["entropy-ref", *(f"ema{w}-ref" for w in WINDOWS)]
    for w in WINDOWS:
        names += [f"z{i}_ema{w}" for i in range(dim)]
    return names


def _decays(device) -> Tensor:
    return torch.tensor([1.0 - 1.0 / w for w in WINDOWS], dtype=torch.float32, device=device)


def state_features(count: Tensor, sums: Tensor, first: Tensor, stats: StepStats) -> Tensor:
    """``(N, F)`` features of the current step from a committed state (``count`` steps seen,
    EMA sums ``sums (N, len(WINDOWS), 1 + r)``, ``first`` the sum of the first entropies)."""
    decay = _decays(sums.device)  # (W,)
    n = count.to(torch.float32)[:, None]
    # bias correction: weights of the count+1 values in the EMA sum to (1 − d^(count+1))/(1 − d)
    norm = (1.0 - decay ** (n + 1.0)) / (1.0 - decay)  # (N, W)
    x = torch.cat([stats.entropy[:, None], stats.z], dim=-1)  # (N, 1 + r)
    ema = (decay[None, :, None] * sums + x[:, None, :]) / norm[..., None]  # (N, W, 1 + r)
    seen = (count < REFERENCE_STEPS).to(torch.float32)
    ref = (first + seen * stats.entropy) / torch.clamp(count + 1, max=REFERENCE_STEPS).float()
    ent_rel = torch.cat([stats.entropy[:, None], ema[:, :, 0]], dim=-1) - ref[:, None]
    return torch.cat([ent_rel, ema[:, :, 1:].flatten(1)], dim=-1)


def _advance(
    count: Tensor, sums: Tensor, first: Tensor, stats: StepStats
) -> tuple[Tensor, Tensor, Tensor]:
    decay = _decays(sums.device)
    x = torch.cat([stats.entropy[:, None], stats.z], dim=-1)
    sums = decay[None, :, None] * sums + x[:, None, :]
    first = first + (count < REFERENCE_STEPS).to(torch.float32) * stats.entropy
    return count + 1, sums, first


class StateTracker:
    """The state of ``N`` sequences: ``reset``, then per step ``features(stats)`` and, once the
    step's token is known, ``commit()`` (the stats of the last ``features`` call are committed).

    Beside the features' state it keeps a per-sequence sum, ``reference_sum`` ``(N,)``, of values
    its user adds per step with :meth:`add_reference` (committed with the step): the calibrated
    decoder's early level of ``D̂`` (:func:`entcal.calibrators.derailment.lifted_excess`).

    Calling ``features`` again before ``commit`` recomputes from the same committed state, so a
    step is counted once however often its row is processed. A commit is applied lazily, when the
    state is next read, so that :meth:`stacked_features` can apply the commits of many trackers
    (vLLM: one per request) in one batched update.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.reset(0)

    def reset(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        w = len(WINDOWS)
        self._count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._sums = torch.zeros(batch_size, w, 1 + self.dim, dtype=torch.float32, device=device)
        self._first = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self._reference = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self._pending: StepStats | None = None
        self._pending_reference: Tensor | None = None
        self._due = False

    # the committed state (steps seen, EMA sums, sum of the first entropies)
    @property
    def count(self) -> Tensor:
        self._settle()
        return self._count

    @property
    def sums(self) -> Tensor:
        self._settle()
        return self._sums

    @property
    def first(self) -> Tensor:
        self._settle()
        return self._first

    @property
    def reference_sum(self) -> Tensor:
        """``(N,)`` float32: the sum of the values committed by :meth:`add_reference`."""
        self._settle()
        return self._reference

    @property
    def batch_size(self) -> int:
        return int(self._count.shape[0])

    def to(self, device: torch.device) -> None:
        if self._count.device != device:
            self._settle()
            self._count, self._sums, self._first, self._reference = (
                t.to(device) for t in (self._count, self._sums, self._first, self._reference)
            )

    def features(self, stats: StepStats) -> Tensor:
        """``(N, F)`` features of this step; remembers ``stats`` for :meth:`commit`."""
        self._settle()
        self._pending = stats
        self._pending_reference = None
        return state_features(self._count, self._sums, self._first, stats)

    def add_reference(self, values: Tensor) -> None:
        """``(N,)`` values to add to :attr:`reference_sum` when this step is committed (replacing
        any given earlier for the same step)."""
        self._pending_reference = values

    def commit(self) -> None:
        """Advance every row past the step whose stats were last given to :meth:`features`."""
        if self._pending is not None:
            self._due = True

    def _settle(self) -> None:
        if self._due:
            assert self._pending is not None
            self._count, self._sums, self._first = _advance(
                self._count, self._sums, self._first, self._pending
            )
            if self._pending_reference is not None:
                self._reference = self._reference + self._pending_reference
            self._pending = None
            self._pending_reference = None
            self._due = False

    @staticmethod
    def stacked_features(
        trackers: Sequence[StateTracker], stats: StepStats
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Features of several trackers' rows (stacked in order) from one stats batch:
        ``(features (N, F), steps seen (N,), reference sums (N,))``. Their due commits are
        applied in one batched update, and each tracker keeps its slice of the new state and of
        ``stats`` (give the step's reference values with :meth:`add_stacked_reference`)."""
        sizes = [t.batch_size for t in trackers]
        count = torch.cat([t._count for t in trackers])
        sums = torch.cat([t._sums for t in trackers])
        first = torch.cat([t._first for t in trackers])
        reference = torch.cat(
            [
                t._reference + t._pending_reference
                if t._due and t._pending_reference is not None
                else t._reference
                for t in trackers
            ]
        )
        if any(t._due for t in trackers):
            # the not-due rows advance by placeholder stats, then keep their old state
            parts, start = [], 0
            for t, n in zip(trackers, sizes):
                src = (
                    t._pending
                    if t._due
                    else StepStats(stats.entropy[start : start + n], stats.z[start : start + n])
                )
                parts.append(src)
                start += n
            due = torch.repeat_interleave(
                torch.tensor([t._due for t in trackers], device=count.device),
                torch.tensor(sizes, device=count.device),
            )
            pend = StepStats(torch.cat([p.entropy for p in parts]), torch.cat([p.z for p in parts]))
            new_count, new_sums, new_first = _advance(count, sums, first, pend)
            count = torch.where(due, new_count, count)
            sums = torch.where(due[:, None, None], new_sums, sums)
            first = torch.where(due, new_first, first)
        feats = state_features(count, sums, first, stats)
        start = 0
        for t, n in zip(trackers, sizes):
            rows = slice(start, start + n)
            t._count, t._sums, t._first = count[rows], sums[rows], first[rows]
            t._reference = reference[rows]
            t._pending = StepStats(stats.entropy[rows], stats.z[rows])
            t._pending_reference = None
            t._due = False
            start += n
        return feats, count, reference

    @staticmethod
    def add_stacked_reference(trackers: Sequence[StateTracker], values: Tensor) -> None:
        """:meth:`add_reference` for trackers whose rows are stacked in order in ``values``."""
        start = 0
        for t in trackers:
            n = t.batch_size
            t.add_reference(values[start : start + n])
            start += n


def sequence_features(entropy: Tensor, z: Tensor) -> Tensor:
    """``(N, T, F)`` features of every step of whole sequences (training time).

    ``entropy (N, T)`` and ``z (N, T, r)`` are the per-step statistics of the raw distributions
    along the sequences (teacher forced); step ``t``'s features are what :class:`StateTracker`
    gives after ``t`` committed steps.
    """
    n, t_len = entropy.shape
    tracker = StateTracker(z.shape[-1])
    tracker.reset(n, entropy.device)
    out = torch.empty(n, t_len, len(feature_names(z.shape[-1])), dtype=torch.float32)
    for t in range(t_len):
        stats = StepStats(entropy[:, t].float(), z[:, t].float())
        out[:, t] = tracker.features(stats).cpu()
        tracker.commit()
    return out
