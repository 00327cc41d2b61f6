"""Sampling-time math of the ``calibrated`` decoder: predicted derailment, gate, sharpening.

Pure batched tensor functions (no model, no state, no Python loop over rows), in the style of
:mod:`entcal.decoding.ops`, over the weights a fitted
:class:`~entcal.calibrators.predictor.FutureEntropyPredictor` exports. Per sequence and step ``t``::

    D̂_t = ((x_t − m) / σ_x) · W · σ_y + μ_y        # excess future entropy rate, nats/token
    s_t = D̂_t + λ · max(0, ℓ − r_t)                 # the lift of a text that starts low
    α_t = α_0 + g · max(0, s_t − c)                 # base α_0; the gate: strength g, threshold c
    log p_t(v) ← (1 + α_t) · log p(v)               # logits of p^(1 + α_t)

``x_t`` are the state features of :mod:`entcal.calibrators.state`, ``(m, σ_x)`` and ``(μ_y, σ_y)``
the standardization of features and labels learned by ``fit``, ``W`` the ridge map (or the
one-hidden-layer MLP ``relu(x·W0 + b0)·w1 + b1``).

``r_t`` is the text's early level: the mean of ``D̂`` over its first :data:`REFERENCE_WINDOW` steps
after the warm-up (over those seen so far, the current one included, while inside them); ``ℓ``
(``reference_level``) a low quantile (``entcal train --lift-quantile``, 0.25) of the same over the
human texts the gate was fitted on, measured with the gate's own warm-up; ``λ`` (``lift``, 0
in files written before it existed) the weight of the lift. The predictor's level shifts from one
kind of text to another (on Jane Austen's prose human text sits about 0.5 nats/token below the
Python documentation it was fitted on, and derailed generations there stay under the threshold),
so a text that starts below the training domain's human level is read as shifted by that
shortfall. The lift is one-sided: a text that starts high (perhaps derailing early) is read as
before, and on the training domain the score stays ``D̂`` itself except for the quarter of its
human texts that start below ``ℓ``.

``D̂`` predicts how far the mean entropy of
the next steps will exceed the model's log loss on human text (Cao, Valiant & Liang, "On the
Entropy Calibration of Language Models", arXiv 2511.11966, §4: sampled text drifts to higher
entropy as it grows); the sharpening is their future-entropy-scaled model (Eq. 9 of the NeurIPS
version) without the per-candidate term, which lives in :mod:`entcal.calibrators.paper_formula`.

Example::

    >>> import torch
    >>> w = {"coef": torch.tensor([2.0, 0.0]), "intercept": torch.tensor([1.0])}
    >>> folded = fold_standardization(w, torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]))
    >>> d = excess_entropy_rate(torch.tensor([[3.0, 5.0], [1.0, 5.0]]), folded, 0.5, 2.0)
    >>> d                                         # ((3 − 1)/2·2 + 1)·2 + 0.5, (0·2 + 1)·2 + 0.5
    tensor([6.5000, 2.5000])
    >>> alpha = gate_alpha(d, 0.5, threshold=3.0)
    >>> alpha
    tensor([1.7500, 0.0000])
    >>> sharpen(torch.tensor([[-0.5, -1.0], [-0.5, -1.0]]), alpha)   # row 2: α = 0, unchanged
    tensor([[-1.3750, -2.7500],
            [-0.5000, -1.0000]])
    >>> gate_alpha(d, 0.5, threshold=3.0, base=0.25)   # a base sharpens every row a little
    tensor([2.0000, 0.2500])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "REFERENCE_WINDOW",
    "early_level_along",
    "excess_entropy_rate",
    "fold_standardization",
    "gate_alpha",
    "lifted_excess",
    "lifted_excess_along",
    "log_softmax_keep_dead",
    "sharpen",
    "step_strength",
    "weights_kind",
]

#: Names of the exported weights of each kind of predictor (``FutureEntropyPredictor.weights_``).
WEIGHT_NAMES = {"ridge": ("coef", "intercept"), "mlp": ("w0", "b0", "w1", "b1")}


def weights_kind(weights: Mapping[str, Tensor]) -> str:
    """``"ridge"`` or ``"mlp"``, from the names in ``weights``; ``ValueError`` if neither."""
    for kind, names in WEIGHT_NAMES.items():
        if all(n in weights for n in names):
            return kind
    raise ValueError(
        f"predictor weights must hold {WEIGHT_NAMES['ridge']} (ridge) or "
        f"{WEIGHT_NAMES['mlp']} (MLP), got {sorted(weights)}"
    )


def fold_standardization(
    weights: Mapping[str, Tensor], x_mean: Tensor, x_scale: Tensor
) -> dict[str, Tensor]:
    """The same map on raw features: the feature standardization folded into the first layer.

    ``(x − m)/s · W + b = x · (W/s) + (b − (m/s) · W)``, so applying the result to raw features
    ``x`` equals applying ``weights`` to standardized ones. ``weights``: ridge ``coef (F,)``,
    ``intercept (1,)`` or MLP ``w0 (F, H)``, ``b0 (H,)``, ``w1 (H,)``, ``b1 (1,)``; ``x_mean``,
    ``x_scale``: ``(F,)`` (``x_scale > 0``), on the weights' device. Returns a new dict (the
    other entries as given). Raises ``ValueError`` for weights of neither kind.
    """
    ridge = weights_kind(weights) == "ridge"
    first, bias = ("coef", "intercept") if ridge else ("w0", "b0")
    out = dict(weights)
    inv = 1.0 / x_scale
    w = out[first] * (inv if out[first].ndim == 1 else inv[:, None])
    out[bias] = out[bias] - (x_mean @ w if w.ndim == 2 else (x_mean * w).sum().reshape(1))
    out[first] = w
    return out


def excess_entropy_rate(
    features: Tensor, weights: Mapping[str, Tensor], y_mean: float, y_scale: float
) -> Tensor:
    """Predicted excess future entropy rate ``D̂`` (nats/token) of each row of state features.

    ``D̂ = f(x)·σ_y + μ_y`` with ``f(x) = x·coef + intercept`` (ridge) or
    ``relu(x·w0 + b0)·w1 + b1`` (MLP), ``weights`` already folded by
    :func:`fold_standardization` and on ``features``' device. ``features``: ``(..., F)`` (cast
    to float32); returns ``(...)`` float32. Raises ``ValueError`` for weights of neither kind.
    """
    x = features.float()
    if weights_kind(weights) == "ridge":
        out = x @ weights["coef"] + weights["intercept"]
    else:
        out = torch.relu(x @ weights["w0"] + weights["b0"]) @ weights["w1"] + weights["b1"]
    return out * y_scale + y_mean


def step_strength(
    strengths: Tensor, steps: Tensor, edges: Tensor, warmup: Tensor | int = 0
) -> Tensor:
    """``g_b(t)``: the strength of each step's position bucket, 0 during the warm-up.

    ``strengths``: ``(B,)`` one per bucket, or ``(N, B)`` a table per row (instances of a mixed
    batch); ``steps``: ``(N,)`` generated steps so far; ``edges``: ``(B − 1,)`` increasing bucket
    edges (step ``t`` is in bucket ``b`` when ``edges[b − 1] ≤ t < edges[b]``); ``warmup``: a
    number or ``(N,)``, the steps at the start whose gate stays closed. Returns ``(N,)``.
    """
    bucket = torch.bucketize(steps, edges, right=True)
    if strengths.dim() == 1:
        g = strengths[bucket]
    else:
        g = strengths.gather(1, bucket[:, None])[:, 0]
    return torch.where(steps < warmup, 0.0, g)


#: Steps after the warm-up whose mean ``D̂`` is a text's early level ``r_t``.
REFERENCE_WINDOW = 16


def _in_reference_window(steps: Tensor, warmup: Tensor | int) -> Tensor:
    """Whether each step lies in ``[warmup, warmup + REFERENCE_WINDOW)``."""
    return (steps >= warmup) & (steps < warmup + REFERENCE_WINDOW)


def lifted_excess(
    derail: Tensor,
    steps: Tensor,
    reference_sum: Tensor,
    warmup: Tensor | int,
    lift: Tensor | float,
    level: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """``(D̂_t + λ·max(0, ℓ − r_t), this step's share of r_t)`` for one step of ``N`` sequences.

    ``derail``: ``(N,)`` ``D̂_t`` (nats/token); ``steps``: ``(N,)`` generated steps so far;
    ``reference_sum``: ``(N,)`` the sum of ``D̂`` over the earlier steps of the reference window
    ``[warmup, warmup + REFERENCE_WINDOW)``; ``warmup``, ``lift`` (``λ``) and ``level`` (``ℓ``,
    the human reference level, nats/token): numbers or ``(N,)``. ``r_t`` is the mean ``D̂`` over
    the window's steps up to ``t``; before the window there is none, and no lift. The second
    result is what to add to ``reference_sum`` once the step is committed (``D̂_t`` inside the
    window, else 0). Agrees with :func:`lifted_excess_along` step by step.
    """
    inside = _in_reference_window(steps, warmup)
    share = torch.where(inside, derail, 0.0)
    seen = (steps - warmup).clamp(0, REFERENCE_WINDOW) + inside.long()
    early = (reference_sum + share) / seen.clamp_min(1)
    shortfall = torch.where(seen > 0, (level - early).clamp_min(0.0), 0.0)
    return derail + lift * shortfall, share


def early_level_along(derail: Tensor, warmup: int) -> Tensor:
    """``r_t (N, T)`` (nats/token) along whole sequences ``derail (N, T)``: the mean ``D̂`` over
    the reference window's steps up to ``t`` (NaN before the window)."""
    steps = torch.arange(derail.shape[1], device=derail.device)
    inside = _in_reference_window(steps, warmup)
    sums = torch.cumsum(torch.where(inside, derail, 0.0), dim=1)
    seen = torch.cumsum(inside.long(), dim=0)
    return torch.where(seen > 0, sums / seen.clamp_min(1), float("nan"))


def lifted_excess_along(derail: Tensor, warmup: int, lift: float, level: float) -> Tensor:
    """``D̂_t + λ·max(0, ℓ − r_t)`` ``(N, T)`` (nats/token) along whole sequences ``derail (N, T)``
    (training, diagnostics): what :func:`lifted_excess` gives at each step."""
    shortfall = (level - early_level_along(derail, warmup)).clamp_min(0.0).nan_to_num(0.0)
    return derail + lift * shortfall


def log_softmax_keep_dead(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last dimension that leaves all-``-inf`` rows all ``-inf`` (not
    NaN)."""
    lp = torch.log_softmax(logits, dim=-1)
    dead = logits.amax(-1) == float("-inf")
    return torch.where(dead[:, None], logits, lp) if bool(dead.any()) else lp


def gate_alpha(
    derail: Tensor,
    strength: Tensor | float,
    threshold: Tensor | float,
    base: Tensor | float = 0.0,
) -> Tensor:
    """``α = base + strength · max(0, derail − threshold)`` per row.

    ``derail``: ``(N,)`` predicted excess future entropy rate ``D̂`` (nats/token); ``strength``
    (``≥ 0``), ``threshold`` (nats/token) and ``base`` (``≥ 0``, the constant α of Cao et al.'s
    global calibration, a temperature ``1/(1 + base)``): scalars or ``(N,)`` per row. Returns
    ``(N,)``.
    """
    # a closed gate (excess 0) under an infinite strength is 0·inf = NaN: closed means 0
    alpha = ((derail - threshold).clamp_min(0.0) * strength).nan_to_num(0.0, float("inf"))
    return alpha + base if isinstance(base, Tensor) or base != 0.0 else alpha


#: Above this α a row is sharpened as ``(1 + α)·(log p − max log p)``: the same distribution,
#: but ``(1 + α)·log p`` of the top token could overflow to ``-inf`` and empty the row.
_SHIFT_ABOVE = 1e3


def sharpen(logprobs: Tensor, alpha: Tensor, out: Tensor | None = None) -> Tensor:
    """``(1 + α)·log p`` per row: logits of ``p^(1+α)`` (``-inf`` stays ``-inf``; α ≥ 0).

    ``logprobs``: ``(N, V)`` normalized log-probabilities; ``alpha``: ``(N,)`` (NaN counts as 0).
    ``out`` (may be ``logprobs`` itself) receives the result. For very large α (a huge
    ``strength``) the row's top token is kept at 0 instead, so the result is finite or ``-inf``
    and never empty: ``α -> ∞`` is greedy decoding.
    """
    finfo = torch.finfo(logprobs.dtype)
    scale = (1.0 + alpha.nan_to_num(nan=0.0).clamp(0.0, finfo.max / 4))[:, None]
    if bool((alpha > _SHIFT_ABOVE).any()):
        top = logprobs.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return torch.mul(logprobs - top, scale, out=out)
    return torch.mul(logprobs, scale, out=out)
