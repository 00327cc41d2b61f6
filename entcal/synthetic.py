"""A synthetic Markov-chain source with analytic entropies, wrapped as a Hugging Face causal LM.

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
values of what a decoder samples are known too.

:class:`MarkovChainLM` is a real ``transformers`` ``PreTrainedModel`` + ``GenerationMixin`` (with a
KV cache, ``attention_mask``, ``logits_to_keep`` and ``output_hidden_states``), and
:class:`MarkovChainTokenizer` a real ``PreTrainedTokenizer`` (symbols ``s0 s1 ...``), so the pair
runs through exactly the code paths a real model does: ``entcal.generate``, ``entcal.eval``
scoring and ``entcal compare``. The model is a zero-layer network: the input embedding is the
identity (one-hot hidden states) and the output embedding holds ``log P``.

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
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = [
    "MarkovChain",
    "MarkovChainConfig",
    "MarkovChainLM",
    "MarkovChainModel",
    "MarkovChainTokenizer",
]

# log 0 stored in the model: finite so that one-hot @ log P never computes 0 * -inf, and low
# enough that exp() of it is exactly 0 in float32 (softmax gives the zero probability back).
_LOG_ZERO = -1.0e4


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
        logits = self.log_transition().float().clamp_min(_LOG_ZERO)
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


class MarkovChainConfig(PretrainedConfig):
    """Config of :class:`MarkovChainLM` (``vocab_size``; one cache layer holding token ids)."""

    model_type = "entcal_markov_chain"

    def __init__(
        self,
        vocab_size: int = 16,
        max_position_embeddings: int = 1 << 20,
        pad_token_id: int | None = 0,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = vocab_size
        # transformers builds a DynamicCache with one layer per hidden layer.
        self.num_hidden_layers = 1
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class _MarkovChainPreTrainedModel(PreTrainedModel):
    config_class = MarkovChainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:  # weights are set in __init__
        pass


class MarkovChainModel(_MarkovChainPreTrainedModel):
    """The body of :class:`MarkovChainLM`: hidden state = one-hot row of the token.

    The cache stores the token ids seen so far (one scalar per position), so it grows in step
    with the positions as a transformer's KV cache does.
    """

    def __init__(self, config: MarkovChainConfig) -> None:
        super().__init__(config)
        v = config.vocab_size
        self.embed_tokens = nn.Embedding(v, v)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(v))
        self.embed_tokens.weight.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MarkovChainModel needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        hidden = inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None:
            ids = hidden.argmax(-1).to(hidden.dtype)[:, None, :, None]
            past_key_values.update(ids, ids, 0)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=(hidden,) if output_hidden_states else None,
        )


class MarkovChainLM(_MarkovChainPreTrainedModel, GenerationMixin):
    """A Markov chain as a causal LM: ``logits[b, t] = log P[input_ids[b, t]]``.

    ``model`` (:class:`MarkovChainModel`) maps tokens to one-hot hidden states; the output
    embedding ``lm_head`` holds ``log P`` transposed, so ``lm_head(hidden) = log P[token]``: the
    same structure (body → final hidden state → output embedding) as a transformer, and
    ``get_decoder()`` / ``get_output_embeddings()`` work as they do for one.
    """

    def __init__(self, config: MarkovChainConfig, log_transition: Tensor | None = None) -> None:
        super().__init__(config)
        v = config.vocab_size
        self.model = MarkovChainModel(config)
        self.lm_head = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            if log_transition is None:
                log_transition = torch.full((v, v), -math.log(v))
            self.lm_head.weight.copy_(log_transition.float().clamp_min(_LOG_ZERO).T)
        self.lm_head.weight.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep, :]
        return CausalLMOutputWithPast(
            logits=self.lm_head(kept),
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
        )


class MarkovChainTokenizer(PreTrainedTokenizer):
    """Tokenizer of :class:`MarkovChainLM`: symbol ``k`` is the word ``s{k}``; text is space
    separated. Token 0 doubles as the pad token; there is no BOS and no EOS."""

    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012 (transformers' API)

    def __init__(self, vocab_size: int = 16, **kwargs) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self._size = vocab_size
        self._vocab = {f"s{k}": k for k in range(vocab_size)}
        kwargs.setdefault("pad_token", "s0")
        kwargs.setdefault("padding_side", "left")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._vocab:
            raise ValueError(f"{token!r} is not a symbol of this chain (s0 .. s{self._size - 1})")
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        return f"s{int(index)}"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()
