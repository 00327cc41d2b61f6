"""Throughput of entcal decoders inside vLLM vs vLLM's built-in sampling parameters.

The same workload (``--num-prompts`` prompts x ``--max-tokens`` tokens, ``ignore_eos``) runs in one
engine, in interleaved rounds, with:

* ``vllm_builtin``: ``SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05)``;
* ``entcal``: ``extra_args={"entcal": "temperature=0.8,top_p=0.95,min_p=0.05"}`` (vLLM's own
  fields neutral; entcal's processor registered);
* ``vllm_plain``: ``temperature=1`` without truncation (the engine's speed without any
  truncation work, for scale).

Reported: generated tokens per second per round, the median per configuration, and
``ratio = entcal / vllm_builtin`` (median of the per-round ratios; target >= 0.9).

Note on "the same distribution": vLLM applies min-p (after temperature) *before* top-p; entcal's
chain applies them in transformers' order (top-p, then min-p). Both keep tokens with
``p >= 0.05 · max p`` inside a top-p nucleus, but the nucleus is taken over slightly different
masses, so the kept sets can differ by a few tail tokens; the work done per step is the same
kind (one temperature division, one top-p, one min-p over the full vocabulary).

Usage::

    python benchmarks/vllm_throughput.py [--num-prompts 32] [--max-tokens 64] [--rounds 3] \\
        [--out benchmarks/results/vllm_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

SPEC = "temperature=0.8,top_p=0.95,min_p=0.05"
PROMPTS = [
    "The history of the printing press",
    "def quicksort(items):",
    "In a small village by the sea,",
    "The main causes of inflation are",
    "Dear team, I am writing to",
    "Photosynthesis is the process",
    "The rules of chess state that",
    "Once upon a time",
]


def _params(config: str, max_tokens: int, seed: int):
    from vllm import SamplingParams

    common = {"max_tokens": max_tokens, "ignore_eos": True, "seed": seed}
    if config == "vllm_builtin":
        return SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05, **common)
    if config == "entcal":
        return SamplingParams(extra_args={"entcal": SPEC}, **common)
    if config == "vllm_plain":
        return SamplingParams(temperature=1.0, **common)
    raise ValueError(f"unknown config {config!r}")


def _run(llm, config: str, n: int, max_tokens: int) -> tuple[float, int]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = [_params(config, max_tokens, seed=i) for i in range(n)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results/vllm_throughput.json")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from entcal import models
    from entcal.decoding.vllm.processor import EntcalLogitsProcessor

    t0 = time.perf_counter()
    llm = LLM(
        model=str(models.local_path(args.model)),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=max(32, args.num_prompts),
        seed=0,
        logits_processors=[EntcalLogitsProcessor],
    )
    startup = time.perf_counter() - t0
    configs = ["vllm_builtin", "entcal", "vllm_plain"]
    for c in configs:  # warm-up, not timed
        _run(llm, c, min(4, args.num_prompts), 4)

    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]  # interleave against drift
        row = {}
        for c in order:
            dt, tokens = _run(llm, c, args.num_prompts, args.max_tokens)
            row[c] = {"seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt}
            print(f"round {r} {c:>13}: {tokens} tokens in {dt:.2f} s = {tokens / dt:.1f} tok/s")
        rounds.append(row)

    median = {c: statistics.median(rw[c]["tokens_per_s"] for rw in rounds) for c in configs}
    ratios = [rw["entcal"]["tokens_per_s"] / rw["vllm_builtin"]["tokens_per_s"] for rw in rounds]
    result = {
        "benchmark": "vllm_throughput",
        "model": args.model,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "spec": SPEC,
        "vllm_builtin": {"temperature": 0.8, "top_p": 0.95, "min_p": 0.05},
        "engine_startup_s": startup,
        "rounds": rounds,
        "median_tokens_per_s": median,
        "ratio_entcal_vs_builtin_per_round": ratios,
        "ratio_entcal_vs_builtin": statistics.median(ratios),
        "ratio_builtin_vs_plain": median["vllm_builtin"] / median["vllm_plain"],
        "target_ratio": 0.9,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_tokens_per_s", "ratio_entcal_vs_builtin")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
