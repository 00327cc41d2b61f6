"""``entcal.generate``: transformers' ``generate`` with exactly the specified distribution.

transformers adds sampling defaults of its own (``top_k=50``) and of the model's
``generation_config`` (temperature, top-p, suppress-tokens, ...). :func:`generate` switches all of
them off, so the only change to the model's next-token distribution is the entcal decoder, and
records per generated token, as each step is produced (the full logits are never kept: Gemma's
vocabulary has 262144 entries):

* ``logprob`` / ``entropy`` / ``varentropy``: of the *sampling* distribution (after the decoder);
* ``raw_logprob`` / ``raw_entropy`` / ``raw_varentropy``: of the raw model distribution.

Sampling is per sequence: the token of sample ``j`` of a prompt at step ``t`` is drawn by
inverting the CDF of its distribution at a uniform that depends only on ``(seed, the prompt's
token ids, j, t)`` (a counter-based hash), so a prompt's generations depend on the seed, the
prompt and the decoder, never on the other prompts in the call or its ``batch_size``. A prompt
repeated in the list gets fresh samples at each repeat (the repeat count joins the hash).

All in nats. EOS: by default generation does *not* stop at EOS (``stop_at_eos=False``), so every
sequence has exactly ``max_new_tokens`` tokens (what evaluation needs); with ``stop_at_eos=True`` a
sequence ends with its first EOS (included in its tokens and statistics).

Example::

    >>> from entcal import generate, models
    >>> model, tok = models.load("smollm2-135m")
    >>> out = generate(model, tok, ["The capital of France is"], decoder="top_p=0.95",
    ...                max_new_tokens=20, seed=0, n=2)
    >>> len(out), len(out[0].token_ids), out[0].logprob.shape   # prompt-major, 20 tokens each
    (2, 20, torch.Size([20]))
    >>> out[0].text == tok.decode(out[0].token_ids)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from entcal.decoding import Decoder, ops, parse
from entcal.decoding.base import HistoryDriver
from entcal.decoding.rng import sequence_uniforms

__all__ = ["Generation", "generate", "neutral_generation_config"]


@dataclasses.dataclass
class Generation:
    """One generated sequence. Per-token statistics are float32 tensors ``[len(token_ids)]``."""

    prompt_index: int
    text: str
    token_ids: list[int]
    logprob: Tensor
    raw_logprob: Tensor
    entropy: Tensor
    raw_entropy: Tensor
    varentropy: Tensor
    raw_varentropy: Tensor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists of floats)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, Tensor) else v
        return out


def prompt_keys(prompts: Sequence[Sequence[int]]) -> Tensor:
    """A 63-bit key ``[P]`` per prompt: a hash of its token ids and of how many equal prompts
    come before it in the list (so repeated prompts get their own samples, and a prompt's key
    does not depend on the other, different prompts)."""
    seen: dict[bytes, int] = {}
    keys = []
    for ids in prompts:  # once per prompt, not per step
        raw = b"".join(int(t).to_bytes(8, "little", signed=True) for t in ids)
        k = seen[raw] = seen.get(raw, -1) + 1
        digest = hashlib.blake2b(raw + k.to_bytes(8, "little"), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)
    return torch.tensor(keys, dtype=torch.int64)


def sample_rows(logits: Tensor, u: Tensor) -> Tensor:
    """The token ``[N]`` whose CDF interval under ``softmax(logits)`` holds ``u`` ``[N]``
    (inverse-CDF sampling; tokens of probability 0 are never drawn)."""
    cdf = torch.softmax(logits.float(), dim=-1).double().cumsum_(-1)
    x = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class _Recorder:
    """LogitsProcessor that applies the decoder and records per-step statistics.

    At step t it computes the statistics of the raw and processed distributions and keeps only
    the two ``[N, V]`` log-prob tensors of that step; at step t+1 (or after ``generate``) it reads
    the log-probs of the token that was sampled from them and drops them.
    """

    def __init__(
        self,
        decoder: Decoder,
        eos: set[int] | None,
        seed: int,
        keys: Tensor,
        prompts: list[list[int]] | None = None,
    ) -> None:
        self.decoder = decoder
        self.prompts = prompts  # each row's prompt, unpadded (for a decoder's prime)
        self.eos = eos
        self.seed = seed
        self.keys = keys  # [N, 2]: (prompt key, sample index) of each row
        self.steps: list[dict[str, Tensor]] = []
        self._pending: tuple[Tensor, Tensor] | None = None
        self._history = HistoryDriver(decoder)
        #: the prompts' per-token log loss from the prefill, when the decoder reads it
        #: (``Decoder.prompt_nll_window``): a callable giving ``(nll, real)`` or None
        self.prompt_nll: Any = None

    def _settle(self, tokens: Tensor) -> None:
        if self._pending is None:
            return
        logp, raw_logp = self._pending
        tok = tokens.view(-1, 1).to(logp.device)
        step = self.steps[-1]
        step["token"] = tokens.detach().cpu()
        step["logprob"] = logp.gather(-1, tok).flatten().cpu()
        step["raw_logprob"] = raw_logp.gather(-1, tok).flatten().cpu()
        self._pending = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        last = self._history.step(input_ids)  # the decoder's reset/observe, as in hf's adapter
        if last is not None:
            self._settle(last)
        elif self.decoder.requires_history and self.prompts is not None:
            # new sequences: their prompts without the padding (anchored reads them)
            self.decoder.prime(self.prompts)
            got = self.prompt_nll() if self.prompt_nll is not None else None
            if got is not None:
                self.decoder.prime_prompt_nll(*got)
        processed = self.decoder(scores, input_ids)
        finite = processed.amax(-1)
        if bool(torch.isnan(finite).any()):
            rows_ = torch.isnan(finite).nonzero().flatten().tolist()
            raise ValueError(f"decoder {self.decoder.spec!r} returned NaN in row(s) {rows_[:10]}")
        if bool((finite == float("-inf")).any()):
            rows_ = (finite == float("-inf")).nonzero().flatten().tolist()
            raise ValueError(
                f"decoder {self.decoder.spec!r} masked every token in row(s) {rows_[:10]}: "
                "nothing to sample"
            )
        raw_logp, raw_h, raw_v = ops.entropy_stats(scores.float())
        logp, h, v = ops.entropy_stats(processed)
        self.steps.append(
            {
                "entropy": h.cpu(),
                "varentropy": v.cpu(),
                "raw_entropy": raw_h.cpu(),
                "raw_varentropy": raw_v.cpu(),
            }
        )
        self._pending = (logp, raw_logp)
        # Draw this step's tokens per sequence and hand transformers a one-point distribution:
        # its sampler then returns exactly these tokens, whatever its own RNG does.
        u = sequence_uniforms(self.seed, self.keys, len(self.steps) - 1)
        tokens = sample_rows(processed, u)
        choice = torch.full_like(processed, float("-inf"))
        return choice.scatter_(-1, tokens.view(-1, 1), 0.0)


def _token_ids(prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Any) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    else:
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str) or not all(isinstance(t, int) for t in p):
                raise ValueError(
                    f"prompts[{i}]: prompts must be all strings or all lists of token ids"
                )
            ids.append(list(p))
    if any(len(x) == 0 for x in ids):
        raise ValueError("prompts: every prompt needs at least one token")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id rows left padded to one width: ``(ids, attention mask)``, both long, on the CPU."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def keeps_logits(model: Any) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (the logits of only the last
    positions, not ``[N, T, V]``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def prompt_nll(logits: Tensor, ids: Tensor, mask: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihoods of the prompts' last ``window`` tokens.

    ``logits`` ``[N, K, V]``: the model's logits at the last ``K >= min(T, window + 1)``
    positions of the left-padded prompts ``ids`` ``[N, T]`` (``mask`` ``[N, T]``: 1 for real
    tokens). Returns ``(nll, real)``, both ``[N, W]`` with ``W = min(T, window + 1) - 1``:
    ``nll`` float32 (nats) of tokens ``T - W … T - 1``, and ``real`` (bool) for the tokens that
    are among each row's last ``window`` real tokens after its first (the first token has no
    prediction). One ``log_softmax`` over the ``[N, W, V]`` slice.
    """
    t = ids.shape[1]
    kept = min(t, window + 1)
    tail = logits[:, -kept:-1].float()  # predictions of tokens t - kept + 1 … t - 1
    nll = -torch.log_softmax(tail, -1).gather(-1, ids[:, t - kept + 1 :, None])[..., 0]
    real_count = mask.sum(-1)
    token = torch.arange(t - kept + 1, t, device=ids.device)[None]
    real = token >= t - torch.clamp(real_count - 1, max=window)[:, None]
    return nll, real


