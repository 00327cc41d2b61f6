"""A synthetic Markov-chain source and its analytic quantities (entropies, log losses, ...).

Known-answer tests need a "language model" whose every quantity is computable exactly. A
first-order Markov chain over ``V`` symbols is one: the next-token distribution depends only on the
last token, ``p(y_t = v | y_<t) = P[y_{t-1}, v]``, so

* the entropy of step ``t`` given the last prompt token ``s`` is ``E[H_t] = (e_s P^t) · H``, with
  ``H[u] = -Σ_v P[u, v] log P[u, v]`` (and the varentropy likewise, with
  ``Var[u] = Σ_v P[u, v] (log P[u, v] + H[u])²``);
* the log loss of text drawn from a chain ``P`` and scored by a chain ``Q`` is
  ``E[-log Q(y_t)] = (e_s P^t) · CE``, with ``CE[u] = -Σ_v P[u, v] log Q[u, v]``;
* the future entropy of a prefix ending in token ``v`` over the next ``k`` steps is
  ``F_k(v) = Σ_{j<k} (e_v P^j) · H`` (Cao, Valiant & Liang, arXiv 2511.11966, Eq. 10);
* the stationary distribution ``π = πP`` gives the entropy rate ``π · H`` (the limit the AEP of
  Mudumbai & Bell, arXiv 2405.13798, converges to for a stationary source).

A stateless decoder (temperature, top-p, ...) applied at every step turns the chain ``P`` into the
chain ``Q = softmax(decoder(log P))`` row by row (:meth:`MarkovChain.processed`), so the analytic
values of what a decoder samples are known too. :meth:`MarkovChain.as_model` wraps the chain as a
real causal LM and tokenizer (:mod:`entcal.synthetic.markov_lm`).

Example::

    >>> from entcal.synthetic import MarkovChain
    >>> chain = MarkovChain.random(vocab_size=16, seed=0)
    >>> model, tokenizer = chain.as_model()
    >>> tokens = chain.sample(4, 32, seed=1)             # "human" text, LongTensor [4, 32]
    >>> h = chain.expected_entropy_per_step(tokens[:, 15], steps=16)   # analytic, nats
    >>> h[:3], h[-1]            # from the states at step 15 towards the stationary rate
    (tensor([1.8205, 1.9606, 2.0120], dtype=torch.float64), tensor(2.0077, dtype=torch.float64))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from entcal.synthetic.markov_lm import (
    LOG_ZERO,
    MarkovChainConfig,
    MarkovChainLM,
    MarkovChainTokenizer,
)

__all__ = ["MarkovChain"]


def _entr_rows(p: Tensor) -> Tensor:
    """Entropy of each row, with 0 log 0 = 0."""
    return torch.special.entr(p).sum(-1)


class MarkovChain:
    """A first-order Markov chain over ``V`` symbols, with exact entropies.

    Args:
        transition: ``[V, V]`` row-stochastic matrix, ``transition[u, v] = p(next = v | last = u)``.
            Zero entries are allowed (the chain then has hard constraints, as truncation has).
        initial: ``[V]`` distribution of the first token of a sampled text; the stationary
            distribution when omitted.

    All quantities are float64 on the CPU (the chain is small; exactness is the point).
    """

    def __init__(self, transition: Tensor, initial: Tensor | None = None) -> None:
        transition = torch.as_tensor(transition, dtype=torch.float64).detach().cpu()
        if transition.ndim != 2 or transition.shape[0] != transition.shape[1]:
            raise ValueError(
                f"transition must be a square [V, V] matrix, got {tuple(transition.shape)}"
            )
        if transition.shape[0] < 2:
            raise ValueError(f"vocab_size must be >= 2, got {transition.shape[0]}")
        if not torch.isfinite(transition).all() or (transition < 0).any():
            raise ValueError("transition must hold finite, non-negative probabilities")
        if not torch.allclose(transition.sum(-1), torch.ones(()).double(), atol=1e-6):
            raise ValueError("every row of transition must sum to 1")
        self.transition = transition / transition.sum(-1, keepdim=True)
        if initial is None:
            initial = self.stationary()
        initial = torch.as_tensor(initial, dtype=torch.float64).detach().cpu()
        if initial.shape != (self.vocab_size,) or (initial < 0).any():
            raise ValueError(f"initial must be a distribution of shape [{self.vocab_size}]")
        if not math.isclose(float(initial.sum()), 1.0, abs_tol=1e-6):
            raise ValueError("initial must sum to 1")
        self.initial = initial / initial.sum()

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(
        cls,
        vocab_size: int = 16,
        *,
        scale: float = 1.5,
        seed: int = 0,
        sparsity: float = 0.0,
    ) -> MarkovChain:
        """A random chain with rows ``softmax(scale · z)``, ``z ~ N(0, 1)``.

        Args:
            vocab_size: number of symbols ``V`` (>= 2).
            scale: logit scale; larger means lower entropy per step.
            seed: seed of the generator (the same seed gives the same chain).
            sparsity: fraction in [0, 1) of transitions set to probability 0 (each row keeps at
                least its most likely successor).
        """
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
        gen = torch.Generator().manual_seed(seed)
        logits = scale * torch.randn(vocab_size, vocab_size, generator=gen, dtype=torch.float64)
        if sparsity > 0:
            drop = torch.rand(vocab_size, vocab_size, generator=gen, dtype=torch.float64) < sparsity
            drop[torch.arange(vocab_size), logits.argmax(-1)] = False
            logits = logits.masked_fill(drop, -math.inf)
        return cls(torch.softmax(logits, -1))

    def processed(self, decoder) -> MarkovChain:
        """The chain a stateless decoder samples from: ``Q[u] = softmax(decoder(log P[u]))``.

        ``decoder`` is any callable mapping logits ``[N, V]`` to processed logits ``[N, V]`` (an
        ``entcal.decoding.Decoder`` whose ``requires_history`` is False, or a plain function).
        """
        if getattr(decoder, "requires_history", False):
            raise ValueError(
                f"decoder {decoder} depends on the history; a Markov chain stays a chain only "
                "under a stateless decoder"
            )
        logits = self.log_transition().float().clamp_min(LOG_ZERO)
        out = decoder(logits)
        return MarkovChain(torch.softmax(out.double(), -1), initial=self.initial)

    # ------------------------------------------------------------------ basic quantities

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[0]

    def log_transition(self) -> Tensor:
        """``log P`` (``-inf`` where a transition is impossible)."""
        return self.transition.log()

    def entropy(self) -> Tensor:
        """``[V]``: entropy of the next-token distribution after each state (nats)."""
        return _entr_rows(self.transition)

    def varentropy(self) -> Tensor:
        """``[V]``: variance of the surprisal ``-log p(y)`` under each state's next-token law."""
        lp = torch.where(self.transition > 0, self.log_transition(), 0.0)
        second = (self.transition * lp * lp).sum(-1)
        return (second - self.entropy() ** 2).clamp_min(0.0)

    def cross_entropy(self, other: MarkovChain) -> Tensor:
        """``[V]``: ``CE[u] = -Σ_v P[u, v] log Q[u, v]`` of text from this chain scored by ``other``.

        ``inf`` where ``other`` gives probability 0 to a transition this chain can make.
        """
        self._check_same_vocab(other)
        q_log = other.log_transition()
        terms = torch.where(self.transition > 0, -self.transition * q_log, 0.0)
        return terms.sum(-1)

    def stationary(self) -> Tensor:
        """``[V]``: a stationary distribution ``π = πP`` (by power iteration from uniform, then the
        eigenvector of eigenvalue 1 when the iteration has not settled)."""
        pi = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        # Averaging the iterates (Cesàro) converges for periodic chains too.
        mat = self.transition
        acc = torch.zeros_like(pi)
        for _ in range(2000):
            pi = pi @ mat
            acc += pi
        pi = acc / acc.sum()
        if torch.allclose(pi @ mat, pi, atol=1e-10):
            return pi
        vals, vecs = torch.linalg.eig(mat.T)
        k = int((vals - 1).abs().argmin())
        vec = vecs[:, k].real.abs()
        return vec / vec.sum()

    def entropy_rate(self) -> float:
        """``π · H``: the per-token entropy of the stationary chain (nats/token)."""
        return float(self.stationary() @ self.entropy())

    # ------------------------------------------------------------------ along a text

    def _start(self, last_tokens: Tensor | Sequence[int] | None) -> Tensor:
        """Distribution ``[V]`` of the token before step 0 (mean over the given last tokens)."""
        if last_tokens is None:
            return self.initial
        last = torch.as_tensor(last_tokens, dtype=torch.long).reshape(-1).cpu()
        if last.numel() == 0:
            raise ValueError("last_tokens is empty")
        if last.min() < 0 or last.max() >= self.vocab_size:
            raise ValueError(f"last_tokens must lie in [0, {self.vocab_size})")
        return torch.bincount(last, minlength=self.vocab_size).double() / last.numel()

    def state_distribution(self, last_tokens: Tensor | Sequence[int] | None, steps: int) -> Tensor:
        """``[steps, V]``: distribution of the token *before* step ``t`` (``t = 0..steps-1``).

        Step 0 predicts the first continuation token after the given last (prompt) tokens; the
        rows average over the given ``last_tokens`` (or start from ``initial`` when None, in which
        case step 0 is the distribution of the first token's predecessor state ``initial``).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        out = torch.empty(steps, self.vocab_size, dtype=torch.float64)
        dist = self._start(last_tokens)
        for t in range(steps):
            out[t] = dist
            dist = dist @ self.transition
        return out

    def expected_entropy_per_step(
        self, last_tokens: Tensor | Sequence[int] | None, steps: int
    ) -> Tensor:
        """``[steps]``: ``E[H(p_t)]`` at each step of a continuation sampled from this chain."""
        return self.state_distribution(last_tokens, steps) @ self.entropy()

    def expected_varentropy_per_step(
        self, last_tokens: Tensor | Sequence[int] | None, steps: int
    ) -> Tensor:
        """``[steps]``: ``E[Var(-log p_t)]`` at each step of a continuation from this chain."""
        return self.state_distribution(last_tokens, steps) @ self.varentropy()

    def expected_log_loss_per_step(
        self, scorer: MarkovChain, last_tokens: Tensor | Sequence[int] | None, steps: int
    ) -> Tensor:
        """``[steps]``: ``E[-log Q(y_t)]`` for text sampled from this chain, scored by ``scorer``."""
        ce = self.cross_entropy(scorer)
        dist = self.state_distribution(last_tokens, steps)
        # 0 * inf would be NaN: a state never visited contributes nothing.
        return torch.where(dist > 0, dist * ce, 0.0).sum(-1)

    def future_entropy(self, horizon: int) -> Tensor:
        """``[V]``: expected total entropy of the next ``horizon`` steps after emitting token ``v``.

        ``F_k(v) = Σ_{j=0}^{k-1} (e_v P^j) · H`` — the future entropy
        ``H(Ŷ_{>t} | y_t = v)`` of Cao, Valiant & Liang (Eq. 10) with ``k = T - t`` steps left.
        ``horizon = 0`` gives zeros.
        """
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        total = torch.zeros(self.vocab_size, dtype=torch.float64)
        h = self.entropy()
        for _ in range(horizon):
            total = total + h
            h = self.transition @ h
        return total

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        length: int,
        *,
        start: Tensor | Sequence[int] | None = None,
        seed: int = 0,
    ) -> Tensor:
        """Sample ``n`` texts of ``length`` tokens; ``LongTensor [n, length]``.

        Args:
            start: optional ``[n]`` last tokens to continue from (the first sampled token follows
                ``start[i]``); without it the first token is drawn from ``initial``.
            seed: generator seed.
        """
        if n < 1 or length < 1:
            raise ValueError(f"n and length must be >= 1, got n={n}, length={length}")
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(n, length, dtype=torch.long)
        if start is None:
            prev = torch.multinomial(self.initial.expand(n, -1), 1, generator=gen).squeeze(1)
            out[:, 0] = prev
            first = 1
        else:
            prev = torch.as_tensor(start, dtype=torch.long).reshape(-1)
            if prev.numel() != n:
                raise ValueError(f"start must hold n={n} tokens, got {prev.numel()}")
            first = 0
        for t in range(first, length):
            prev = torch.multinomial(self.transition[prev], 1, generator=gen).squeeze(1)
            out[:, t] = prev
        return out

    # ------------------------------------------------------------------ as a model

    def as_model(self) -> tuple[MarkovChainLM, MarkovChainTokenizer]:
        """``(model, tokenizer)``: the chain as a float32 causal LM and its tokenizer."""
        config = MarkovChainConfig(vocab_size=self.vocab_size)
        model = MarkovChainLM(config, self.log_transition().float())
        model.eval()
        return model, MarkovChainTokenizer(self.vocab_size)

    def _check_same_vocab(self, other: MarkovChain) -> None:
        if other.vocab_size != self.vocab_size:
            raise ValueError(
                f"chains have different vocab sizes ({self.vocab_size} vs {other.vocab_size})"
            )
