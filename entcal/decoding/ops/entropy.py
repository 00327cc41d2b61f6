"""Entropy and varentropy of distributions (nats): the one definition entcal uses."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_varentropy(logprobs: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Entropy and varentropy (nats) of each row of normalized log-probabilities ``[N, V]``.

    ``H = −Σ p log p`` and ``varentropy = Var[−log p] = Σ p (log p + H)²`` (centered, so it never
    goes negative by cancellation); tokens with ``p = 0`` (``-inf``, or underflow) contribute 0.
    Returns ``(entropy [N], varentropy [N])``. Peak memory is three ``[N, V]`` temporaries, two
    with ``overwrite=True`` (``logprobs`` is then used as scratch space and destroyed). This is
    the one definition entcal uses: sampling statistics, teacher-forced scoring and the
    calibrators all call it.
    """
    p = logprobs.exp()
    lp0 = logprobs if overwrite else logprobs.clone()
    lp0.masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0
    h = -(p * lp0).sum(-1)
    dev2 = lp0.add_(h.unsqueeze(-1)).square_()  # where p = 0 the product below is 0 anyway
    var = p.mul_(dev2).sum(-1)
    return h, var


def entropy_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_probs [N, V], entropy [N], varentropy [N])`` of ``softmax(logits)``, in nats
    (see :func:`entropy_varentropy`)."""
    logp = torch.log_softmax(logits, dim=-1)
    h, var = entropy_varentropy(logp)
    return logp, h, var