def neutral_generation_config(**overrides: Any) -> Any:
    """A transformers ``GenerationConfig`` that samples from the model's distribution unchanged.

    ``do_sample=True`` with every transformers sampling default at its no-op value:
    ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``, ``typical_p=1.0``, ``epsilon_cutoff=0.0``,
    ``eta_cutoff=0.0``, ``repetition_penalty=1.0``, ``min_new_tokens=0``. A field left unset
    (``None``) is filled by ``generate`` from the model's own ``generation_config``, then from
    transformers' global defaults (``top_k=50``), so a comparison (entcal's decoder against a
    transformers warper, or a run against another) would silently get a second truncation on top;
    these fields are therefore always set. Fields without a no-op default (``min_p``, ``top_h``,
    ``suppress_tokens``, ...) can still come from the model's ``generation_config``;
    :func:`generate` also replaces that by this config for the call. ``overrides``
    (``max_new_tokens=``, ``top_p=0.8``, ``eos_token_id=``, ...) are set last.

        >>> cfg = neutral_generation_config(max_new_tokens=5)
        >>> cfg.do_sample, cfg.top_k, cfg.top_p, cfg.max_new_tokens
        (True, 0, 1.0, 5)
    """
    from transformers import GenerationConfig

    fields: dict[str, Any] = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "repetition_penalty": 1.0,
        "min_new_tokens": 0,
    }
    return GenerationConfig(**{**fields, **overrides})


