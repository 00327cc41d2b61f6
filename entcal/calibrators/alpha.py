"""Fit α of the future-entropy-adjusted model by minimizing human log loss.

For held-out human tokens ``y`` at prefixes with raw log-probs ``log p`` and features
``φ(v) = log p(v) − Ĥ(v)``, the log loss of ``p_α ∝ exp(log p + α·φ)`` is

    L(α) = mean_i [ −log p_i(y_i) − α·φ_i(y_i) + logsumexp_v(log p_i(v) + α·φ_i(v)) ],

convex in α (Cao, Valiant & Liang, arXiv 2511.11966, Lemma A.2 and Algorithm 1):

    L'(α)  = mean_i [ E_{v~p_α}[φ_i(v)] − φ_i(y_i) ]     (moment matching of φ)
    L''(α) = mean_i Var_{v~p_α}(φ_i(v)) ≥ 0.

So a safeguarded 1-D Newton method (Newton steps inside a bracket that bisection shrinks) finds the
minimum. Positions can be split into buckets, each with its own α: the buckets share no rows, so
they are independent 1-D problems, solved together in one vectorized loop.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["AlphaFit", "bucket_index", "fit_alpha", "logloss_terms"]

ALPHA_MIN = -0.9  # p^(1+α): α must stay above −1
ALPHA_MAX = 10.0


def bucket_index(position: Tensor, edges: list[int] | tuple[int, ...]) -> Tensor:
    """Bucket of each position: bucket j holds ``edges[j-1] <= t < edges[j]`` (len(edges)+1 of them)."""
    if list(edges) != sorted(edges):
        raise ValueError(f"bucket edges must be increasing, got {list(edges)}")
    if not edges:
        return torch.zeros_like(position, dtype=torch.long)
    bounds = torch.tensor(list(edges), device=position.device, dtype=position.dtype)
    return torch.bucketize(position, bounds, right=True)


def logloss_terms(
    logprobs: Tensor, phi: Tensor, targets: Tensor, alpha: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row log loss of the target, its first and second derivative in α.

    Args:
        logprobs: ``(N, V)`` raw log-probs; ``phi``: ``(N, V)``; ``targets``: ``(N,)`` token ids;
        alpha: ``(N,)`` α of each row.
    """
    finite = torch.isfinite(logprobs)
    phi = torch.where(finite, phi, torch.zeros_like(phi))
    z = torch.where(finite, logprobs + alpha[:, None] * phi, logprobs)
    logq = torch.log_softmax(z, dim=-1)
    q = logq.exp()
    mean_phi = (q * phi).sum(-1)
    var_phi = (q * phi * phi).sum(-1) - mean_phi**2
    idx = targets[:, None]
    loss = -logq.gather(-1, idx)[:, 0]
    grad = mean_phi - phi.gather(-1, idx)[:, 0]
    return loss, grad, var_phi.clamp_min(0.0)


@dataclasses.dataclass
class AlphaFit:
    """Result of :func:`fit_alpha`: α per bucket and the log loss before and after (nats/token)."""

    alpha: list[float]
    bucket_edges: list[int]
    loss_at_zero: list[float]
    loss_at_alpha: list[float]
    gradient: list[float]
    counts: list[int]
    iterations: int

    def total_loss(self, at_alpha: bool = True) -> float:
        losses = self.loss_at_alpha if at_alpha else self.loss_at_zero
        n = sum(self.counts)
        return sum(loss * c for loss, c in zip(losses, self.counts)) / max(n, 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _bucket_sums(values: Tensor, buckets: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(
        0, buckets, values.double()
    )


def fit_alpha(
    logprobs: Tensor,
    phi: Tensor,
    targets: Tensor,
    position: Tensor | None = None,
    bucket_edges: list[int] | tuple[int, ...] = (),
    tol: float = 1e-7,
    max_iter: int = 60,
    chunk: int = 512,
) -> AlphaFit:
    """Minimize held-out human log loss over α (one α per position bucket).

    Args:
        logprobs: ``(N, V)`` raw log-probs at human prefixes.
        phi: ``(N, V)`` φ = log p − Ĥ (see ``FutureEntropyPredictor.phi``).
        targets: ``(N,)`` the human next tokens.
        position: ``(N,)`` generated-token index of each row (needed with ``bucket_edges``).
        bucket_edges: increasing position edges; empty for a single global α.
        tol: stop when every bucket's |L'(α)| is below this.
    """
    n_rows = logprobs.shape[0]
    if phi.shape != logprobs.shape or targets.shape != (n_rows,):
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, phi {tuple(phi.shape)} and targets "
            f"{tuple(targets.shape)} do not match"
        )
    if bucket_edges and position is None:
        raise ValueError("bucket_edges needs position")
    buckets = (
        bucket_index(position, bucket_edges)
        if bucket_edges
        else torch.zeros(n_rows, dtype=torch.long, device=logprobs.device)
    )
    nb = len(bucket_edges) + 1
    counts = torch.bincount(buckets, minlength=nb).double()
    denom = counts.clamp_min(1.0)

    def evaluate(alpha_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss = torch.zeros(nb, dtype=torch.float64, device=logprobs.device)
        grad = torch.zeros_like(loss)
        hess = torch.zeros_like(loss)
        for s in range(0, n_rows, chunk):
            sl = slice(s, s + chunk)
            b = buckets[sl]
            lo, g, h = logloss_terms(logprobs[sl], phi[sl], targets[sl], alpha_b[b].float())
            loss += _bucket_sums(lo, b, nb)
            grad += _bucket_sums(g, b, nb)
            hess += _bucket_sums(h, b, nb)
        return loss / denom, grad / denom, hess / denom

    alpha = torch.zeros(nb, dtype=torch.float64, device=logprobs.device)
    lo = torch.full_like(alpha, ALPHA_MIN)
    hi = torch.full_like(alpha, ALPHA_MAX)
    loss0, grad, hess = evaluate(alpha)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported)
        done = (grad.abs() < tol) | (counts == 0)
        if bool(done.all()):
            break
        # The derivative increases with α (convexity): its sign says which side the minimum is.
        hi = torch.where(grad > 0, torch.minimum(hi, alpha), hi)
        lo = torch.where(grad < 0, torch.maximum(lo, alpha), lo)
        newton = alpha - grad / hess.clamp_min(1e-12)
        inside = (newton > lo) & (newton < hi)
        step = torch.where(inside, newton, (lo + hi) / 2)
        alpha = torch.where(done, alpha, step)
        _, grad, hess = evaluate(alpha)
    loss_a, grad, _ = evaluate(alpha)
    return AlphaFit(
        alpha=[float(a) for a in alpha],
        bucket_edges=[int(e) for e in bucket_edges],
        loss_at_zero=[float(x) for x in loss0],
        loss_at_alpha=[float(x) for x in loss_a],
        gradient=[float(g) for g in grad],
        counts=[int(c) for c in counts],
        iterations=it,
    )
