"""The simplest calibrator: one global temperature τ with zero entropy calibration error.

EntCE(τ) = (mean entropy of generations sampled at τ) − (mean human log loss under softmax(z/τ)),
token-weighted over fixed-length continuations of human prompts (Cao, Valiant & Liang,
arXiv 2511.11966, §4.3: lowering τ trades log loss for calibration). EntCE increases with τ, so
its root is found by a bracketing secant search (Illinois variant of regula falsi), each evaluation
one batch of generations with the same seed (common random numbers keep the curve smooth).

The human log loss at any τ costs no generation: the human continuations' logits are computed
once and rescaled.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["TemperatureFit", "fit_temperature"]


@dataclasses.dataclass
class TemperatureFit:
    """``tau`` with ``entce`` at it; ``evaluations``: (τ, gen entropy, human log loss, EntCE)."""

    tau: float
    entce: float
    evaluations: list[tuple[float, float, float, float]]

    @property
    def spec(self) -> str:
        return f"temperature={self.tau:.4g}"


@torch.inference_mode()
def _human_logits(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    logits, targets = [], []
    for pair in pairs:
        ids = torch.tensor(list(pair.prompt_ids) + list(pair.continuation_ids), device=device)
        n_prompt = len(pair.prompt_ids)
        out = model(input_ids=ids[None, :-1]).logits[0, n_prompt - 1 :].float()
        logits.append(out.to(torch.bfloat16))  # memory: Gemma's vocabulary is 262144
        targets.append(ids[n_prompt:])
    return torch.stack(logits), torch.stack(targets)


def _human_logloss(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> float:
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        lp = torch.log_softmax(logits[i].float() / tau, -1)
        total += float(-lp.gather(-1, targets[i][:, None]).sum())
        count += targets.shape[1]
    return total / count


def fit_temperature(
    model,
    tokenizer,
    pairs,
    length: int | None = None,
    seed: int = 0,
    lo: float = 0.5,
    hi: float = 1.2,
    tol: float = 0.01,
    max_evals: int = 8,
    batch_size: int | None = None,
) -> TemperatureFit:
    """Find τ with EntCE(τ) ≈ 0 on ``pairs`` (prompts + human continuations).

    Args:
        length: generated tokens per prompt (default: the continuations' length).
        lo, hi: the bracket searched (EntCE(lo) < 0 < EntCE(hi) is checked).
        tol: stop when |EntCE| < tol nats/token.
    """
    from entcal.generation import generate

    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    logits, targets = _human_logits(model, pairs)
    length = length or targets.shape[1]
    prompts = [list(p.prompt_ids) for p in pairs]
    evals: list[tuple[float, float, float, float]] = []

    def entce(tau: float) -> float:
        gens = generate(
            model, tokenizer, prompts, decoder=f"temperature={tau!r}", max_new_tokens=length,
            seed=seed, batch_size=batch_size,
        )  # fmt: skip
        h = float(torch.cat([g.entropy for g in gens]).double().mean())
        loss = _human_logloss(logits, targets[:, :length], tau)
        evals.append((tau, h, loss, h - loss))
        return h - loss

    f_lo, f_hi = entce(lo), entce(hi)
    if not f_lo < 0 < f_hi:
        raise ValueError(
            f"EntCE does not change sign on [{lo}, {hi}] (EntCE {f_lo:.3f}, {f_hi:.3f}); widen it"
        )
    side = 0
    for _ in range(max_evals - 2):
        tau = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        f = entce(tau)
        if abs(f) < tol:
            break
        if f < 0:
            lo, f_lo = tau, f
            if side == -1:
                f_hi /= 2  # Illinois: keep the stale end from stalling the secant
            side = -1
        else:
            hi, f_hi = tau, f
            if side == 1:
                f_lo /= 2
            side = 1
    # The evaluated τ closest to calibration (the curve is noisy: no extrapolation).
    best = min(evals, key=lambda e: abs(e[3]))
    return TemperatureFit(tau=float(best[0]), entce=float(best[3]), evaluations=evals)