@contextlib.contextmanager
def _clean_generation_config(model: Any, eos: list[int] | None, pad_id: int):
    """Temporarily replace the model's generation_config by one with no sampling defaults."""
    old = getattr(model, "generation_config", None)
    model.generation_config = neutral_generation_config(
        bos_token_id=getattr(old, "bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=pad_id,
    )
    try:
        yield
    finally:
        model.generation_config = old


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    decoder: str | Decoder = "ancestral",
    max_new_tokens: int = 128,
    seed: int = 0,
    n: int = 1,
    stop_at_eos: bool = False,
    batch_size: int | None = None,
) -> list[Generation]:
    """Sample ``n`` continuations of each prompt from ``decoder`` applied to ``model``.

    Args:
        prompts: strings (tokenized with the tokenizer's special tokens) or lists of token ids
            (used as given); left-padded internally.
        decoder: a spec (see :func:`entcal.decoding.parse`) or a Decoder.
        seed: with the prompt's token ids, the only source of randomness of its samples (the
            caller's global torch RNG is neither used nor changed).
        n: continuations per prompt; results are ordered prompt-major (``i * n + j``).
        stop_at_eos: stop a sequence at its first EOS (default: always ``max_new_tokens``).
        batch_size: prompts per ``generate`` call (default: all at once).

    Returns: one :class:`Generation` per (prompt, sample), with per-token log-probs, entropies and
    varentropies (nats) of the sampling and of the raw distribution.
    """
    dec = parse(decoder)
    # Model-aware decoders (calibrated, lookahead) check or adopt the model before any step.
    dec.bind(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; must be an integer >= 1")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}; must be an integer >= 1")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings or of token-id lists, not a string")
    if len(prompts) == 0:
        return []
    eos_ids = getattr(model.generation_config, "eos_token_id", None)
    if eos_ids is None:
        eos_ids = tokenizer.eos_token_id
    eos_list = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_list[0] if eos_list else 0
    device = next(model.parameters()).device
    bs = batch_size or len(prompts)
    ids = _token_ids(prompts, tokenizer)
    keys = prompt_keys(ids)
    results: list[Generation] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), bs):
            results.extend(
                _generate_chunk(
                    model, tokenizer, ids[start : start + bs], keys[start : start + bs], start,
                    dec, max_new_tokens, n, stop_at_eos, eos_list, pad_id, device, seed,
                )
            )  # fmt: skip
    return results


