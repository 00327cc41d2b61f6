"""A Markov chain as a Hugging Face causal LM and tokenizer, for known-answer tests.

:class:`MarkovChainLM` is a real ``transformers`` ``PreTrainedModel`` + ``GenerationMixin`` (with a
KV cache, ``attention_mask``, ``logits_to_keep`` and ``output_hidden_states``), and
:class:`MarkovChainTokenizer` a real ``PreTrainedTokenizer`` (symbols ``s0 s1 ...``), so the pair
runs through exactly the code paths a real model does: ``entcal.generate``, ``entcal.eval``
scoring and ``entcal compare``. The model is a zero-layer network: the input embedding is the
identity (one-hot hidden states) and the output embedding holds ``log P``. Build one with
:meth:`entcal.synthetic.MarkovChain.as_model`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

__all__ = [
    "MarkovChainConfig",
    "MarkovChainLM",
    "MarkovChainModel",
    "MarkovChainTokenizer",
]

# log 0 stored in the model: finite so that one-hot @ log P never computes 0 * -inf, and low
# enough that exp() of it is exactly 0 in float32 (softmax gives the zero probability back).
LOG_ZERO = -1.0e4


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
            self.lm_head.weight.copy_(log_transition.float().clamp_min(LOG_ZERO).T)
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
