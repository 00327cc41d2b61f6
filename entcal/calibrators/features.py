"""Features of a candidate token that a logits processor can compute.

For a row (a prefix) with next-token log-probs ``log p`` and a candidate ``v``, the predictor of the
future entropy Ĥ(prefix, v) sees only:

* ``log p(v)``; the row's entropy ``H`` and varentropy ``V`` (from the raw logits row);
* ``log(1 + t)``, ``t`` the number of tokens generated so far (per-sequence state);
* ``table[v]``: a ``d``-dimensional PCA projection of the model's LM-head row of ``v``, fitted at
  training time and stored with the predictor (so vLLM needs no access to the weights);

plus products of these (the linear model needs them: terms constant over a row cancel in the
softmax, so only terms that vary with ``v`` shape p_α).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["candidate_features", "feature_names", "token_table"]

_SCALARS = ("logp", "logp2", "H", "V", "logpos", "logp*H", "logp*V", "logp*logpos", "H*logpos")


def feature_names(table_dim: int) -> list[str]:
    """Column names of :func:`candidate_features`, in order."""
    emb = [f"e{i}" for i in range(table_dim)]
    return [*_SCALARS, *emb, *(f"logp*{e}" for e in emb)]


def candidate_features(
    logprobs: Tensor,
    cand_ids: Tensor,
    position: Tensor,
    table: Tensor,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Features ``(N, M, F)`` of candidates ``cand_ids (N, M)`` of rows ``logprobs (N, V)``.

    Args:
        logprobs: normalized next-token log-probs of the raw model.
        cand_ids: candidate token ids per row.
        position: ``(N,)`` tokens generated before this row (0 for the first new token).
        table: ``(V, d)`` per-token projection (see :func:`token_table`).
        stats: precomputed ``(entropy, varentropy)`` of the rows, else computed here.
    """
    from entcal.calibrators.ops import entropy_stats

    ent, var = stats if stats is not None else entropy_stats(logprobs)
    lp = logprobs.gather(-1, cand_ids).clamp_min(-80.0)  # -inf would poison the products
    n, m = cand_ids.shape
    h = ent[:, None].expand(n, m)
    v = var[:, None].expand(n, m)
    lpos = torch.log1p(position.to(logprobs.dtype))[:, None].expand(n, m)
    emb = table[cand_ids].to(logprobs.dtype)  # (N, M, d)
    scalars = torch.stack([lp, lp * lp, h, v, lpos, lp * h, lp * v, lp * lpos, h * lpos], dim=-1)
    return torch.cat([scalars, emb, lp[..., None] * emb], dim=-1)


@torch.no_grad()
def token_table(lm_head: Tensor, dim: int = 8) -> Tensor:
    """Top-``dim`` principal components of the LM-head rows, standardized: ``(V, dim)`` float32.

    Signs are fixed (largest-magnitude loading positive) so the table is reproducible.
    """
    if not 1 <= dim <= min(lm_head.shape):
        raise ValueError(f"table dim must lie in [1, {min(lm_head.shape)}], got {dim}")
    w = lm_head.detach().float()
    centered = w - w.mean(0, keepdim=True)
    # Covariance of the hidden dims (small: hidden x hidden), then its top eigenvectors.
    cov = centered.T @ centered / max(1, w.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov.double())
    comps = vecs[:, -dim:].flip(-1).float()
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    proj = centered @ (comps * signs)
    return proj / proj.std(0, keepdim=True).clamp_min(1e-8)