def _generate_chunk(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    prompt_key: Tensor,
    offset: int,
    dec: Decoder,
    max_new_tokens: int,
    n: int,
    stop_at_eos: bool,
    eos_list: list[int],
    pad_id: int,
    device: torch.device,
    seed: int,
) -> list[Generation]:
    from transformers import LogitsProcessorList

    input_ids, mask = left_pad(prompts, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    # rows are prompt-major, as generate expands num_return_sequences
    rows = torch.arange(len(prompts) * n)
    keys = torch.stack([prompt_key[rows // n], rows % n], dim=1)
    row_prompts = [prompts[r // n] for r in range(len(prompts) * n)]
    rec = _Recorder(dec, set(eos_list) if stop_at_eos else None, seed, keys, row_prompts)
    eos = eos_list if (stop_at_eos and eos_list) else None
    config = neutral_generation_config(
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        eos_token_id=eos,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
    )
    extra: dict[str, Any] = {}
    hook = None
    window = dec.prompt_nll_window
    if window > 0 and keeps_logits(model):
        # The decoder reads the prompts' log loss: keep the prefill's logits of the prompts'
        # last window + 1 positions (generate samples from the last) instead of the decoder
        # running the model over the prompts a second time.
        extra["logits_to_keep"] = window + 1
        prefill: dict[str, Tensor] = {}

        def grab(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            # the first forward is the prefill: keep its logits, then stop listening
            prefill["logits"] = output.logits
            hook.remove()

        def from_prefill() -> tuple[Tensor, Tensor] | None:
            logits = prefill.pop("logits", None)
            if logits is None:
                return None
            # generate repeats each prompt n times (prompt-major): read one copy of each
            nll, real = prompt_nll(logits[::n], input_ids, mask, window)
            return nll.repeat_interleave(n, 0), real.repeat_interleave(n, 0)

        rec.prompt_nll = from_prefill
        hook = model.register_forward_hook(grab, with_kwargs=True)
    try:
        with _clean_generation_config(model, eos, pad_id), torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([rec]),
                **extra,
            )
    finally:
        if hook is not None:
            hook.remove()
    seqs = out.sequences[:, input_ids.shape[1] :].cpu()
    # the last step's token is only known now
    if rec.steps and "token" not in rec.steps[-1]:
        rec._settle(seqs[:, len(rec.steps) - 1].to(device))
    keys = ("logprob", "raw_logprob", "entropy", "raw_entropy", "varentropy", "raw_varentropy")
    table = {
        key: torch.stack([s[key] for s in rec.steps], dim=1).float()
        if rec.steps
        else torch.zeros(seqs.shape[0], 0)
        for key in keys
    }
    results = []
    for r in range(seqs.shape[0]):
        toks = seqs[r, : len(rec.steps)].tolist()
        length = len(toks)
        if stop_at_eos:
            for j, t in enumerate(toks):
                if t in eos_list:
                    length = j + 1
                    break
        toks = toks[:length]
        results.append(
            Generation(
                prompt_index=offset + r // n,
                text=tokenizer.decode(toks, skip_special_tokens=False),
                token_ids=toks,
                **{key: table[key][r, :length].clone() for key in keys},
            )
        )
    return results
