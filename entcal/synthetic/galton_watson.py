"""A synthetic Galton–Watson "language model": known answers for the list-decoding branching study.

Chang (arXiv 2303.13112) models the erroneous candidates of a threshold list decoder as a
branching process with offspring mean R. :class:`BranchingSourceLM` is a causal LM whose
erroneous prefixes keep exactly Binomial(n, R/n) tokens above the threshold θ, so R (and the
correct prefix's β) are set exactly; :func:`synthetic_pairs` gives its (prompt, reference) pairs.
It runs through the same code as a real model (:mod:`entcal.studies.branching`).
"""

from __future__ import annotations

import math
import types

import torch

__all__ = ["BranchingSourceLM", "synthetic_pairs"]


def _check_theta(theta) -> None:
    """The per-step threshold must be a number in (0, 1) (as for the list decoder)."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ValueError(f"theta must be a number in (0, 1), got {theta!r}")
    if not (0.0 < float(theta) < 1.0) or math.isnan(theta):
        raise ValueError(f"theta must lie in the open interval (0, 1), got {theta}")


class BranchingSourceLM(torch.nn.Module):
    """A synthetic causal "LM" that is a Galton–Watson process with offspring mean R set exactly.

    Chang models an LLM as a random function; this one is sampled lazily. Token 0 is the
    reference token and token ``vocab_size − 1`` the start token: a prompt is ``[start]`` and the
    reference continuation is all zeros (:func:`synthetic_pairs`). A prefix is *correct* while every
    token after the first is 0. At each forward pass, for each row:

    * a correct prefix gives probability q = 1.05 θ to token 0 and to K ~ Binomial(n − 1,
      β/(n − 1)) other random tokens;
    * an erroneous prefix gives q to K ~ Binomial(n, R/n) random tokens;

    the rest of the mass is spread evenly (below θ) over the other tokens, with n = ⌊0.95/q⌋. So
    under the threshold θ an erroneous candidate keeps exactly K children, E[K] = R, and the
    correct prefix spawns β erroneous children per step on average.

    It reads its history from the ``DynamicCache`` it is given (the token ids are its "keys"), so
    a decoder that reorders the cache wrongly mislabels rows and gets R and β wrong.
    """

    def __init__(
        self,
        R: float,
        beta: float = 1.0,
        theta: float = 0.1,
        vocab_size: int = 64,
        seed: int = 0,
    ):
        super().__init__()
        _check_theta(theta)
        q = 1.05 * theta
        n = math.floor(0.95 / q)
        if n < 2:
            raise ValueError(f"theta={theta} is too large for a branching source (need θ < 0.45)")
        if not 0.0 <= R <= n:
            raise ValueError(f"R must lie in [0, {n}] for theta={theta}, got {R}")
        if not 0.0 <= beta <= n - 1:
            raise ValueError(f"beta must lie in [0, {n - 1}] for theta={theta}, got {beta}")
        if vocab_size < n + math.ceil(1.0 / theta) + 2:
            raise ValueError(
                f"vocab_size must be >= {n + math.ceil(1.0 / theta) + 2} for theta={theta}"
            )
        self.R, self.beta, self.theta, self.q, self.n = float(R), float(beta), theta, q, n
        self.vocab_size = vocab_size
        self.start_token = vocab_size - 1
        self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.generator = torch.Generator().manual_seed(seed)
        self.config = types.SimpleNamespace(
            vocab_size=vocab_size, eos_token_id=None, num_hidden_layers=1, pad_token_id=0
        )

    def forward(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = past_key_values if past_key_values is not None else DynamicCache()
        ids = input_ids.float()[:, None, :, None]
        hist, _ = cache.update(ids, ids, 0)
        hist = hist[:, 0, :, 0].long()
        if attention_mask is not None:
            # Left padding: count only real tokens after each row's first real token.
            real = attention_mask[:, -hist.shape[1] :].bool()
            first = real.float().argmax(-1, keepdim=True)
            after = torch.arange(hist.shape[1], device=hist.device)[None, :] > first
            on_ref = ((hist == 0) | ~(real & after)).all(-1)
        else:
            on_ref = (hist[:, 1:] == 0).all(-1)
        rows = hist.shape[0]
        V = self.vocab_size
        on_ref_cpu = on_ref.cpu()
        k_err = torch.binomial(
            torch.full((rows,), float(self.n)),
            torch.full((rows,), self.R / self.n),
            generator=self.generator,
        )
        p_ref = self.beta / (self.n - 1)
        k_ref = torch.binomial(
            torch.full((rows,), float(self.n - 1)),
            torch.full((rows,), p_ref),
            generator=self.generator,
        )
        k = torch.where(on_ref_cpu, k_ref, k_err).long()
        noise = torch.rand(rows, V, generator=self.generator)
        noise[on_ref_cpu, 0] = 2.0  # token 0 is kept separately for the correct prefix
        rank = noise.argsort(-1).argsort(-1)
        kept = rank < k[:, None]
        kept[on_ref_cpu, 0] = True
        n_kept = kept.sum(-1, keepdim=True)
        rest = (1.0 - n_kept * self.q) / (V - n_kept)
        probs = torch.where(kept, torch.full_like(noise, self.q), rest.expand(-1, V))
        logits = probs.log().to(input_ids.device)[:, None, :]
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def synthetic_pairs(n: int, steps: int, vocab_size: int = 64):
    """``n`` (prompt, reference) pairs for :class:`BranchingSourceLM`: [start] and ``steps`` zeros."""
    from entcal.corpora import TextPair

    return [TextPair((vocab_size - 1,), (0,) * steps, i) for i in range(n)]
